"""Hostile members of a federation against the real services over mTLS (issue 15): a
backbone process and an aggregator server; every party has a valid certificate of the
deployment. docs/security.md's threat model names these tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from backbone_kit import SERVER_NAME as BACKBONE_NAME
from backbone_kit import Deployment, deployment
from federated_kit import ADAPTER, AGGREGATOR_NAME, federation_schema

from splitfed.clients.backbone import BackboneClient
from splitfed.clients.federated import AggregatorClient
from splitfed.errors import InvalidArgumentError, PermissionDeniedError
from splitfed.protocol.aggregator import RoundPlan
from splitfed.protocol.backbone import SessionRequest
from splitfed.services.aggregator.server import AggregatorServer, build_server
from splitfed.services.aggregator.settings import AggregatorSettings, FederationSettings
from splitfed.serving import ServerSettings
from splitfed.tls import TLSConfig
from splitfed.transport import create_channel
from splitfed.v1 import aggregator_pb2

MEMBERS = ("hospital-a", "hospital-b", "mallory")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # The aggregator may act for federation "fed" only.
    dep = deployment(
        tmp_path_factory.mktemp("hostile-backbone"),
        idle_timeout_s=600.0,
        aggregators=["aggregator-0:fed"],
    )
    dep.start()
    yield dep
    dep.stop()


@dataclass
class Setup:
    backbone: Deployment
    aggregator: AggregatorServer
    root: Path
    channels: list[grpc.Channel]

    def tls(self, name: str, role: str = "client") -> TLSConfig:
        issued = self.backbone.ca.issue(name, role)
        assert issued.key_pem is not None
        return TLSConfig(self.backbone.ca.cert_pem, issued.cert_pem, issued.key_pem)

    def aggregator_client(self, name: str, role: str = "client") -> AggregatorClient:
        channel = create_channel(
            self.aggregator.address, self.tls(name, role), server_name=AGGREGATOR_NAME
        )
        self.channels.append(channel)
        return AggregatorClient(channel, timeout_s=30.0)

    def backbone_client(self, name: str, role: str = "client") -> BackboneClient:
        channel = create_channel(
            self.backbone.address, self.tls(name, role), server_name=BACKBONE_NAME
        )
        self.channels.append(channel)
        return BackboneClient(channel)

    def open_session(self, client: BackboneClient, federation: str = "fed") -> str:
        request = SessionRequest(adapter=ADAPTER, federation=federation)
        return client.open_session(request).session_id

    @property
    def state_dir(self) -> Path:
        return self.root / "aggregator-state" / "fed"


def start(root: Path, dep: Deployment, **federation: object) -> Setup:
    dep.ca.issue("aggregator-0", "aggregator", dns_names=[AGGREGATOR_NAME]).write(root / "tls")
    values: dict[str, object] = {
        "name": "fed",
        "rounds": 2,
        "min_clients": 2,
        "deadline_s": 120.0,
        "adapter_seed": ADAPTER.seed,
        "members": MEMBERS,
        "schema": federation_schema(dep.model_path),
        "max_samples": 1000,
        **federation,
    }
    if values.get("server_adapters"):
        values.setdefault("backbones", [dep.address])
        values.setdefault("backbone_server_name", BACKBONE_NAME)
    settings = AggregatorSettings(
        state_dir=root / "aggregator-state",
        federations=(FederationSettings(**values),),  # type: ignore[arg-type]
    )
    server = build_server(settings, ServerSettings(tls_dir=root / "tls"), listen="127.0.0.1:0")
    return Setup(dep, server.start(), root, [])


@pytest.fixture
def make(backbone: Deployment, tmp_path: Path) -> Iterator[object]:
    setups: list[Setup] = []

    def _make(**federation: object) -> Setup:
        setup = start(tmp_path / f"run{len(setups)}", backbone, **federation)
        setups.append(setup)
        return setup

    yield _make
    for setup in setups:
        for channel in setup.channels:
            channel.close()
        setup.aggregator.stop(0)


def deltas(setup: Setup, value: float = 0.01) -> dict[str, torch.Tensor]:
    schema = federation_schema(setup.backbone.model_path)
    return {name: torch.full(shape, value) for name, shape in schema.items()}


def body_values(client: BackboneClient, session: str, value: float) -> dict[str, torch.Tensor]:
    """Set a session's body adapter to ``value`` everywhere (its owner may); returns it."""
    tensors = {n: torch.full_like(t, value) for n, t in client.export_adapter(session).items()}
    client.import_adapter(session, tensors)
    return tensors


