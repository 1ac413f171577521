"""What the cases aim at in the running deployment: real session ids (own, foreign,
encrypted, closed), the federations' current round, the adapter a session holds, unused
enrollment tokens and certificate requests. Cases mix these into hostile messages so
that they get past the first checks and reach deeper code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from fuzz.deploy import ADMIN, FEDERATIONS, IDENTITIES, MEMBERS, OUTSIDER, Deployment
from fuzz.harness import Fuzzer

from splitfed.protocol.backbone import SESSION_METADATA
from splitfed.security.ca import generate_private_key, make_csr
from splitfed.security.sealing import TO_BACKBONE, DataKey, FrameContext
from splitfed.security.session_crypto import SessionCrypto
from splitfed.v1 import (
    aggregator_pb2,
    aggregator_pb2_grpc,
    backbone_pb2,
    backbone_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
)
from splitfed.wire import FrameSpec, OutgoingFrame, iter_tensors

OWNER = MEMBERS[0]
LORA = backbone_pb2.AdapterConfig(lora=backbone_pb2.LoraConfig(r=4, alpha=8), seed=3)
TIMEOUT_S = 60.0
ENROLLEES = 4


@dataclass(repr=False)
class Live:
    fuzzer: Fuzzer
    model_id: str = ""
    hidden_size: int = 0
    # Sessions of the backbone, by what they are to the owner (``OWNER``).
    sessions: dict[str, str] = field(default_factory=dict)
    # name -> (shape, dtype) of the plain session's body adapter.
    adapter: dict[str, tuple[list[int], torch.dtype]] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    # Certificate requests: identity -> PEM.
    csrs: dict[str, bytes] = field(default_factory=dict)
    # The owner's sealing state for the encrypted session (keys from the key manager).
    crypto: SessionCrypto | None = None
    # The last sealed frame a case sent (replayed by a later case).
    last_sealed: bytes | None = None

    def __repr__(self) -> str:
        return "Live()"

    def _repr_pretty_(self, printer: object, cycle: bool) -> None:  # hypothesis' printer
        printer.text("Live()")  # type: ignore[attr-defined]

    @property
    def deployment(self) -> Deployment:
        return self.fuzzer.deployment

    def stub(self, host: str, identity: str, stub_type: type) -> object:
        return stub_type(self.fuzzer.channel(host, identity))

    # --- setup -----------------------------------------------------------------------

    def prepare(self) -> None:
        self._backbone()
        self._aggregator()
        self._keymanager()

    def _open(self, identity: str, **fields: object) -> str:
        stub = backbone_pb2_grpc.BackboneStub(self.fuzzer.channel("backbone", identity))
        request = backbone_pb2.OpenSessionRequest(adapter=LORA, **fields)  # type: ignore[arg-type]
        return str(stub.OpenSession(request, timeout=TIMEOUT_S).session_id)

    def _backbone(self) -> None:
        stub = backbone_pb2_grpc.BackboneStub(self.fuzzer.channel("backbone", OWNER))
        info = stub.GetModelInfo(backbone_pb2.GetModelInfoRequest(), timeout=TIMEOUT_S).info
        self.model_id, self.hidden_size = info.model_id, info.hidden_size
        self.sessions = {
            "plain": self._open(OWNER),
            "encrypted": self._open(OWNER, encrypted=True),
            "federated": self._open(OWNER, federation=FEDERATIONS[0]["name"]),
            "foreign": self._open(OUTSIDER),
            "closed": self._open(OWNER),
        }
        stub.CloseSession(
            backbone_pb2.CloseSessionRequest(session_id=self.sessions["closed"]), timeout=TIMEOUT_S
        )
        from splitfed.protocol.backbone import EXPORT_RESPONSE

        export = self.fuzzer.channel("backbone", OWNER).unary_stream(
            "/splitfed.v1.Backbone/ExportAdapter",
            request_serializer=backbone_pb2.ExportAdapterRequest.SerializeToString,
            response_deserializer=EXPORT_RESPONSE.parse,
        )
        frames = export(
            backbone_pb2.ExportAdapterRequest(session_id=self.sessions["plain"]), timeout=TIMEOUT_S
        )
        for received in iter_tensors(frame.chunk_view() for frame in frames):
            self.adapter[received.name] = (list(received.tensor.shape), received.tensor.dtype)

    def _aggregator(self) -> None:
        for member in MEMBERS:
            stub = aggregator_pb2_grpc.AggregatorStub(self.fuzzer.channel("aggregator", member))
            for federation in FEDERATIONS:
                stub.Join(
                    aggregator_pb2.JoinRequest(federation=federation["name"], num_samples=100),
                    timeout=TIMEOUT_S,
                )

    def _keymanager(self) -> None:
        admin = keys_pb2_grpc.KeyManagerStub(self.fuzzer.channel("keymanager", ADMIN))
        for index in range(ENROLLEES):
            identity = f"enrollee-{index}"
            reply = admin.CreateToken(
                keys_pb2.CreateTokenRequest(identity=identity, role="client"), timeout=TIMEOUT_S
            )
            self.tokens.append(reply.token)
            self.csrs[identity] = make_csr(generate_private_key(), identity)
        for identity in IDENTITIES:
            self.csrs[identity] = make_csr(generate_private_key(), identity)

    # --- what cases aim at -------------------------------------------------------------

    def plan(self, federation: str) -> aggregator_pb2.RoundPlan:
        """The federation's round now (as the first member sees it)."""
        stub = aggregator_pb2_grpc.AggregatorStub(self.fuzzer.channel("aggregator", OWNER))
        try:
            reply = stub.GetRoundPlan(
                aggregator_pb2.GetRoundPlanRequest(federation=federation), timeout=TIMEOUT_S
            )
        except grpc.RpcError:
            return aggregator_pb2.RoundPlan()
        return reply.plan

    def next_step(self, which: str = "plain") -> int:
        """The optimizer step the owner's session expects next (resuming it says)."""
        stub = backbone_pb2_grpc.BackboneStub(self.fuzzer.channel("backbone", OWNER))
        request = backbone_pb2.OpenSessionRequest(
            session_id=self.sessions[which], encrypted=which == "encrypted"
        )
        try:
            return int(stub.OpenSession(request, timeout=TIMEOUT_S).step) + 1
        except grpc.RpcError:
            return 1

    def _fetch_key(self, key_id: int) -> DataKey:
        stub = keys_pb2_grpc.KeyManagerStub(self.fuzzer.channel("keymanager", OWNER))
        request = keys_pb2.GetSessionKeyRequest(
            session_id=self.sessions["encrypted"], key_id=key_id
        )
        key = stub.GetSessionKey(request, timeout=TIMEOUT_S).key
        return DataKey(key.key_id, key.secret, key.nonce_prefix)

    def seal(
        self, frames: list[OutgoingFrame], spec: FrameSpec[Any], context: FrameContext
    ) -> list[bytes] | None:
        """``frames`` sealed as the owner seals them on its encrypted session, serialised;
        None once the key manager no longer hands out its key (a case ended it)."""
        if self.crypto is None:
            self.crypto = SessionCrypto(self.sessions["encrypted"], TO_BACKBONE, self._fetch_key)
        try:
            return [spec.serialize(f) for f in self.crypto.seal(frames, context)]
        except grpc.RpcError:
            return None

    def session_metadata(self, which: str) -> tuple[tuple[str, str], ...]:
        return ((SESSION_METADATA, self.sessions[which]),)
