"""Secure aggregation: masked uploads sum to the plain weighted average, single uploads
reveal nothing, chunking and dropouts do not change the result, and every refusal the
protocol relies on happens."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from safetensors.numpy import load_file, save_file

from splitfed.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from splitfed.models.adapters import average_adapters
from splitfed.security import secagg
from splitfed.security.secagg import (
    MaskedSum,
    Participant,
    SecAggParams,
    mask_range,
    max_abs_value,
)

PARAMS = SecAggParams("fed-test", 7)
SHAPES: dict[str, tuple[int, ...]] = {
    "head.layers.0.q_proj.lora_A": (8, 64),
    "head.layers.0.q_proj.lora_B": (64, 8),
    "tail.layers.1.v_proj.lora_B": (3, 5, 7),
    "tail.prefix": (),
    "tail.empty": (0, 4),
}
NAMES = ("hospital-a", "clinic-b", "lab-c", "hospital-d", "uni-e")
WEIGHTS = (17, 250, 3, 64, 1000)


def make_round(
    count: int, params: SecAggParams = PARAMS, shapes: Mapping[str, tuple[int, ...]] = SHAPES
) -> tuple[list[Participant], MaskedSum]:
    participants = [Participant(name, params) for name in NAMES[:count]]
    keys = {p.name: p.public_key for p in participants}
    for p in participants:
        p.set_peers(keys)
    return participants, MaskedSum(params, shapes)


def updates(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {name: torch.randn(shape, generator=generator) * 0.05 for name, shape in SHAPES.items()}
        for _ in range(count)
    ]


def upload(
    p: Participant, total: MaskedSum, update: Mapping[str, torch.Tensor], weight: float
) -> None:
    for name, tensor in update.items():
        total.add_chunk(name, 0, p.encode_and_mask(name, tensor, weight))


def expected(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    return average_adapters(states, weights)


@pytest.mark.parametrize("count", [2, 3, 5])
def test_masked_sum_is_the_weighted_average(count: int) -> None:
    participants, total = make_round(count)
    states = updates(count)
    for p, state, weight in zip(participants, states, WEIGHTS, strict=False):
        upload(p, total, state, weight)
    result = total.decode(sum(WEIGHTS[:count]))
    reference = expected(states, WEIGHTS[:count])
    assert set(result) == set(SHAPES)
    for name, tensor in result.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=0)


def test_bf16_and_numpy_inputs_encode_like_float32() -> None:
    (a, b), total = make_round(2, shapes={"w": (4, 4)})
    x = torch.randn(4, 4).to(torch.bfloat16)
    y = np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4)
    total.add_chunk("w", 0, a.encode_and_mask("w", x, 2))
    total.add_chunk("w", 0, b.encode_and_mask("w", y, 1))
    want = (2 * x.float() + torch.from_numpy(y)) / 3
    torch.testing.assert_close(total.decode(3)["w"], want, atol=1e-6, rtol=0)


def test_a_single_upload_reveals_nothing() -> None:
    participants, total = make_round(3, shapes={"w": (64, 64)})
    plain = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    masked = participants[0].encode_and_mask("w", plain, 10)
    # Decoded alone the upload is noise of size ~2**63 / scale, uncorrelated with the update.
    alone = masked.view(np.int64) / PARAMS.scale / 10
    assert np.median(np.abs(alone)) > 1e9
    correlation = np.corrcoef(alone, plain.numpy().reshape(-1))[0, 1]
    assert abs(correlation) < 0.05
    # Every bit of the words is (about) uniformly set: no plaintext bit leaks through.
    bits = np.unpackbits(masked.view(np.uint8)).reshape(-1, 64).mean(axis=0)
    assert np.all(np.abs(bits - 0.5) < 0.05)
    # Masking the same update twice (a new round: new keys) gives unrelated words.
    again, _ = make_round(3, shapes={"w": (64, 64)})
    assert np.mean(again[0].encode_and_mask("w", plain, 10) == masked) < 0.001
    # What the aggregator holds after one or two of three uploads is noise too.
    total.add_chunk("w", 0, masked)
    partial = total.state()["w"].reshape(-1).view(np.int64) / PARAMS.scale / 10
    assert abs(np.corrcoef(partial, plain.numpy().reshape(-1))[0, 1]) < 0.05
    second = participants[1].encode_and_mask("w", plain, 10)
    total.add_chunk("w", 0, second)
    partial = total.state()["w"].reshape(-1).view(np.int64) / PARAMS.scale / 20
    assert np.median(np.abs(partial)) > 1e9


@pytest.mark.parametrize(
    "bounds",
    [
        [0, 200_000],
        [0, 1, 200_000],
        [0, 3, 65_535, 65_537, 131_071, 200_000],
        [0, 99_999, 100_000, 100_001, 200_000],
    ],
)
def test_chunked_masking_equals_whole_tensor_masking(bounds: list[int]) -> None:
    """Chunks at odd and even starts, across the keystream's block boundaries."""
    participants, total = make_round(3, shapes={"big": (200_000,)})
    values = torch.randn(200_000, generator=torch.Generator().manual_seed(2))
    whole = participants[0].encode_and_mask("big", values, 5)
    encoded = participants[0].encode(values, 5)
    chunks = [
        participants[0].mask_chunk("big", start, encoded[start:stop])
        for start, stop in itertools.pairwise(bounds)
    ]
    np.testing.assert_array_equal(np.concatenate(chunks), whole)
    # Folded chunk by chunk, in any order, the sum still decodes to the average.
    for start, chunk in reversed(list(zip(bounds, chunks, strict=False))):
        total.add_chunk("big", start, chunk)
    others = [torch.randn(200_000) for _ in participants[1:]]
    for p, other in zip(participants[1:], others, strict=True):
        total.add_chunk("big", 0, p.encode_and_mask("big", other, 1))
    want = (5 * values + others[0] + others[1]) / 7
    torch.testing.assert_close(total.decode(7)["big"], want, atol=1e-6, rtol=0)


