"""A federation's rounds without gRPC: selection, deadlines, retries, late/stale/duplicate
uploads, restarts, and the strategies' math."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from aggregator_kit import SHAPES, deltas, settings, upload

from splitfed.errors import FailedPreconditionError, InvalidArgumentError, PermissionDeniedError
from splitfed.services.aggregator.federation import Federation
from splitfed.services.aggregator.settings import AggregatorSettings
from splitfed.services.aggregator.strategies import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedExP,
    make_strategy,
)
from splitfed.v1 import aggregator_pb2


def test_a_round_averages_by_samples_and_moves_on(tmp_path: Path) -> None:
    fed = Federation(settings(), tmp_path)
    fed.join("a", 100)
    assert fed.state.phase == "waiting"
    fed.join("b", 100)
    assert fed.state.phase == "upload" and fed.state.selected == ["a", "b"]
    assert upload(fed, "a", deltas(1), 1) == (False, 1)
    assert upload(fed, "a", deltas(9), 1) == (True, 1)  # duplicate: idempotent, ignored
    upload(fed, "b", deltas(2), 3)
    assert (fed.state.round, fed.state.version) == (2, 1)
    for name, value in fed.offset(1).items():
        expected = (deltas(1)[name] * 1 + deltas(2)[name] * 3) / 4
        torch.testing.assert_close(value, expected)
    # Stale (trained from version 0) and late (round 1) uploads are refused.
    with pytest.raises(FailedPreconditionError, match="stale"):
        upload(fed, "a", deltas(3), 1, base=0)
    with pytest.raises(FailedPreconditionError, match="round 2"):
        fed.begin_upload("a", 1, 1, 1, 1)
    with pytest.raises(PermissionDeniedError):
        fed.begin_upload("mallory", 2, 1, 1, 1)


def test_a_close_that_fails_leaves_the_sum_for_the_next_try(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from splitfed.services.aggregator import persistence as module

    fed = Federation(settings(), tmp_path)
    fed.join("a", 100)
    fed.join("b", 100)
    upload(fed, "a", deltas(1), 1)
    real = module.write_tensors_streamed

    def full_disk(path: Path, schema: object, tensors: object, metadata: object) -> None:
        for _ in tensors:  # type: ignore[attr-defined]
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "write_tensors_streamed", full_disk)
    with pytest.raises(OSError, match="No space"):
        upload(fed, "b", deltas(2), 3)
    assert (fed.state.round, fed.state.version) == (1, 0)
    assert fed.contributors == {"a": 1, "b": 3}  # both counted, once
    monkeypatch.setattr(module, "write_tensors_streamed", real)
    fed.tick()
    assert (fed.state.round, fed.state.version) == (2, 1)
    for name, value in fed.offset(1).items():
        torch.testing.assert_close(value, (deltas(1)[name] + deltas(2)[name] * 3) / 4)


def test_streamed_writes_keep_to_their_schema(tmp_path: Path) -> None:
    import numpy as np

    from splitfed.services.aggregator.files import read_tensors, write_tensors_streamed

    schema = {"a": ((2,), np.dtype(np.float32)), "b": ((3,), np.dtype(np.float32))}
    ones = np.ones(2, np.float32)
    cases = [
        ([("b", np.ones(3, np.float32)), ("a", ones)], "not the next one"),
        ([("a", np.ones(3, np.float32))], "not the next one"),
        ([("a", ones)], "'b' of the schema was not given"),
        ([("a", ones.astype(np.float64))], "not the next one"),
    ]
    for tensors, message in cases:
        with pytest.raises(ValueError, match=message):
            write_tensors_streamed(tmp_path / "x.safetensors", schema, tensors, {})
        assert list(tmp_path.iterdir()) == []  # nothing left behind
    write_tensors_streamed(
        tmp_path / "x.safetensors", schema, [("a", ones), ("b", np.zeros(3, np.float32))], {}
    )
    got, _ = read_tensors(tmp_path / "x.safetensors")
    assert got["a"].tolist() == [1, 1] and got["b"].tolist() == [0, 0, 0]


def test_mismatched_updates_and_bad_dtypes_are_refused(tmp_path: Path) -> None:
    fed = Federation(settings(), tmp_path)
    fed.join("a", 100)
    fed.join("b", 100)
    upload(fed, "a", deltas(1), 1)
    with pytest.raises(InvalidArgumentError, match="lacks 1 tensor"):
        upload(fed, "b", {"a.lora_A.weight": torch.zeros(2, 3)}, 1)
    with pytest.raises(InvalidArgumentError, match="not in the federation's schema"):
        upload(fed, "b", {"x": torch.zeros(2)}, 1)
    with pytest.raises(InvalidArgumentError, match=r"shape \[3, 2\]"):
        upload(fed, "b", {"a.lora_A.weight": torch.zeros(3, 2)}, 1)
    with pytest.raises(InvalidArgumentError, match="float32"):
        upload(fed, "b", {"x": torch.zeros(2, dtype=torch.float64)}, 1)
    assert fed.contributors == {"a": 1}  # nothing of b's counted


def test_deadline_retries_below_the_minimum_and_closes_above(tmp_path: Path) -> None:
    fed = Federation(settings(min_clients=2, start_clients=3), tmp_path)
    for who in "abc":
        fed.join(who, 100)
    upload(fed, "a", deltas(1), 1)
    fed.tick(fed.state.deadline + 1)
    assert (fed.state.round, fed.state.attempt) == (1, 2)
    assert "1 of min 2 updates" in fed.state.message
    upload(fed, "a", deltas(1), 1)
    upload(fed, "b", deltas(2), 1)
    fed.tick(fed.state.deadline + 1)  # c dropped: two updates are enough
    assert fed.state.version == 1 and fed.state.history[-1]["contributors"] == {"a": 1, "b": 1}


def test_a_restart_continues_the_round(tmp_path: Path) -> None:
    fed = Federation(settings(min_clients=3), tmp_path)
    for who in "abc":
        fed.join(who, 100)
    upload(fed, "a", deltas(1), 2)
    upload(fed, "b", deltas(2), 1)
    again = Federation(settings(min_clients=3), tmp_path)
    assert again.contributors == {"a": 2, "b": 1}
    assert upload(again, "b", deltas(2), 1)[0]  # counted before the restart: duplicate
    upload(again, "c", deltas(3), 1)
    for name, value in again.offset(1).items():
        expected = (2 * deltas(1)[name] + deltas(2)[name] + deltas(3)[name]) / 4
        torch.testing.assert_close(value, expected)


def test_a_restart_after_every_update_was_counted_closes_the_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by `make chaos`: killed after the round's last update was counted and before
    the close was written, the aggregator closes the round as it starts again (it failed
    to start: the close notified waiters without holding the federation's lock)."""
    from splitfed.services.aggregator import persistence as module

    fed = Federation(settings(), tmp_path)
    fed.join("a", 100)
    fed.join("b", 100)
    upload(fed, "a", deltas(1), 1)

    def killed(path: Path, schema: object, tensors: object, metadata: object) -> None:
        raise SystemExit("killed while writing the version")

    monkeypatch.setattr(module, "write_tensors_streamed", killed)
    with pytest.raises(SystemExit):
        upload(fed, "b", deltas(2), 3)
    monkeypatch.undo()
    again = Federation(settings(), tmp_path)
    assert (again.state.round, again.state.version) == (2, 1)
    for name, value in again.offset(1).items():
        torch.testing.assert_close(value, (deltas(1)[name] + deltas(2)[name] * 3) / 4)


