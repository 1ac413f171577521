"""Client side of splitfed.v1.Diagnostics: echo tensors through a service, ask who we are."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitfed.encodings import get_encoding
from splitfed.protocol.diagnostics import REQUEST_FRAMES, RESPONSE_FRAMES, SERVICE
from splitfed.retry import DEFAULT_RETRY, RetryPolicy, call_with_retry
from splitfed.transport import framed_stream
from splitfed.v1 import diagnostics_pb2, diagnostics_pb2_grpc
from splitfed.wire import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_LIMITS,
    OutgoingFrame,
    ReceivedTensor,
    TensorLimits,
    iter_frames,
    iter_tensors,
)


@dataclass(frozen=True)
class Peer:
    identity: str
    role: str
    server_version: str


class DiagnosticsClient:
    def __init__(
        self,
        channel: grpc.Channel,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        limits: TensorLimits = DEFAULT_LIMITS,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout_s: float | None = 300.0,
    ) -> None:
        self._stub = diagnostics_pb2_grpc.DiagnosticsStub(channel)
        self._echo = framed_stream(
            channel, SERVICE.methods_by_name["EchoTensors"], REQUEST_FRAMES, RESPONSE_FRAMES
        )
        self._health = health_pb2_grpc.HealthStub(channel)
        self.chunk_bytes = chunk_bytes
        self.limits = limits
        self.retry = retry
        self.timeout_s = timeout_s

    def health(self, service: str = "") -> str:
        """The serving status name of ``service`` ("" for the whole server)."""
        response = call_with_retry(
            lambda: self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s
            ),
            self.retry,
            what="Health.Check",
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def who_am_i(self) -> Peer:
        response = call_with_retry(
            lambda: self._stub.WhoAmI(diagnostics_pb2.WhoAmIRequest(), timeout=self.timeout_s),
            self.retry,
            what="Diagnostics.WhoAmI",
        )
        return Peer(response.identity, response.role, response.server_version)

    def _requests(
        self, tensors: Iterable[tuple[str, torch.Tensor]], encoding: str
    ) -> Iterator[OutgoingFrame]:
        for name, tensor in tensors:
            yield from iter_frames(
                tensor, name, REQUEST_FRAMES, chunk_bytes=self.chunk_bytes, encoding=encoding
            )

    def echo(
        self, tensors: Sequence[tuple[str, torch.Tensor]], *, encoding: str = "raw"
    ) -> list[ReceivedTensor]:
        """Send ``tensors`` through the server and return what came back."""
        enc = get_encoding(encoding)
        for name, tensor in tensors:
            if not enc.supports(tensor.dtype):
                raise ValueError(
                    f"wire encoding {enc.name!r} does not apply to {name!r} ({tensor.dtype})"
                )

        def call() -> list[ReceivedTensor]:
            responses = self._echo(self._requests(tensors, encoding), timeout=self.timeout_s)
            return list(iter_tensors((r.chunk_view() for r in responses), self.limits))

        return call_with_retry(call, self.retry, what="Diagnostics.EchoTensors")
