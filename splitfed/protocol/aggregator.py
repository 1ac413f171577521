"""The contract of splitfed.v1.Aggregator (protos/splitfed/v1/aggregator.proto): the
service, the frame specs of uploads and downloads, and the round plan as a dataclass."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from splitfed.protocol.messages import from_message, to_message
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
    # DP-FedAvg (docs/federated.md "DP-FedAvg"): the clip norm (0: the federation does not
    # use it), sigma, the noise each client adds itself (secure aggregation), and the
    # (epsilon, delta) spent so far.
    dp_clip_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_client_noise_std: float = 0.0
    dp_epsilon: float = 0.0
    dp_delta: float = 0.0

    @property
    def private(self) -> bool:
        """Whether the federation runs DP-FedAvg (clients clip and, with secure
        aggregation, noise their updates and weigh them equally)."""
        return self.dp_clip_norm > 0

    def key(self) -> tuple[int, int, int, int]:
        """What a watcher waits to see change: round, attempt, phase, version."""
        return (self.round, self.attempt, int(self.phase), self.global_version)

    def to_proto(self) -> aggregator_pb2.RoundPlan:
        return to_message(
            self,
            aggregator_pb2.RoundPlan,
            phase=aggregator_pb2.RoundPhase.ValueType(self.phase),
            peers=[to_message(p, aggregator_pb2.Peer) for p in self.peers],
        )

    @classmethod
    def from_proto(cls, message: aggregator_pb2.RoundPlan) -> RoundPlan:
        return from_message(
            cls,
            message,
            phase=Phase(message.phase),
            peers=tuple(from_message(Peer, p) for p in message.peers),
        )