def test_mask_range_is_random_access_and_follows_the_spec() -> None:
    seed = bytes(range(32))
    full = mask_range(seed, "layer.w", 0, 150_001)
    for start, stop in [(0, 0), (1, 2), (7, 70_000), (65_536, 65_537), (131_071, 150_001)]:
        np.testing.assert_array_equal(mask_range(seed, "layer.w", start, stop), full[start:stop])
    assert not np.array_equal(mask_range(seed, "layer.v", 0, 16), full[:16])
    # The documented construction, written out independently.
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"splitfed secagg mask v1\x00layer.w"
    ).derive(seed)
    encryptor = Cipher(algorithms.AES(key), modes.CTR((500).to_bytes(16, "big"))).encryptor()
    words = np.frombuffer(encryptor.update(bytes(64)), dtype="<u8")
    np.testing.assert_array_equal(mask_range(seed, "layer.w", 1000, 1008), words)
    np.testing.assert_array_equal(mask_range(seed, "layer.w", 1001, 1008), words[1:])
    with pytest.raises(InvalidArgumentError):
        mask_range(seed[:16], "layer.w", 0, 4)
    with pytest.raises(InvalidArgumentError):
        mask_range(seed, "layer.w", 5, 4)


def test_pairwise_seeds_follow_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = {name: X25519PrivateKey.generate() for name in ("alice", "bob", "carol")}

    class Fixed:
        name = ""

        @staticmethod
        def generate() -> X25519PrivateKey:
            return keys[Fixed.name]

    monkeypatch.setattr(secagg, "X25519PrivateKey", Fixed)
    participants = {}
    for name in ("bob", "alice", "carol"):
        Fixed.name = name
        participants[name] = Participant(name, PARAMS)
    public = {name: p.public_key for name, p in participants.items()}
    for p in participants.values():
        p.set_peers(public)
    shared = keys["alice"].exchange(X25519PublicKey.from_public_bytes(public["bob"]))
    info = b"".join(
        [
            b"splitfed secagg v1\x00",
            len(b"fed-test").to_bytes(4, "big") + b"fed-test",
            (7).to_bytes(8, "big"),
            (5).to_bytes(4, "big") + b"alice",
            (32).to_bytes(4, "big") + public["alice"],
            (3).to_bytes(4, "big") + b"bob",
            (32).to_bytes(4, "big") + public["bob"],
        ]
    )
    want = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
    assert participants["alice"].reveal(["bob"]) == {"bob": want}
    assert participants["bob"].reveal(["alice"]) == {"alice": want}


