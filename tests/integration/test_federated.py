"""Federated rounds with real processes: a backbone, an aggregator and client processes
(`splitfed train` with a [federated] section), all over mTLS."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from backbone_kit import SERVER_NAME as BACKBONE_NAME
from federated_kit import Federation, federation, split_dataset
from helpers import wait_until
from safetensors import safe_open
from safetensors.torch import load_file

from splitfed.clients.backbone import BackboneClient
from splitfed.errors import PermissionDeniedError
from splitfed.services.backbone.store import DirectoryStore
from splitfed.tls import TLSConfig
from splitfed.transport import create_channel


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[Federation]:
    deployment = federation(tmp_path)
    yield deployment
    deployment.stop()


def test_three_clients_three_rounds_global_is_the_sample_weighted_average(
    fed: Federation,
) -> None:
    names = ["hospital-a", "hospital-b", "bank-c"]
    data = split_dataset(fed.root, [6, 10, 16])
    processes = [
        fed.run_client(fed.client_config(name, path), name)
        for name, path in zip(names, data, strict=True)
    ]
    for name, process in zip(names, processes, strict=True):
        assert process.wait(timeout=300) == 0, (fed.root / f"{name}.log").read_text()[-3000:]
    previous: dict[str, torch.Tensor] = {}
    for round_ in (1, 2, 3):
        uploads = [fed.updates(name)[f"round{round_}-attempt1"] for name in names]
        total = sum(samples for _, samples in uploads)
        offset = fed.version(round_)
        assert offset.keys() == uploads[0][0].keys()
        for tensor_name, value in offset.items():
            expected = sum(delta[tensor_name] * samples for delta, samples in uploads) / total
            before = previous.get(tensor_name, torch.zeros_like(value))
            torch.testing.assert_close(value - before, expected, rtol=1e-5, atol=1e-6)
        previous = offset
    assert not (fed.root / "aggregator-state" / "fed" / "sum.safetensors").exists()
    log = (fed.root / "hospital-a.log").read_text()
    assert "federation finished at version 3 after 3 round(s)" in log


def _state(fed: Federation) -> dict[str, Any]:
    path = fed.root / "aggregator-state" / "fed" / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _contributors(fed: Federation, version: int) -> dict[str, int]:
    path = fed.root / "aggregator-state" / "fed" / "versions" / f"v{version}.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        return {k: int(v) for k, v in json.loads(handle.metadata()["contributors"]).items()}


def _check_round(fed: Federation, version: int, names: list[str], previous: dict[str, Any]) -> None:
    uploads = [fed.updates(name)[f"round{version}-attempt1"] for name in names]
    total = sum(samples for _, samples in uploads)
    for tensor_name, value in fed.version(version).items():
        expected = sum(delta[tensor_name] * samples for delta, samples in uploads) / total
        before = previous.get(tensor_name, torch.zeros_like(value))
        torch.testing.assert_close(value - before, expected, rtol=1e-5, atol=1e-6)


def _stored_sum(fed: Federation) -> tuple[dict[str, int], dict[str, torch.Tensor]] | None:
    """The aggregator's stored running sum and its contributors, if there is one."""
    sum_file = fed.root / "aggregator-state" / "fed" / "sum.safetensors"
    try:
        with safe_open(str(sum_file), framework="pt") as handle:
            meta = json.loads(handle.metadata()["contributors"])
            stored = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except (FileNotFoundError, OSError, KeyError):
        return None
    return meta, stored


def _running_sum_with_one_update(
    fed: Federation, processes: list[Any]
) -> tuple[dict[str, int], dict[str, torch.Tensor]] | None:
    """What the aggregator stores with exactly one of the two clients' updates in: both
    clients are held (SIGSTOP) while still training, then one is let go until its update
    is counted, and the stored sum is read while the other is still held."""
    for process in processes:
        os.kill(process.pid, signal.SIGSTOP)
    try:
        snapshot = _stored_sum(fed)
        if snapshot is None:
            os.kill(processes[0].pid, signal.SIGCONT)
            wait_until(lambda: _stored_sum(fed) is not None, timeout_s=120)
            snapshot = _stored_sum(fed)
        return snapshot
    finally:
        for process in processes:
            os.kill(process.pid, signal.SIGCONT)