def test_the_plan_on_the_wire_in_each_phase(tmp_path: Path) -> None:
    """The protobuf plan (and a watch's counts) the servicer sends, field by field,
    through every phase of a securely aggregated round, for participants and others."""
    fed = Federation(
        settings(secure_aggregation=True, rounds=1, start_clients=3, members=("a", "b", "c", "d")),
        tmp_path,
    )
    keys = {who: bytes([ord(who)]) * 32 for who in "abc"}
    peers = [aggregator_pb2.Peer(identity=who, public_key=key) for who, key in keys.items()]

    def wire(who: str, member: bool = True) -> tuple[aggregator_pb2.RoundPlan, int, int]:
        view = fed.plan(who, member=member)
        return view.plan.to_proto(), view.received, view.participants

    def expected(**fields: object) -> aggregator_pb2.RoundPlan:
        values: dict[str, object] = {
            "federation": "fed",
            "round": 1,
            "attempt": 1,
            "local_steps": 10,
            "deadline": fed.state.deadline,
            "secure_aggregation": True,
            "secagg_scale": float(2**24),
            "rounds": 1,
            "schema_digest": fed.schema_digest,
        }
        values.update(fields)
        return aggregator_pb2.RoundPlan(**values)  # type: ignore[arg-type]

    fed.join("a", 10)
    assert wire("a") == (expected(phase=aggregator_pb2.ROUND_PHASE_WAITING, deadline=0.0), 0, 0)
    fed.join("b", 10)
    fed.join("c", 10)
    keys_phase = aggregator_pb2.ROUND_PHASE_KEYS
    assert wire("a") == (expected(phase=keys_phase, selected=True), 0, 3)
    assert wire("d") == (expected(phase=keys_phase), 0, 3)
    for who, key in keys.items():
        fed.advertise_key(who, 1, 1, key)
    upload_phase = aggregator_pb2.ROUND_PHASE_UPLOAD
    assert wire("a") == (expected(phase=upload_phase, selected=True, peers=peers), 0, 3)
    assert wire("admin", member=False) == (expected(phase=upload_phase), 0, 3)
    for who in "ab":
        upload(
            fed, who, {n: torch.zeros(shape, dtype=torch.int64) for n, shape in SHAPES.items()}, 10
        )
    fed.tick(fed.state.deadline + 1)
    reveal = {"phase": aggregator_pb2.ROUND_PHASE_REVEAL, "selected": True, "peers": peers}
    assert wire("a") == (expected(**reveal, uploaded=True, dropped=["c"]), 2, 3)
    assert wire("c") == (expected(**reveal, dropped=["c"]), 2, 3)
    assert wire("d") == (expected(phase=aggregator_pb2.ROUND_PHASE_REVEAL), 2, 3)
    for who in "ab":
        fed.reveal(who, 1, 1, {"c": keys[who]})
    finished = {"phase": aggregator_pb2.ROUND_PHASE_FINISHED, "round": 2, "global_version": 1}
    assert wire("a") == (expected(**finished, selected=True), 0, 3)
    assert wire("admin", member=False) == (expected(**finished), 0, 3)


