"""A federation against hostile members (docs/security.md, "Threat model"): membership,
sample caps, non-finite and oversized updates, robust strategies, a schema no upload can
set, and slow uploads under secure aggregation. No gRPC here: the servicer's paths over
mTLS are in tests/integration/test_hostile_federation.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from aggregator_kit import SHAPES, deltas, settings, upload
from safetensors import safe_open
from safetensors.torch import load_file

from splitfed.errors import (
    AbortedError,
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
)
from splitfed.security.secagg import Participant, SecAggParams, mask_range
from splitfed.services.aggregator.federation import Federation, token_digest
from splitfed.services.aggregator.strategies import Median, TrimmedMean


def start(fed: Federation, members: str, samples: int = 10) -> None:
    for who in members:
        fed.join(who, samples)


# --- membership ---------------------------------------------------------------------------


def test_only_configured_members_join(tmp_path: Path) -> None:
    token = "a-long-random-join-token"
    fed = Federation(settings(members=("a",), join_token_sha256=token_digest(token)), tmp_path)
    with pytest.raises(PermissionDeniedError, match="not a member"):
        fed.join("mallory", 10)
    with pytest.raises(PermissionDeniedError, match="not a member"):
        fed.join("mallory", 10, "a-guessed-token")
    fed.join("a", 10)
    fed.join("t", 10, token)  # by the token
    assert fed.is_member("t") and not fed.is_member("mallory")
    assert fed.state.joined == ["a", "t"]
    with pytest.raises(PermissionDeniedError, match="not a member"):
        fed.require_member("mallory")
    # A new token in the config ends the old token's memberships (at the next start).
    again = Federation(
        settings(members=("a",), join_token_sha256=token_digest("another-token")), tmp_path
    )
    assert again.state.joined == ["a"] and not again.is_member("t")
    # Removing a listed member from the config ends its membership too.
    fresh = Federation(settings(members=("b",), join_token_sha256=token_digest(token)), tmp_path)
    assert fresh.state.joined == ["t"]  # t's token is the configured one again
    with pytest.raises(ValueError, match="nobody may join"):
        settings(members=())


def test_a_member_declares_its_samples_and_may_never_claim_more(tmp_path: Path) -> None:
    fed = Federation(settings(max_samples=1000), tmp_path)
    with pytest.raises(InvalidArgumentError, match="declare your dataset's size"):
        fed.join("a", 0)
    with pytest.raises(InvalidArgumentError, match="max_samples"):
        fed.join("a", 1001)
    start(fed, "ab", 10)
    with pytest.raises(FailedPreconditionError, match="may not claim more"):
        fed.join("a", 11)
    fed.join("a", 8)  # lower is fine
    for claimed in (2**62, 11, 9, 0):
        with pytest.raises(InvalidArgumentError, match="num_samples"):
            upload(fed, "a", deltas(1), claimed)
    # The 2**62 samples the attack claimed would have made the global version a's alone.
    upload(fed, "a", deltas(1), 8)
    upload(fed, "b", deltas(2), 10)
    for name, value in fed.offset(1).items():
        torch.testing.assert_close(value, (8 * deltas(1)[name] + 10 * deltas(2)[name]) / 18)


# --- poisoned values ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_update_is_refused_and_the_round_goes_on(tmp_path: Path, bad: float) -> None:
    fed = Federation(settings(), tmp_path)
    start(fed, "ab")
    poisoned = deltas(1)
    poisoned["a.lora_B.weight"][1, 1] = bad
    with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
        upload(fed, "a", poisoned, 10)
    assert fed.contributors == {} and list((tmp_path / "spool").iterdir()) == []
    upload(fed, "a", deltas(1), 10)
    upload(fed, "b", deltas(2), 10)
    assert fed.state.version == 1
    assert all(torch.isfinite(t).all() for t in fed.offset(1).values())


def test_an_aggregate_that_is_not_finite_is_not_published(tmp_path: Path) -> None:
    # Each update is finite; their weighted sum overflows float32.
    fed = Federation(settings(), tmp_path)
    start(fed, "ab")
    huge = {n: torch.full(shape, 3e38) for n, shape in SHAPES.items()}
    upload(fed, "a", huge, 10)
    upload(fed, "b", huge, 10)
    assert fed.state.version == 0 and (fed.state.round, fed.state.attempt) == (1, 2)
    assert "not finite" in fed.state.message
    assert not (tmp_path / "versions" / "v1.safetensors").exists()
    upload(fed, "a", deltas(1), 10)  # the retried attempt works
    upload(fed, "b", deltas(2), 10)
    assert fed.state.version == 1


def test_updates_are_clipped_to_the_configured_norm(tmp_path: Path) -> None:
    fed = Federation(settings(clip_update_norm=1.0), tmp_path)
    start(fed, "ab")
    small = deltas(1, 0.01)  # norm well below 1: unchanged
    large = deltas(2, 1000.0)
    upload(fed, "a", small, 10)
    upload(fed, "b", large, 10)
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in large.values()))
    for name, value in fed.offset(1).items():
        expected = (small[name] + large[name] / float(norm)) / 2
        torch.testing.assert_close(value, expected)
    with pytest.raises(ValueError, match="secure aggregation hides"):
        settings(clip_update_norm=1.0, secure_aggregation=True)


# --- robust strategies --------------------------------------------------------------------


def test_median_and_trimmed_mean_bound_a_poisoned_update(tmp_path: Path) -> None:
    honest = [deltas(seed, 0.1) for seed in (1, 2, 3, 4)]
    attack = {n: torch.full(shape, 1e6) for n, shape in SHAPES.items()}
    updates = [*honest, attack]
    stacked = {n: np.stack([u[n].numpy().reshape(-1) for u in updates]) for n in SHAPES}
    for strategy, options, combine in [
        ("median", {}, Median().combine),
        ("trimmed_mean", {"trim_fraction": 0.2}, TrimmedMean(trim_fraction=0.2).combine),
    ]:
        fed = Federation(
            settings(min_clients=5, strategy=strategy, strategy_options=options),
            tmp_path / strategy,
        )
        start(fed, "abcde")
        for who, update in zip("abcd", honest, strict=True):
            upload(fed, who, update, 10)
        # A restart mid-round keeps the updates kept so far.
        fed = Federation(
            settings(min_clients=5, strategy=strategy, strategy_options=options),
            tmp_path / strategy,
        )
        assert set(fed.contributors) == set("abcd")
        upload(fed, "e", attack, 1)  # sample counts do not weigh in
        assert fed.state.version == 1
        for name, value in fed.offset(1).items():
            expected = torch.from_numpy(combine(stacked[name]).reshape(SHAPES[name]))
            torch.testing.assert_close(value, expected)
            assert float(value.abs().max()) < 1.0  # the attack moved nothing far
        assert list((tmp_path / strategy / "kept").iterdir()) == []  # gone after the close
    # The plain mean is what the attack owns.
    assert float(np.mean(stacked["a.lora_A.weight"], axis=0).max()) > 1e5
    with pytest.raises(ValueError, match="secure aggregation hides"):
        settings(strategy="median", secure_aggregation=True)
    with pytest.raises(ValueError, match="trim_fraction"):
        settings(strategy="trimmed_mean", strategy_options={"trim_fraction": 0.5})


# --- the schema ---------------------------------------------------------------------------


def test_the_schema_comes_from_the_config_never_from_an_upload(tmp_path: Path) -> None:
    fed = Federation(settings(), tmp_path)
    start(fed, "ab")
    # Today's attack: a first upload that names a tensor "__metadata__" sets the round's
    # schema, makes every honest upload "differ" and the version file unreadable.
    hostile = {"__metadata__": torch.zeros(2), **deltas(1)}
    with pytest.raises(InvalidArgumentError, match="not in the federation's schema"):
        upload(fed, "a", hostile, 10)
    with pytest.raises(InvalidArgumentError, match="not in the federation's schema"):
        upload(fed, "a", {"x": torch.zeros(7)}, 10)
    upload(fed, "b", deltas(2), 10)  # an honest member is not affected
    upload(fed, "a", deltas(1), 10)
    assert fed.state.version == 1
    version = tmp_path / "versions" / "v1.safetensors"
    with safe_open(str(version), framework="pt") as handle:  # the library reads it
        assert sorted(handle.keys()) == sorted(SHAPES)
        assert json.loads(handle.metadata()["contributors"]) == {"a": 10, "b": 10}
    assert sorted(load_file(str(version))) == sorted(SHAPES)
    Federation(settings(), tmp_path)  # and a restart works
    # A changed schema is refused at start: it would mix two adapters' tensors.
    with pytest.raises(ValueError, match="schema differs from the tensors of its version 1"):
        Federation(settings(schema={"other": [4]}), tmp_path)
    for bad in ("__metadata__", "", "a b", "x" * 300, "-x", "a/b"):
        with pytest.raises(ValueError, match="not allowed"):
            settings(schema={bad: [2]})


def test_the_writer_refuses_reserved_and_odd_names(tmp_path: Path) -> None:
    from splitfed.services.aggregator.files import write_tensors

    for bad in ("__metadata__", "a\nb", "../x"):
        with pytest.raises(ValueError, match="not allowed"):
            write_tensors(tmp_path / "x.safetensors", {bad: np.zeros(2, np.float32)}, {})
    assert list(tmp_path.iterdir()) == []


# --- plans: need to know ------------------------------------------------------------------


def test_only_participants_see_peers_and_dropouts(tmp_path: Path) -> None:
    fed = Federation(settings(secure_aggregation=True, sample_fraction=0.5), tmp_path)
    start(fed, "abcd")
    selected = fed.state.selected
    assert len(selected) == 2
    outsider = next(m for m in "abcd" if m not in selected)
    for who in selected:
        fed.advertise_key(who, 1, 1, bytes(range(32)) if who == selected[0] else bytes(32))
    assert fed.state.phase == "upload"
    assert {peer.identity for peer in fed.plan(selected[0]).plan.peers} == set(selected)
    assert fed.plan(outsider).plan.peers == ()
    status = fed.plan("admin", member=False)
    assert status.plan.peers == () and not status.plan.selected and status.received == 0


# --- secure aggregation: a slow upload ------------------------------------------------------


SCALE = float(2**24)


def secure_round(tmp_path: Path) -> tuple[Federation, dict[str, Participant]]:
    fed = Federation(
        settings(secure_aggregation=True, min_clients=2, start_clients=3, members=("a", "b", "c")),
        tmp_path,
    )
    start(fed, "abc")
    params = SecAggParams("fed", 1, scale=SCALE)
    people = {who: Participant(who, params) for who in "abc"}
    for who, person in people.items():
        fed.advertise_key(who, 1, 1, person.public_key)
    keys = {who: bytes.fromhex(key) for who, key in fed.state.keys.items()}
    for person in people.values():
        person.set_peers(keys)
    return fed, people


def masked(person: Participant, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        n: torch.from_numpy(person.encode_and_mask(n, t, 10.0).view("int64").reshape(t.shape))
        for n, t in update.items()
    }


def reconstruct(
    spooled: dict[str, np.ndarray], victim: str, seeds: dict[str, bytes]
) -> dict[str, np.ndarray]:
    """What an aggregator holding ``victim``'s masked upload and the seeds the survivors
    revealed for it can compute: ``victim``'s update in the clear."""
    out = {}
    for name, values in spooled.items():
        plain = values.astype(np.uint64).copy()
        for peer, seed in seeds.items():
            mask = mask_range(seed, name, 0, plain.size)
            # The victim added the pair's mask if it sorts first, else subtracted it.
            plain = plain - mask if victim < peer else plain + mask
        out[name] = plain.view(np.int64).astype(np.float64) / (SCALE * 10.0)
    return out