def test_a_member_cannot_name_another_members_session(make, caplog) -> None:  # type: ignore[no-untyped-def]
    """Item 1: an upload naming the victim's backbone session (with a large sample count,
    to pull the victim's body adapter into the average and overwrite it) is refused; the
    round moves only the contributors' own sessions; session ids are never logged whole."""
    caplog.set_level(logging.INFO)
    setup: Setup = make(server_adapters=True)
    victim_bb, mallory_bb = setup.backbone_client("hospital-a"), setup.backbone_client("mallory")
    victim_session = setup.open_session(victim_bb)
    mallory_session = setup.open_session(mallory_bb)
    victim_body = body_values(victim_bb, victim_session, 0.5)
    body_values(mallory_bb, mallory_session, -0.25)
    victim, mallory = setup.aggregator_client("hospital-a"), setup.aggregator_client("mallory")
    plan = victim.join("fed", 10)
    mallory.join("fed", 1000)
    plan = victim.plan("fed")
    assert plan.phase == aggregator_pb2.ROUND_PHASE_UPLOAD
    address = setup.backbone.address
    with pytest.raises(PermissionDeniedError, match="does not confirm"):
        mallory.upload(plan, 1000, deltas(setup), backbone=address, backbone_session=victim_session)
    # A session of the right owner but opened for no (or another) federation is refused too.
    stray = setup.open_session(mallory_bb, federation="")
    with pytest.raises(PermissionDeniedError, match="does not confirm"):
        mallory.upload(plan, 1000, deltas(setup), backbone=address, backbone_session=stray)
    # Honest uploads: each names its own session; the average goes back into those two.
    mallory.upload(plan, 1000, deltas(setup), backbone=address, backbone_session=mallory_session)
    victim.upload(plan, 10, deltas(setup), backbone=address, backbone_session=victim_session)
    assert victim.plan("fed").global_version == 1
    expected = {n: (10 * 0.5 + 1000 * -0.25) / 1010 for n in victim_body}
    for client, session in ((victim_bb, victim_session), (mallory_bb, mallory_session)):
        for name, tensor in client.export_adapter(session).items():
            torch.testing.assert_close(tensor, torch.full_like(tensor, expected[name]))
    # A member that sat the round out loads the same average into its own session.
    late = setup.aggregator_client("hospital-b")
    late.join("fed", 10)
    _, body = late.download("fed", 1, body=True)
    assert body.keys() == victim_body.keys()
    for name, tensor in body.items():
        torch.testing.assert_close(tensor, torch.full_like(tensor, expected[name]))
    # The backbone itself refuses the aggregator for another federation or owner, with the
    # same answer as for a session that does not exist.
    agent = setup.backbone_client("aggregator-0", "aggregator")
    refusals = []
    for session, federation, owner in [
        (victim_session, "fed", "mallory"),
        (victim_session, "other", "hospital-a"),
        ("0" * 24, "fed", "hospital-a"),
    ]:
        with pytest.raises(PermissionDeniedError) as refused:
            agent.export_adapter(session, federation=federation, owner=owner)
        refusals.append(
            str(refused.value).replace(f" {owner} ", " X ").replace(f"'{federation}'", "'F'")
        )
    assert len(set(refusals)) == 1, refusals
    assert agent.check_session(victim_session, "fed", "hospital-a") >= 0
    # Session ids are capabilities: no log line of the aggregator or the backbone has one.
    backbone_log = (setup.backbone.root / "backbone.log").read_text()
    for session in (victim_session, mallory_session):
        assert session not in caplog.text
        assert session not in backbone_log
        assert session not in (setup.state_dir / "state.json").read_text()