def fedexp_offset(
    updates: list[tuple[dict[str, torch.Tensor], int]],
) -> tuple[dict[str, torch.Tensor], float]:
    """FedExP's first version by hand: eta x the sample-weighted average delta, and eta."""
    total = sum(n for _, n in updates)
    average = {name: sum(d[name] * n for d, n in updates) / total for name in SHAPES}
    update_sq = sum(n / total * sum(float((t**2).sum()) for t in d.values()) for d, n in updates)
    average_sq = sum(float((t**2).sum()) for t in average.values())
    eta = max(1.0, update_sq / (2 * (average_sq + 1e-6)))
    return {name: eta * t for name, t in average.items()}, eta


def test_fedexp_steps_by_how_much_the_updates_disagree(tmp_path: Path) -> None:
    # Updates that partly cancel, as non-IID clients' do.
    against = {name: 0.3 * t - deltas(1)[name] for name, t in deltas(2).items()}
    updates = [(deltas(1), 2), (against, 1), (deltas(3), 1)]
    expected, eta = fedexp_offset(updates)
    assert 1 < eta < 10  # an extrapolated step, below the cap
    fed = Federation(settings(min_clients=3, strategy="fedexp"), tmp_path / "one")
    for who in "abc":
        fed.join(who, 100)
    for who, (tensors, samples) in zip("abc", updates, strict=True):
        upload(fed, who, tensors, samples)
    for name, value in fed.offset(1).items():
        torch.testing.assert_close(value, expected[name])
    assert fed.state.history[-1]["step_scale"] == pytest.approx(eta, rel=1e-5)
    # An aggregator restarted mid-round keeps the updates' norms with their sum.
    fed = Federation(settings(min_clients=3, strategy="fedexp"), tmp_path / "two")
    for who in "abc":
        fed.join(who, 100)
    upload(fed, "a", *updates[0])
    upload(fed, "b", *updates[1])
    again = Federation(settings(min_clients=3, strategy="fedexp"), tmp_path / "two")
    upload(again, "c", *updates[2])
    for name, value in again.offset(1).items():
        torch.testing.assert_close(value, expected[name])
    # Identical updates: eta 1, i.e. FedAvg.
    fed = Federation(settings(strategy="fedexp"), tmp_path / "same")
    for who in "ab":
        fed.join(who, 100)
    upload(fed, "a", deltas(4), 1)
    upload(fed, "b", deltas(4), 5)
    assert fed.state.history[-1]["step_scale"] == 1.0
    for name, value in fed.offset(1).items():
        torch.testing.assert_close(value, deltas(4)[name])