def test_a_slow_upload_is_destroyed_before_any_seed_is_revealed(tmp_path: Path) -> None:
    fed, people = secure_round(tmp_path)
    for who in "ab":
        upload(fed, who, masked(people[who], deltas(ord(who))), 10)
    # c's upload has arrived whole, its commit has not run yet, and the deadline fires.
    slow = fed.begin_upload("c", 1, 1, 0, 10)
    assert slow is not None
    secret = masked(people["c"], deltas(99))
    for name, tensor in secret.items():
        slow.write(name, tensor)
    spool = slow.spool.path
    slow.writer.out.flush()
    assert spool.stat().st_size > 0
    captured = {  # what the aggregator held of c before the fix
        name: np.fromfile(spool, dtype=np.uint64, count=t.numel(), offset=o)
        for name, t, o in ((t.name, secret[t.name], t.offset) for t in slow.spool.tensors)
    }
    fed.tick(fed.state.deadline + 1)
    assert fed.state.phase == "reveal" and fed.state.dropped == ["c"]
    # Counted or destroyed before anyone is asked for seeds: here destroyed.
    assert slow.state == "discarded" and not spool.exists()
    assert list((tmp_path / "spool").iterdir()) == []
    with pytest.raises(AbortedError, match="discarded"):
        fed.commit_upload(slow)
    fed.end_upload(slow)
    seeds = {who: people[who].reveal(["c"])["c"] for who in "ab"}
    for who in "ab":
        fed.reveal(who, 1, 1, {"c": seeds[who]})
    assert fed.state.version == 1 and fed.state.history[-1]["contributors"] == {"a": 10, "b": 10}
    # The reconstruction works on what was captured before the deadline (the attack the
    # fix prevents) and has nothing to work on afterwards: no file of the aggregator
    # holds c's masked bytes.
    clear = reconstruct(captured, "c", seeds)
    for name, value in clear.items():
        np.testing.assert_allclose(value, deltas(99)[name].numpy().reshape(-1), atol=1e-6)
    needle = captured["a.lora_A.weight"].tobytes()[:16]
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or needle not in path.read_bytes(), path


