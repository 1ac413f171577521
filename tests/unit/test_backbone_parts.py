"""Backbone internals: the fair compute queue and the session stores (one suite for both)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from splitfed.errors import NotFoundError
from splitfed.services.backbone.compute import ComputeQueue
from splitfed.services.backbone.settings import BackboneSettings
from splitfed.services.backbone.store import (
    DirectoryStore,
    MemoryStore,
    SessionRecord,
    SessionStore,
    Snapshot,
)


def test_queue_takes_sessions_in_turns() -> None:
    queue = ComputeQueue()
    gate = threading.Event()
    order: list[str] = []
    blocker = queue.submit("x", gate.wait)  # keeps the worker busy while we queue
    futures = [queue.submit("a", lambda i=i: order.append(f"a{i}")) for i in range(3)]
    futures += [queue.submit("b", lambda i=i: order.append(f"b{i}")) for i in range(3)]
    gate.set()
    for future in [blocker, *futures]:
        future.result(timeout=10)
    # "a" queued three jobs first, yet "b" is not starved: they alternate.
    assert order == ["a0", "b0", "a1", "b1", "a2", "b2"]
    queue.close()


def test_an_identity_with_many_sessions_gets_no_more_turns_than_one_with_one() -> None:
    queue = ComputeQueue()
    gate = threading.Event()
    order: list[str] = []
    blocker = queue.submit("x", gate.wait)
    # "many" opened four sessions, each with two jobs; "one" has one session.
    futures = [
        queue.submit(f"m{s}", lambda s=s, i=i: order.append(f"m{s}.{i}"), owner="many")
        for i in range(2)
        for s in range(4)
    ]
    futures += [queue.submit("o", lambda i=i: order.append(f"o{i}"), owner="one") for i in range(4)]
    gate.set()
    for future in [blocker, *futures]:
        future.result(timeout=10)
    # Identities alternate; within "many", its sessions take turns.
    assert order[:8] == ["m0.0", "o0", "m1.0", "o1", "m2.0", "o2", "m3.0", "o3"]
    assert sorted(order[8:]) == ["m0.1", "m1.1", "m2.1", "m3.1"]
    queue.close()


def test_queue_runs_one_job_at_a_time_and_reports_errors() -> None:
    queue = ComputeQueue()
    running = 0
    most = 0
    lock = threading.Lock()

    def job() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        threading.Event().wait(0.01)
        with lock:
            running -= 1

    threads = [threading.Thread(target=queue.run, args=(f"s{i}", job)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert most == 1
    with pytest.raises(ZeroDivisionError):
        queue.run("s", lambda: 1 / 0)
    queue.close()


@pytest.fixture(params=["memory", "directory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> SessionStore:
    return MemoryStore() if request.param == "memory" else DirectoryStore(tmp_path / "state")


def snapshot(session: str, step: int) -> Snapshot:
    record = SessionRecord(
        session_id=session,
        owner="client/a",
        k=1,
        m=1,
        adapter={"kind": "lora"},
        optimizer={"learning_rate": 0.1},
        encoding="raw",
        step=step,
        last_result={"backbone_grad_sq_norm": 1.5},
        optimizer_meta={"scalars": {"0.step": 3}},
    )
    return Snapshot(record, {"w": torch.full((2,), float(step))}, {"0.exp_avg": torch.ones(2)})


def test_store_round_trip_replace_and_delete(store: SessionStore) -> None:
    store.save(snapshot("s1", 1))
    store.save(snapshot("s1", 2))
    store.save(snapshot("s2", 5))
    loaded = store.load("s1")
    assert loaded.record.step == 2 and loaded.record.optimizer_meta == {"scalars": {"0.step": 3}}
    assert torch.equal(loaded.adapter["w"], torch.full((2,), 2.0))
    assert {r.session_id for r in store.records()} == {"s1", "s2"}
    store.delete("s1")
    with pytest.raises(NotFoundError):
        store.load("s1")
    store.delete("s1")  # deleting twice is fine


def test_directory_store_survives_a_crash_mid_save(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    store.save(snapshot("s", 1))
    # A crash after writing the next snapshot's files but before switching to it:
    (tmp_path / "s" / ".tmp-step-2").mkdir()
    reopened = DirectoryStore(tmp_path)
    assert reopened.load("s").record.step == 1
    reopened.save(snapshot("s", 2))
    assert reopened.load("s").record.step == 2
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["session.json", "step-2"]


def test_backbone_settings_validate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="adapter_mode must be one of"):
        BackboneSettings(model_path=tmp_path, adapter_mode="both")
    with pytest.raises(ValueError, match="unknown encodings"):
        BackboneSettings(model_path=tmp_path, encodings=("zstd",))
    assert BackboneSettings(model_path=tmp_path).model_id == tmp_path.name
