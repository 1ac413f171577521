"""gRPC servicer for splitfed.v1.Diagnostics: converts messages, calls the handlers."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from splitfed import __version__
from splitfed.errors import stream_errors, unary_errors
from splitfed.protocol.diagnostics import REQUEST_FRAMES, RESPONSE_FRAMES, SERVICE
from splitfed.security.authz import ALL_ROLES, Policy
from splitfed.security.identity import peer_identity
from splitfed.services.diagnostics.handlers import handle_echo, handle_who_am_i
from splitfed.services.diagnostics.settings import DEDICATED, LINK_CHECK, DiagnosticsSettings
from splitfed.streams import StreamGuard
from splitfed.transport import ServiceBinding, service_binding
from splitfed.v1 import diagnostics_pb2
from splitfed.wire import (
    DEFAULT_CHUNK_BYTES,
    IncomingFrame,
    OutgoingFrame,
    ReceiveBudget,
    TensorLimits,
    iter_frames,
    iter_tensors,
)

# Every party may check its link and identity.
POLICY: Policy = {
    "EchoTensors": ALL_ROLES,
    "WhoAmI": ALL_ROLES,
}


class DiagnosticsServicer:
    """Implements splitfed.v1.Diagnostics (registered by :func:`binding`).

    Limits, receive budget and stream guard come from ``settings``; ``limits``,
    ``budget`` and ``streams`` override them. Without settings: sized for a link check
    (:data:`~.settings.LINK_CHECK`), or, when ``limits`` are given, a dedicated echo
    server's (:data:`~.settings.DEDICATED`) with a budget of two largest tensors.
    """

    def __init__(
        self,
        limits: TensorLimits | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        budget: ReceiveBudget | None = None,
        streams: StreamGuard | None = None,
        settings: DiagnosticsSettings | None = None,
    ) -> None:
        if settings is None:
            settings = LINK_CHECK if limits is None else DEDICATED
        self.limits = limits or settings.limits()
        self.chunk_bytes = chunk_bytes
        # All streams of this servicer together.
        if budget is None:
            budget = (
                settings.budget() if limits is None else ReceiveBudget(2 * limits.max_tensor_bytes)
            )
        self.budget = budget
        if self.budget.max_bytes < self.limits.max_tensor_bytes:
            raise ValueError(
                f"the receive budget ({self.budget.max_bytes} bytes) must hold at least one "
                f"largest tensor ({self.limits.max_tensor_bytes} bytes)"
            )
        self.streams = streams or settings.guard()

    @stream_errors
    def EchoTensors(
        self,
        request_iterator: Iterator[IncomingFrame[diagnostics_pb2.EchoTensorsRequest]],
        context: grpc.ServicerContext,
    ) -> Iterator[OutgoingFrame]:
        identity = peer_identity(context)
        caller = str(identity) if identity is not None else "anonymous"
        with self.streams.open(context, request_iterator, identity=caller) as requests:
            chunks = (frame.chunk_view() for frame in requests)
            for echo in handle_echo(iter_tensors(chunks, self.limits, self.budget)):
                yield from requests.pace(
                    iter_frames(
                        echo.tensor,
                        echo.name,
                        RESPONSE_FRAMES,
                        chunk_bytes=self.chunk_bytes,
                        encoding=echo.encoding,
                    )
                )

    @unary_errors
    def WhoAmI(
        self, request: diagnostics_pb2.WhoAmIRequest, context: grpc.ServicerContext
    ) -> diagnostics_pb2.WhoAmIResponse:
        name, role = handle_who_am_i(peer_identity(context))
        return diagnostics_pb2.WhoAmIResponse(identity=name, role=role, server_version=__version__)


def binding(
    limits: TensorLimits | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    budget: ReceiveBudget | None = None,
    streams: StreamGuard | None = None,
    settings: DiagnosticsSettings | None = None,
) -> ServiceBinding:
    """The Diagnostics service; see :class:`DiagnosticsServicer` for the defaults."""
    servicer = DiagnosticsServicer(limits, chunk_bytes, budget, streams, settings)
    return service_binding(SERVICE, servicer, [REQUEST_FRAMES, RESPONSE_FRAMES])