def test_an_upload_complete_when_the_deadline_fires_is_counted(tmp_path: Path) -> None:
    fed, people = secure_round(tmp_path)
    upload(fed, "a", masked(people["a"], deltas(1)), 10)
    upload(fed, "b", masked(people["b"], deltas(2)), 10)
    # c's bytes are all spooled and its commit is waiting for the federation's lock.
    slow = fed.begin_upload("c", 1, 1, 0, 10)
    assert slow is not None
    for name, tensor in masked(people["c"], deltas(3)).items():
        slow.write(name, tensor)
    slow.finish()
    fed.tick(fed.state.deadline + 1)
    # Counted at the deadline: the round closed with everyone, nobody dropped, no seed
    # revealed.
    assert fed.state.version == 1 and fed.state.dropped == []
    assert fed.commit_upload(slow) == (False, 3)  # its answer: counted
    fed.end_upload(slow)
    for name, value in fed.offset(1).items():
        expected = (deltas(1)[name] + deltas(2)[name] + deltas(3)[name]) / 3
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)


def test_one_upload_at_a_time_per_member(tmp_path: Path) -> None:
    fed = Federation(settings(), tmp_path)
    start(fed, "ab")
    first = fed.begin_upload("a", 1, 1, 0, 10)
    assert first is not None
    with pytest.raises(FailedPreconditionError, match="already in progress"):
        fed.begin_upload("a", 1, 1, 0, 10)
    fed.end_upload(first)  # given up: discarded, and a new one may start
    assert not first.spool.path.exists()
    assert upload(fed, "a", deltas(1), 10) == (False, 1)


def test_the_aggregators_streams_fit_its_worker_threads(tmp_path: Path) -> None:
    from splitfed.cli.configs import AggregatorConfig
    from splitfed.services.aggregator.settings import stream_slots

    assert stream_slots(16, 2) == 10  # 4 threads free, 2 for the diagnostics echo
    with pytest.raises(ValueError, match="max_workers"):
        stream_slots(6, 2)
    aggregator = {
        "state_dir": str(tmp_path),
        "federations": [{"name": "fed", "members": ["a"], "schema": {"w": [2]}}],
    }
    config = AggregatorConfig.from_mapping(
        {"aggregator": aggregator, "diagnostics": {"max_tensor_bytes": 1 << 20}}
    )
    assert config.diagnostics.max_tensor_bytes == 1 << 20
    with pytest.raises(ValueError, match="max_workers"):
        AggregatorConfig.from_mapping(
            {"aggregator": aggregator, "server": {"max_workers": 5}, "diagnostics": {}}
        )