def test_strategies() -> None:
    offset = {"w": torch.tensor([1.0, -1.0])}
    delta = {"w": torch.tensor([0.5, 0.5])}
    assert torch.equal(FedAvg().step(offset, delta, {})["w"], torch.tensor([1.5, -0.5]))
    state: dict[str, torch.Tensor] = {}
    momentum = FedAvgM(server_lr=0.5, momentum=0.9)
    first = momentum.step(offset, delta, state)
    second = momentum.step(first, delta, state)
    torch.testing.assert_close(second["w"], first["w"] + 0.5 * (0.9 * 0.5 + 0.5))
    adam, state = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3), {}
    out = adam.step(offset, delta, state)
    m, v = 0.1 * 0.5, 0.01 * 0.25
    torch.testing.assert_close(out["w"], offset["w"] + 0.1 * m / (v**0.5 + 1e-3))
    exp = FedExP(epsilon=0.0, max_scale=4.0)
    assert exp.scale(0.0, 0.0) == 1.0  # no update moved: FedAvg's (empty) step
    assert exp.scale(1.0, 1.0) == 1.0  # identical updates: |avg|^2 = mean |update|^2
    assert exp.scale(3.0, 0.5) == 3.0
    assert exp.scale(3.0, 0.1) == 4.0 and exp.scale(1.0, 0.0) == 4.0  # capped
    state = {"scale": torch.tensor([3.0], dtype=torch.float64)}
    torch.testing.assert_close(exp.step(offset, delta, state)["w"], torch.tensor([2.5, 0.5]))
    assert torch.equal(exp.step(offset, delta, {})["w"], torch.tensor([1.5, -0.5]))
    with pytest.raises(ValueError, match="fedexp needs"):
        make_strategy("fedexp", {"max_scale": 0.5})
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("fedsgd")
    with pytest.raises(ValueError, match="fedavgm"):
        make_strategy("fedavgm", {"momentum": 1.5})


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="federation name"):
        settings(name="Bad Name")
    with pytest.raises(ValueError, match="secure aggregation needs min_clients >= 2"):
        settings(min_clients=1, secure_aggregation=True)
    with pytest.raises(ValueError, match=r"fedexp.*secure aggregation hides"):
        settings(strategy="fedexp", secure_aggregation=True)
    with pytest.raises(ValueError, match="server_adapters needs"):
        settings(server_adapters=True)
    with pytest.raises(ValueError, match="at least one federation"):
        AggregatorSettings(state_dir=Path("x"))
    with pytest.raises(ValueError, match="unique"):
        AggregatorSettings(state_dir=Path("x"), federations=(settings(), settings()))
