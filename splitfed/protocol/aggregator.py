"""The contract of splitfed.v1.Aggregator (protos/splitfed/v1/aggregator.proto): the
service, the frame specs of uploads and downloads, and the round plan as a dataclass."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from splitfed.v1 import aggregator_pb2
from splitfed.wire import FrameSpec

SERVICE = aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"]
SERVICE_NAME = SERVICE.full_name
UPLOAD_REQUEST = FrameSpec(aggregator_pb2.UploadUpdateRequest)
DOWNLOAD_RESPONSE = FrameSpec(aggregator_pb2.DownloadGlobalResponse)


class Phase(enum.IntEnum):
    """The phase of a federation's round (the values of ``RoundPhase``)."""

    UNSPECIFIED = aggregator_pb2.ROUND_PHASE_UNSPECIFIED
    WAITING = aggregator_pb2.ROUND_PHASE_WAITING
    KEYS = aggregator_pb2.ROUND_PHASE_KEYS
    UPLOAD = aggregator_pb2.ROUND_PHASE_UPLOAD
    REVEAL = aggregator_pb2.ROUND_PHASE_REVEAL
    FINISHED = aggregator_pb2.ROUND_PHASE_FINISHED


@dataclass(frozen=True)
class Peer:
    """A participant of a securely aggregated round and its key-agreement public key."""

    identity: str
    public_key: bytes


@dataclass(frozen=True)
class RoundPlan:
    """A federation's round as one member (or an admin) sees it: what to do now.
    ``peers`` and ``dropped`` go only to the round's participants."""

    federation: str
    round: int = 0
    attempt: int = 0
    phase: Phase = Phase.UNSPECIFIED
    global_version: int = 0
    selected: bool = False
    uploaded: bool = False
    local_steps: int = 0
    deadline: float = 0.0
    adapter_seed: int = 0
    secure_aggregation: bool = False
    peers: tuple[Peer, ...] = ()
    secagg_scale: float = 0.0
    dropped: tuple[str, ...] = ()
    rounds: int = 0
    message: str = ""
    schema_digest: str = ""

    def key(self) -> tuple[int, int, int, int]:
        """What a watcher waits to see change: round, attempt, phase, version."""
        return (self.round, self.attempt, int(self.phase), self.global_version)

    def to_proto(self) -> aggregator_pb2.RoundPlan:
        return aggregator_pb2.RoundPlan(
            federation=self.federation,
            round=self.round,
            attempt=self.attempt,
            phase=aggregator_pb2.RoundPhase.ValueType(self.phase),
            global_version=self.global_version,
            selected=self.selected,
            uploaded=self.uploaded,
            local_steps=self.local_steps,
            deadline=self.deadline,
            adapter_seed=self.adapter_seed,
            secure_aggregation=self.secure_aggregation,
            peers=[
                aggregator_pb2.Peer(identity=p.identity, public_key=p.public_key)
                for p in self.peers
            ],
            secagg_scale=self.secagg_scale,
            dropped=list(self.dropped),
            rounds=self.rounds,
            message=self.message,
            schema_digest=self.schema_digest,
        )

    @classmethod
    def from_proto(cls, message: aggregator_pb2.RoundPlan) -> RoundPlan:
        return cls(
            federation=message.federation,
            round=message.round,
            attempt=message.attempt,
            phase=Phase(message.phase),
            global_version=message.global_version,
            selected=message.selected,
            uploaded=message.uploaded,
            local_steps=message.local_steps,
            deadline=message.deadline,
            adapter_seed=message.adapter_seed,
            secure_aggregation=message.secure_aggregation,
            peers=tuple(Peer(p.identity, p.public_key) for p in message.peers),
            secagg_scale=message.secagg_scale,
            dropped=tuple(message.dropped),
            rounds=message.rounds,
            message=message.message,
            schema_digest=message.schema_digest,
        )