@pytest.mark.parametrize("dropped", [("lab-c",), ("hospital-a", "uni-e")])
def test_dropouts_are_recovered_exactly(dropped: tuple[str, ...]) -> None:
    participants, total = make_round(5)
    states = updates(5, seed=3)
    survivors = [(p, s, w) for p, s, w in zip(participants, states, WEIGHTS, strict=True)]
    survivors = [entry for entry in survivors if entry[0].name not in dropped]
    for p, state, weight in survivors:
        upload(p, total, state, weight)
    weight = sum(w for _, _, w in survivors)
    reference = expected([s for _, s, _ in survivors], [w for _, _, w in survivors])
    # Before the survivors' masks for the dropped peers are removed, the sum is noise.
    noise = total.decode(weight)["head.layers.0.q_proj.lora_A"]
    assert float(noise.abs().median()) > 1e6
    for p, _, _ in survivors:
        for name, seed in p.reveal(dropped).items():
            total.remove_masks(p.name, name, seed)
    for name, tensor in total.decode(weight).items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=0)


def test_removing_masks_is_refused_twice_and_for_oneself() -> None:
    (a, b, c), total = make_round(3, shapes={"w": (10,)})
    for p in (a, b):
        total.add_chunk("w", 0, p.encode_and_mask("w", torch.full((10,), 0.5), 1))
    seed_ac = a.reveal([c.name])[c.name]
    with pytest.raises(InvalidArgumentError, match="both"):
        total.remove_masks(c.name, c.name, seed_ac)
    with pytest.raises(InvalidArgumentError, match="32 bytes"):
        total.remove_masks(a.name, c.name, seed_ac[:16])
    total.remove_masks(a.name, c.name, seed_ac)
    with pytest.raises(FailedPreconditionError, match="already removed"):
        total.remove_masks(a.name, c.name, seed_ac)
    total.remove_masks(b.name, c.name, b.reveal([c.name])[c.name])
    torch.testing.assert_close(total.decode(2)["w"], torch.full((10,), 0.5))


def test_participant_reveal_refusals() -> None:
    (a, b, c), _ = make_round(3)
    with pytest.raises(InvalidArgumentError, match="did not drop"):
        a.reveal([a.name])
    with pytest.raises(NotFoundError):
        a.reveal(["mallory"])
    with pytest.raises(PermissionDeniedError, match="min_survivors"):
        a.reveal([b.name, c.name])
    assert set(a.reveal([b.name])) == {b.name}
    # Seeds revealed cumulatively count too: c would leave a alone.
    with pytest.raises(PermissionDeniedError, match="min_survivors"):
        a.reveal([c.name])
    # Once it revealed, a participant masks nothing more this round.
    with pytest.raises(FailedPreconditionError, match="revealed"):
        a.encode_and_mask("w", torch.ones(3), 1)
    assert a.reveal([]) == {}
    strict = SecAggParams("fed-test", 7, min_survivors=3)
    (d, e, _), _ = make_round(3, params=strict)
    with pytest.raises(PermissionDeniedError):
        d.reveal([e.name])


def test_peer_set_is_validated() -> None:
    a, b, c = (Participant(name, PARAMS) for name in NAMES[:3])
    with pytest.raises(InvalidArgumentError, match="another public key"):
        a.set_peers({a.name: b.public_key, b.name: b.public_key})
    with pytest.raises(InvalidArgumentError, match="32 bytes"):
        a.set_peers({b.name: b.public_key[:31]})
    with pytest.raises(InvalidArgumentError, match="same public key"):
        a.set_peers({b.name: b.public_key, c.name: b.public_key})
    with pytest.raises(InvalidArgumentError, match="same public key"):
        a.set_peers({b.name: a.public_key})
    with pytest.raises(InvalidArgumentError, match="at least one other"):
        a.set_peers({a.name: a.public_key})
    with pytest.raises(InvalidArgumentError, match="not usable"):
        a.set_peers({b.name: bytes(32)})
    with pytest.raises(InvalidArgumentError, match="non-empty"):
        a.set_peers({"": b.public_key})
    with pytest.raises(FailedPreconditionError, match="no peers"):
        a.encode_and_mask("w", torch.ones(3), 1)
    a.set_peers({b.name: b.public_key, c.name: c.public_key})
    assert a.peers == tuple(sorted([b.name, c.name]))
    with pytest.raises(FailedPreconditionError, match="already"):
        a.set_peers({b.name: b.public_key})


def test_a_substituted_public_key_breaks_the_sum() -> None:
    """Keys must reach everyone unchanged: with another key for b at a, masks do not cancel."""
    a, b = Participant("a", PARAMS), Participant("b", PARAMS)
    a.set_peers({"b": Participant("b", PARAMS).public_key})
    b.set_peers({"a": a.public_key})
    total = MaskedSum(PARAMS, {"w": (100,)})
    for p in (a, b):
        total.add_chunk("w", 0, p.encode_and_mask("w", torch.ones(100), 1))
    assert float(total.decode(2)["w"].abs().min()) > 1e3