# make test-long (both variants): the reveal of a dead client's masks is unit-tested
# (tests/unit/test_secagg.py), the rounds' deadlines in tests/unit/test_aggregator_rounds.py.
@pytest.mark.long
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure-aggregation"])
def test_a_client_killed_mid_round_does_not_block_the_round(tmp_path: Path, secure: bool) -> None:
    fed = federation(
        tmp_path,
        rounds=1,
        min_clients=2,
        start_clients=3,
        deadline_s=8.0,
        secure_aggregation=secure,
    )
    try:
        names = ["a", "b", "c"]
        data = split_dataset(fed.root, [8, 8, 8])
        processes = [
            fed.run_client(fed.client_config(n, p, max_steps=1000), n)
            for n, p in zip(names, data, strict=True)
        ]
        assert wait_until(lambda: _state(fed).get("phase") == "upload", timeout_s=120)
        processes[2].kill()  # selected, still training: it never uploads
        partial = _running_sum_with_one_update(fed, processes[:2]) if secure else None
        for name, process in zip(names[:2], processes[:2], strict=True):
            assert process.wait(timeout=300) == 0, (fed.root / f"{name}.log").read_text()[-3000:]
        assert set(_contributors(fed, 1)) == {"a", "b"}
        _check_round(fed, 1, ["a", "b"], {})  # with secure aggregation: c's masks removed
        if secure:
            # What the aggregator held with one of the two updates in is masked: read as
            # fixed point it is noise, nothing like that client's weighted update.
            assert partial is not None and len(partial[0]) == 1, partial and partial[0]
            _, stored = partial
            for name in ("a", "b"):
                delta, samples = fed.updates(name)["round1-attempt1"]
                for tensor_name, masked in stored.items():
                    plain = masked.view(torch.int64).double() / float(2**24) / samples
                    gap = (plain - delta[tensor_name].double()).abs().max()
                    assert gap > 1e3, (name, tensor_name)
    finally:
        fed.stop()


@pytest.mark.long  # make test runs its superset, tests/integration/test_chaos.py
def test_an_aggregator_killed_mid_round_loses_and_doubles_nothing(tmp_path: Path) -> None:
    fed = federation(tmp_path, rounds=2, min_clients=3)
    try:
        names = ["a", "b", "c"]
        data = split_dataset(fed.root, [5, 9, 13])
        processes = [
            fed.run_client(fed.client_config(n, p), n) for n, p in zip(names, data, strict=True)
        ]
        sum_file = fed.root / "aggregator-state" / "fed" / "sum.safetensors"
        assert wait_until(sum_file.is_file, timeout_s=180)
        assert fed.aggregator is not None
        os.kill(fed.aggregator.pid, signal.SIGKILL)  # an update is counted, others are not
        fed.aggregator.stop()
        fed.start_aggregator()
        for name, process in zip(names, processes, strict=True):
            assert process.wait(timeout=300) == 0, (fed.root / f"{name}.log").read_text()[-3000:]
        assert _contributors(fed, 1) == {n: s for n, s in zip(names, [5, 9, 13], strict=True)}
        _check_round(fed, 1, names, {})
        _check_round(fed, 2, names, fed.version(1))
        for name in names:  # exactly one update per round from each client
            assert sorted(fed.updates(name)) == ["round1-attempt1", "round2-attempt1"]
    finally:
        fed.stop()


# make test-long: the README session test averages server-side adapters (one backbone)
# in make test.
@pytest.mark.long
def test_server_side_adapters_are_averaged_across_backbone_replicas(tmp_path: Path) -> None:
    """Server-hierarchical: two backbone replicas, each with its clients' body adapters;
    after every round each session holds the sample-weighted average."""
    fed = federation(tmp_path, replicas=2, rounds=1, min_clients=3, server_adapters=True)
    try:
        names = ["a", "b", "c"]
        data = split_dataset(fed.root, [6, 10, 16])
        processes = [
            fed.run_client(fed.client_config(n, p, replica=1 if n == "c" else 0), n)
            for n, p in zip(names, data, strict=True)
        ]
        for name, process in zip(names, processes, strict=True):
            assert process.wait(timeout=300) == 0, (fed.root / f"{name}.log").read_text()[-3000:]
        sessions = {}  # member -> (backbone address, session id), from the backbones' stores
        for dep in (fed.backbone, *fed.replicas):
            for record in DirectoryStore(dep.root / "state").records():
                assert record.federation == "fed"
                sessions[record.owner.removeprefix("client/")] = (dep.address, record.session_id)
        assert set(sessions) == set(names)
        assert "server_sessions" not in _state(fed)  # session ids are not kept in state.json
        assert {address for address, _ in sessions.values()} == {
            fed.backbone.address,
            fed.replicas[0].address,
        }
        body = load_file(
            str(fed.root / "aggregator-state" / "fed" / "versions" / "v1.body.safetensors")
        )
        aggregator = fed.backbone.ca.issue("aggregator-0", "aggregator")
        assert aggregator.key_pem is not None
        tls = TLSConfig(fed.backbone.ca.cert_pem, aggregator.cert_pem, aggregator.key_pem)
        for name, (address, session_id) in sessions.items():
            with create_channel(address, tls, server_name=BACKBONE_NAME) as channel:
                held = BackboneClient(channel).export_adapter(
                    session_id, federation="fed", owner=name
                )
            assert held.keys() == body.keys()
            for tensor_name, value in held.items():
                torch.testing.assert_close(value, body[tensor_name])
        # Another aggregator identity, or a client, may not touch a federated session.
        intruder = fed.backbone.ca.issue("aggregator-9", "aggregator")
        assert intruder.key_pem is not None
        bad = TLSConfig(fed.backbone.ca.cert_pem, intruder.cert_pem, intruder.key_pem)
        address, session_id = sessions["a"]
        with (
            create_channel(address, bad, server_name=BACKBONE_NAME) as channel,
            pytest.raises(PermissionDeniedError),
        ):
            BackboneClient(channel).export_adapter(session_id, federation="fed", owner="a")
    finally:
        fed.stop()
