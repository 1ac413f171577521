"""gRPC servicer for splitfed.v1.Backbone: converts messages and calls the handlers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from splitfed.errors import InvalidArgumentError, stream_errors, unary_errors
from splitfed.protocol.backbone import (
    FEDERATION_METADATA,
    FRAME_SPECS,
    OWNER_METADATA,
    SERVICE,
    SESSION_METADATA,
    SessionRequest,
)
from splitfed.security.authz import Policy
from splitfed.security.identity import peer_identity
from splitfed.security.session_crypto import SessionCrypto
from splitfed.services.backbone import handlers
from splitfed.services.backbone.adapters_io import SHARED_ADAPTER
from splitfed.services.backbone.crypto import BackboneKeys
from splitfed.services.backbone.sessions import Session, no_such_session
from splitfed.services.backbone.state import BackboneState
from splitfed.streams import StreamGuard
from splitfed.transport import ServiceBinding, TransportOptions, service_binding
from splitfed.v1 import backbone_pb2
from splitfed.wire import IncomingFrame, OutgoingFrame, PackedFrame, ReceiveBudget

ANONYMOUS = "anonymous"


def owner_of(context: grpc.ServicerContext) -> str:
    """The identity a session belongs to: ``role/name`` from the client certificate."""
    identity = peer_identity(context)
    return str(identity) if identity is not None else ANONYMOUS


def role_of(context: grpc.ServicerContext) -> str:
    identity = peer_identity(context)
    return identity.role if identity is not None else ""


POLICY: Policy = {
    "GetModelInfo": frozenset({"client", "aggregator", "admin"}),
    "OpenSession": frozenset({"client"}),
    "CloseSession": frozenset({"client"}),
    "Train": frozenset({"client"}),
    "Generate": frozenset({"client"}),
    # Aggregators: sessions opened for a federation, if listed in [backbone] aggregators.
    # Admins: the shared adapter of adapter_mode shared, as session "shared", only.
    "ExportAdapter": frozenset({"client", "aggregator", "admin"}),
    "ImportAdapter": frozenset({"client", "aggregator", "admin"}),
    "CheckSession": frozenset({"aggregator"}),
}


def _metadata(context: grpc.ServicerContext, key: str) -> str:
    values = [v for k, v in context.invocation_metadata() if k == key]
    if len(values) > 1 or (values and not isinstance(values[0], str)):
        raise InvalidArgumentError(f"the call has more than one {key!r} metadata entry")
    return str(values[0]) if values else ""


class BackboneServicer:
    def __init__(
        self, state: BackboneState, options: TransportOptions, keys: BackboneKeys | None = None
    ) -> None:
        self.state = state
        self.keys = keys or BackboneKeys(None)
        state.on_drop.append(self._end_keys)
        self.chunk_bytes = options.chunk_bytes
        limits = handlers.tensor_limits(state)
        self.budget = ReceiveBudget(max(2 * limits.max_tensor_bytes, 64 << 20))
        settings = state.settings
        self.streams = StreamGuard(
            "Backbone",
            max_streams=settings.max_streams,
            idle_timeout_s=settings.stream_idle_timeout_s,
            max_streams_per_identity=settings.max_streams_per_identity,
        )

    def _end_keys(self, session: Session) -> None:
        if session.encrypted:
            self.keys.end(session.session_id)

    def _crypto(self, session: Session) -> SessionCrypto | None:
        return self.keys.for_session(session.session_id) if session.encrypted else None

    def _session(
        self,
        context: grpc.ServicerContext,
        session_id: str | None = None,
        *,
        federation: str | None = None,
        owner: str | None = None,
    ) -> Session:
        """The caller's session; an aggregator's only as the backbone's rules allow
        (``federation`` and ``owner`` from the request, else from the call metadata)."""
        if session_id is None:
            session_id = _metadata(context, SESSION_METADATA)
            if not session_id:
                raise InvalidArgumentError(
                    f"the call needs one {SESSION_METADATA!r} metadata entry"
                )
        identity = peer_identity(context)
        if identity is not None and identity.role == "aggregator":
            return self.state.get_federated_session(
                session_id,
                identity.name,
                _metadata(context, FEDERATION_METADATA) if federation is None else federation,
                _metadata(context, OWNER_METADATA) if owner is None else owner,
            )
        if identity is not None and identity.role == "admin":
            if session_id != SHARED_ADAPTER:
                raise no_such_session(session_id)  # an admin reaches no client's session
            return self.state.shared_adapter()
        return self.state.get_session(session_id, owner_of(context))

    def _adapter_session(
        self,
        context: grpc.ServicerContext,
        session_id: str | None,
        *,
        importing: bool,
        federation: str | None = None,
        owner: str | None = None,
    ) -> tuple[Session, SessionCrypto | None]:
        """The session whose adapter moves, if the caller may move it, and the crypto to
        seal the transfer with: the owner's of an encrypted session (an aggregator or
        admin holds no session key: TLS only)."""
        session = self._session(context, session_id, federation=federation, owner=owner)
        role = role_of(context)
        self.state.check_adapter_access(session, role, importing=importing)
        return session, self._crypto(session) if role == "client" else None

    @unary_errors
    def GetModelInfo(
        self, request: backbone_pb2.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> backbone_pb2.GetModelInfoResponse:
        info = handlers.model_info(self.state, self.keys)
        return backbone_pb2.GetModelInfoResponse(info=info.to_proto())

    @unary_errors
    def OpenSession(
        self, request: backbone_pb2.OpenSessionRequest, context: grpc.ServicerContext
    ) -> backbone_pb2.OpenSessionResponse:
        opened = handlers.handle_open(
            self.state, owner_of(context), SessionRequest.from_proto(request), self.keys
        )
        return opened.to_proto()

    @unary_errors
    def CloseSession(
        self, request: backbone_pb2.CloseSessionRequest, context: grpc.ServicerContext
    ) -> backbone_pb2.CloseSessionResponse:
        self.state.close_session(request.session_id, owner_of(context))
        return backbone_pb2.CloseSessionResponse()

    def _session_stream(
        self,
        context: grpc.ServicerContext,
        request_iterator: Iterator[IncomingFrame[Any]],
        handle: Callable[..., Iterator[Any]],
    ) -> Iterator[Any]:
        """One Train or Generate stream of the caller's session, through ``handle``."""
        session = self._session(context)
        with self.streams.open(context, request_iterator, owner_of(context)) as requests:
            stream = handlers.SessionStream(
                self.state, session, self.chunk_bytes, self.budget, self._crypto(session)
            )
            yield from requests.pace(handle(stream, requests))

    @stream_errors
    def Train(
        self,
        request_iterator: Iterator[IncomingFrame[backbone_pb2.TrainRequest]],
        context: grpc.ServicerContext,
    ) -> Iterator[OutgoingFrame | PackedFrame | backbone_pb2.TrainResponse]:
        yield from self._session_stream(context, request_iterator, handlers.handle_train)

    @stream_errors
    def Generate(
        self,
        request_iterator: Iterator[IncomingFrame[backbone_pb2.GenerateRequest]],
        context: grpc.ServicerContext,
    ) -> Iterator[OutgoingFrame | PackedFrame | backbone_pb2.GenerateResponse]:
        yield from self._session_stream(context, request_iterator, handlers.handle_generate)

    @stream_errors
    def ExportAdapter(
        self, request: backbone_pb2.ExportAdapterRequest, context: grpc.ServicerContext
    ) -> Iterator[OutgoingFrame | PackedFrame]:
        session, crypto = self._adapter_session(
            context,
            request.session_id,
            importing=False,
            federation=request.federation,
            owner=request.owner,
        )
        yield from handlers.handle_export(self.state, session, self.chunk_bytes, crypto)

    @unary_errors
    def CheckSession(
        self, request: backbone_pb2.CheckSessionRequest, context: grpc.ServicerContext
    ) -> backbone_pb2.CheckSessionResponse:
        session = self._session(
            context, request.session_id, federation=request.federation, owner=request.owner
        )
        return backbone_pb2.CheckSessionResponse(step=session.step)

    @unary_errors
    def ImportAdapter(
        self,
        request_iterator: Iterator[IncomingFrame[backbone_pb2.ImportAdapterRequest]],
        context: grpc.ServicerContext,
    ) -> backbone_pb2.ImportAdapterResponse:
        session, crypto = self._adapter_session(context, None, importing=True)
        return handlers.handle_import(self.state, session, request_iterator, self.budget, crypto)


def binding(
    state: BackboneState, options: TransportOptions, keys: BackboneKeys | None = None
) -> ServiceBinding:
    return service_binding(
        SERVICE,
        BackboneServicer(state, options, keys),
        list(FRAME_SPECS),
    )