def test_fixed_point_range_is_checked() -> None:
    (a, b, c), _ = make_round(3, shapes={"w": (4,)})
    limit = max_abs_value(PARAMS, 3)
    assert limit == pytest.approx(2.0**63 / 3 / 2**24)
    with pytest.raises(InvalidArgumentError, match="overflow"):
        a.encode(torch.tensor([0.0, limit / 10 * 1.001], dtype=torch.float64), 10)
    with pytest.raises(InvalidArgumentError, match="finite"):
        a.encode(torch.tensor([0.0, float("nan")]), 1)
    with pytest.raises(InvalidArgumentError, match="finite"):
        a.encode(torch.tensor([float("-inf")]), 1)
    with pytest.raises(InvalidArgumentError, match="weight"):
        a.encode(torch.ones(2), -1)
    with pytest.raises(InvalidArgumentError, match="floating point"):
        a.encode(torch.ones(2, dtype=torch.int64), 1)
    # Just inside the bound, all three at the extreme, the sum still decodes correctly.
    total = MaskedSum(PARAMS, {"w": (4,)})
    extreme = torch.tensor([limit * 0.999, -limit * 0.999, 1.5, -limit / 2], dtype=torch.float64)
    for p in (a, b, c):
        total.add_chunk("w", 0, p.encode_and_mask("w", extreme, 1))
    result = total.decode(3)["w"].double()
    torch.testing.assert_close(result, extreme, rtol=1e-6, atol=1e-6)


def test_masked_sum_validates_chunks() -> None:
    (a, _), total = make_round(2, shapes={"w": (10,)})
    chunk = a.encode_and_mask("w", torch.ones(10), 1)
    with pytest.raises(NotFoundError):
        total.add_chunk("v", 0, chunk)
    with pytest.raises(InvalidArgumentError, match="outside"):
        total.add_chunk("w", 1, chunk)
    with pytest.raises(InvalidArgumentError, match="outside"):
        total.add_chunk("w", -1, chunk[:3])
    with pytest.raises(InvalidArgumentError, match="uint64"):
        total.add_chunk("w", 0, chunk.view(np.int64))
    with pytest.raises(InvalidArgumentError, match="uint64"):
        total.add_chunk("w", 0, chunk.reshape(2, 5))
    with pytest.raises(InvalidArgumentError, match="non-negative"):
        MaskedSum(PARAMS, {"w": (-1,)})


def test_state_round_trips_through_safetensors(tmp_path: Path) -> None:
    participants, total = make_round(3)
    states = updates(3, seed=4)
    upload(participants[0], total, states[0], 17)
    # Persisted between two uploads (as U64 safetensors), restored into a new sum.
    path = tmp_path / "sum.safetensors"
    save_file(total.state(), str(path))
    loaded = load_file(str(path))
    assert all(t.dtype == np.uint64 for t in loaded.values())
    assert {n: t.shape for n, t in loaded.items()} == SHAPES
    restored = MaskedSum(PARAMS, SHAPES)
    restored.load(loaded)
    for p, state, weight in zip(participants[1:], states[1:], WEIGHTS[1:], strict=False):
        upload(p, restored, state, weight)
    reference = expected(states, WEIGHTS[:3])
    for name, tensor in restored.decode(sum(WEIGHTS[:3])).items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=0)
    # state() is a copy: folding more does not change what was taken.
    before = total.state()
    upload(participants[1], total, states[1], 1)
    assert not np.array_equal(
        before["head.layers.0.q_proj.lora_A"], total.state()["head.layers.0.q_proj.lora_A"]
    )
    with pytest.raises(InvalidArgumentError, match="differ"):
        restored.load({})
    with pytest.raises(InvalidArgumentError, match="uint64"):
        restored.load({n: t.view(np.int64) for n, t in loaded.items()})
    with pytest.raises(InvalidArgumentError, match="shape"):
        restored.load({n: t.reshape(-1) for n, t in loaded.items()})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"federation": "", "round": 1},
        {"federation": "f", "round": -1},
        {"federation": "f", "round": 2**64},
        {"federation": "f", "round": 1, "scale": 0.5},
        {"federation": "f", "round": 1, "scale": float("inf")},
        {"federation": "f", "round": 1, "min_survivors": 1},
    ],
)
def test_params_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="SecAggParams"):
        SecAggParams(**kwargs)  # type: ignore[arg-type]