def test_membership_is_by_configuration_and_refusals_say_nothing(make) -> None:  # type: ignore[no-untyped-def]
    """Items 3, 6 and 11: a stranger with a valid client certificate cannot join, read
    plans or watch rounds; an unknown federation gets the identical refusal."""
    setup: Setup = make()
    stranger = setup.aggregator_client("stranger")
    refusals = []
    for federation in ("fed", "no-such-federation"):
        for call in (
            lambda f: stranger.join(f, 10),
            stranger.plan,
            stranger.download,
            lambda f: stranger.wait_for_change(RoundPlan(federation=f), timeout_s=5),
        ):
            with pytest.raises(PermissionDeniedError) as refused:
                call(federation)
            refusals.append(str(refused.value).replace(f"'{federation}'", "'F'"))
    assert len(set(refusals)) == 1, set(refusals)
    # A member and an admin read the plan; the admin sees no participants.
    member = setup.aggregator_client("hospital-a")
    member.join("fed", 10)
    setup.aggregator_client("hospital-b").join("fed", 10)
    assert member.plan("fed").selected
    admin = setup.aggregator_client("operator", "admin")
    status = admin.plan("fed")
    assert status.phase == aggregator_pb2.ROUND_PHASE_UPLOAD and not status.selected
    assert list(status.peers) == []


def test_poisoned_updates_are_refused_over_the_wire(make) -> None:  # type: ignore[no-untyped-def]
    """Items 3 and 4: an inflated sample count, a NaN and a tensor named __metadata__
    are refused (INVALID_ARGUMENT); honest updates then close the round as if the
    attacks had never been sent."""
    setup: Setup = make()
    honest, mallory = setup.aggregator_client("hospital-a"), setup.aggregator_client("mallory")
    honest.join("fed", 10)
    plan = mallory.join("fed", 10)
    plan = mallory.plan("fed")
    with pytest.raises(InvalidArgumentError, match="num_samples"):
        mallory.upload(plan, 2**62, deltas(setup))
    poisoned = deltas(setup)
    next(iter(poisoned.values()))[0, 0] = float("nan")
    with pytest.raises(InvalidArgumentError, match="NaN"):
        mallory.upload(plan, 10, poisoned)
    with pytest.raises(InvalidArgumentError, match="not in the federation's schema"):
        mallory.upload(plan, 10, {"__metadata__": torch.zeros(4), **deltas(setup)})
    assert honest.upload(plan, 10, deltas(setup, 0.25)).received == 1
    assert mallory.upload(plan, 10, deltas(setup, 0.75)).received == 2
    version, offset = honest.download("fed")
    assert version == 1
    for tensor in offset.values():
        torch.testing.assert_close(tensor, torch.full_like(tensor, 0.5))
    assert list((setup.state_dir / "spool").iterdir()) == []


def test_one_member_cannot_take_every_server_thread(make) -> None:  # type: ignore[no-untyped-def]
    """Item 6: 16 WatchRound streams of one member (there are 16 server threads) used to
    starve everyone else into DEADLINE_EXCEEDED; now one identity holds at most 3 streams
    and the others still join, plan and upload."""
    setup: Setup = make()
    flooder = setup.aggregator_client("mallory")
    flooder.join("fed", 10)
    stub = flooder._stub
    calls = [
        stub.WatchRound(aggregator_pb2.WatchRoundRequest(federation="fed"), timeout=60)
        for _ in range(16)
    ]
    codes = []
    for call in calls:
        try:
            next(call)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())
    assert codes.count(grpc.StatusCode.OK) == 3, codes
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    honest = setup.aggregator_client("hospital-a")
    plan = honest.join("fed", 10)  # within its 30 s deadline, while mallory's 3 streams stay
    assert honest.plan("fed").phase == aggregator_pb2.ROUND_PHASE_UPLOAD
    plan = honest.plan("fed")
    assert honest.upload(plan, 10, deltas(setup)).received == 1
    for call in calls:
        call.cancel()
