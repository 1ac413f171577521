"""The one factory for gRPC servers and channels.

:func:`create_server` and :func:`create_channel` own TLS (mutual by default), message
size limits derived from the chunk size, keepalive, and graceful shutdown. Every server
also serves ``grpc.health.v1.Health`` and server reflection.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitfed.errors import InvalidArgumentError
from splitfed.lifecycle import Running
from splitfed.metrics import RpcMetricsInterceptor
from splitfed.runtime import tune_allocator
from splitfed.tls import TLSConfig, warn_plaintext
from splitfed.wire import DEFAULT_CHUNK_BYTES, FrameSpec, KiB, MiB

logger = logging.getLogger(__name__)

# Room in each message for everything besides the chunk's payload: header, frame fields.
MESSAGE_HEADROOM_BYTES = 64 * KiB
MAX_CHUNK_BYTES = 64 * MiB


@dataclass(frozen=True)
class TransportOptions:
    """Settings shared by both ends of a connection."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    max_workers: int = 16
    max_concurrent_rpcs: int | None = None
    # Servers: the most a connection's TCP read buffer may grow to (None: gRPC's default,
    # which grows with the traffic and stays for the connection's life; a service with
    # many long-lived clients caps it, docs/benchmarks.md "Aggregator memory").
    max_read_buffer_bytes: int | None = None
    # HTTP/2 BDP probing widens flow-control windows on fast links (throughput); off, a
    # peer can send at most the default window ahead of what the service has read.
    bdp_probe: bool = True
    # Channels: the HTTP/2 window each stream starts with (grpc.http2.lookahead_bytes),
    # what the server may send ahead of the client's reads. gRPC's 64 KiB (widened by BDP
    # probing only slowly) held a backbone's replies back over a 100 ms, 20 Mbit/s link:
    # a pipelined step took 1.87 s instead of 1.62 s (bench/wan.py, docs/benchmarks.md).
    # Servers keep gRPC's default: a client cannot make a service buffer more per stream.
    stream_window_bytes: int | None = 4 * MiB

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(
                f"chunk_bytes must be between 1 and {MAX_CHUNK_BYTES}, got {self.chunk_bytes}"
            )
        if self.keepalive_time_s <= 0 or self.keepalive_timeout_s <= 0:
            raise ValueError("keepalive_time_s and keepalive_timeout_s must be positive")
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers}")
        if self.stream_window_bytes is not None and self.stream_window_bytes < 64 * KiB:
            raise ValueError(
                f"stream_window_bytes must be >= 65536, got {self.stream_window_bytes}"
            )
        if self.max_read_buffer_bytes is not None and self.max_read_buffer_bytes < 4 * KiB:
            raise ValueError(
                f"max_read_buffer_bytes must be >= 4096, got {self.max_read_buffer_bytes}"
            )

    @property
    def max_message_bytes(self) -> int:
        return self.chunk_bytes + MESSAGE_HEADROOM_BYTES

    def _common(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            *([] if self.bdp_probe else [("grpc.http2.bdp_probe", 0)]),
        ]

    def server_options(self) -> list[tuple[str, Any]]:
        return [
            *self._common(),
            # Accept client pings as often as clients are configured to send them.
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.keepalive_time_s * 500)),
            # Never share a port silently with another process.
            ("grpc.so_reuseport", 0),
            *(
                []
                if self.max_read_buffer_bytes is None
                else [("grpc.experimental.tcp_max_read_buffer_size", self.max_read_buffer_bytes)]
            ),
        ]

    def channel_options(self) -> list[tuple[str, Any]]:
        window = self.stream_window_bytes
        return [
            *self._common(),
            *([] if window is None else [("grpc.http2.lookahead_bytes", window)]),
        ]


DEFAULT_OPTIONS = TransportOptions()


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer and the generated function that registers it, with its full name."""

    name: str
    servicer: object
    register: Callable[[Any, grpc.Server], None]


_HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def service_binding(
    descriptor: ServiceDescriptor, servicer: object, frames: Sequence[FrameSpec[Any]] = ()
) -> ServiceBinding:
    """Register ``servicer``'s methods for the service ``descriptor`` describes.

    Like the generated ``add_*Servicer_to_server``, except that stream messages with a
    :class:`~splitfed.wire.FrameSpec` in ``frames`` are parsed and serialised by it (the
    servicer receives :class:`~splitfed.wire.IncomingFrame` objects and may yield
    :class:`~splitfed.wire.OutgoingFrame` ones). Methods the servicer lacks answer
    UNIMPLEMENTED.
    """
    specs = {spec.message_type.DESCRIPTOR.full_name: spec for spec in frames}
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in descriptor.methods:
        behaviour = getattr(servicer, method.name, None)
        if behaviour is None:
            continue
        request_spec = specs.get(method.input_type.full_name)
        response_spec = specs.get(method.output_type.full_name)
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        parse = request_spec.parse if request_spec else request_type.FromString
        handlers[method.name] = make(
            _refusing_malformed(behaviour, method.client_streaming, request_type.__name__),
            request_deserializer=_lenient(parse),
            response_serializer=(
                response_spec.serialize if response_spec else response_type.SerializeToString
            ),
        )

    def register(_: object, server: grpc.Server) -> None:
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
        )
        server.add_registered_method_handlers(descriptor.full_name, handlers)

    return ServiceBinding(descriptor.full_name, servicer, register)


class MalformedRequest(NamedTuple):
    """A request message that does not parse as its method's request type."""

    error: str


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``parse``, answering :class:`MalformedRequest` where it raises.

    gRPC ends a call whose request its deserializer cannot parse with INTERNAL
    ("Exception deserializing request!"); a client's malformed bytes are its own error,
    which :func:`_refusing_malformed` answers with INVALID_ARGUMENT instead.
    """

    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception as exc:  # DecodeError and whatever else the parser raises
            return MalformedRequest(f"{type(exc).__name__}: {exc}"[:200])

    return deserialize


def _refusing_malformed(
    behaviour: Callable[..., Any], client_streaming: bool, type_name: str
) -> Callable[..., Any]:
    """``behaviour``, refusing a :class:`MalformedRequest` with INVALID_ARGUMENT: before
    the call for a unary request; in a stream, as an :class:`InvalidArgumentError` raised
    where the servicer reads that message (its error mapping gives the status)."""

    def refusal(request: MalformedRequest, index: int | None = None) -> str:
        where = "the request" if index is None else f"request message {index}"
        return f"{where} is not a valid {type_name} ({request.error})"

    if client_streaming:

        def checked(requests: Iterator[Any]) -> Iterator[Any]:
            for index, request in enumerate(requests):
                if isinstance(request, MalformedRequest):
                    raise InvalidArgumentError(refusal(request, index))
                yield request

        @functools.wraps(behaviour)
        def streaming(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return behaviour(checked(requests), context)

        return streaming

    @functools.wraps(behaviour)
    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal(request))
        return behaviour(request, context)

    return unary


def framed_stream(
    channel: grpc.Channel,
    method: MethodDescriptor,
    request: FrameSpec[Any],
    response: FrameSpec[Any],
) -> grpc.StreamStreamMultiCallable[Any, Any]:
    """A client-side bidirectional stream whose messages go through :class:`FrameSpec`s."""
    return channel.stream_stream(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=request.serialize,
        response_deserializer=response.parse,
    )


class Server(Running):
    """A started-or-startable gRPC server with health and reflection; see :func:`create_server`."""

    def __init__(
        self,
        grpc_server: grpc.Server,
        port: int,
        health_servicer: health.HealthServicer,
        service_names: Sequence[str],
        address: str,
    ) -> None:
        self.grpc_server = grpc_server
        self.port = port
        self.health = health_servicer
        self.service_names = list(service_names)
        self._host = address.rsplit(":", 1)[0]
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self._host}:{self.port}"

    def start(self) -> Server:
        self.grpc_server.start()
        self._set_status(health_pb2.HealthCheckResponse.SERVING)
        logger.info("[Server.start] serving %s on %s", ", ".join(self.service_names), self.address)
        return self

    def _set_status(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        self.health.set("", status)
        for name in self.service_names:
            self.health.set(name, status)

    def stop(self, grace_s: float | None = 5.0, drain_s: float = 0.0) -> None:
        """Graceful shutdown: report NOT_SERVING; after ``drain_s`` (time for readiness
        probes and load balancers to notice) refuse new calls; give running calls
        ``grace_s`` to finish."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.health.enter_graceful_shutdown()
        if drain_s > 0:
            time.sleep(drain_s)
        self.grpc_server.stop(grace_s).wait()
        logger.info("[Server.stop] stopped %s", self.address)

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        return bool(self.grpc_server.wait_for_termination(timeout_s))


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6); the port must be 0-65535."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"address {address!r} is not host:port with a port from 0 to 65535")
    return host.removeprefix("[").removesuffix("]"), int(port_text)


def create_server(
    services: Sequence[ServiceBinding],
    tls: TLSConfig,
    *,
    address: str = "127.0.0.1:0",
    options: TransportOptions = DEFAULT_OPTIONS,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    client_auth: bool = True,
) -> Server:
    """Build (not start) a server for ``services`` bound to ``address`` (port 0 picks one).

    Mutual TLS unless ``tls.insecure``: the server presents its certificate and requires a
    client certificate signed by the deployment CA (``client_auth=False``: the server
    presents its certificate only; the key manager's enrollment port).
    """
    tune_allocator()
    tls.verify_own_certificate()
    parse_address(address)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix="grpc"),
        # Metrics first (outermost): calls that later interceptors refuse count too.
        interceptors=[RpcMetricsInterceptor(), *interceptors],
        options=options.server_options(),
        maximum_concurrent_rpcs=options.max_concurrent_rpcs,
    )
    for binding in services:
        binding.register(binding.servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [b.name for b in services]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        if tls.insecure:
            warn_plaintext(f"create_server {address}")
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, tls.server_credentials(client_auth=client_auth))
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address} (address in use or not local)")
    return Server(server, port, health_servicer, names, address)


def create_channel(
    target: str,
    tls: TLSConfig,
    *,
    server_name: str | None = None,
    options: TransportOptions = DEFAULT_OPTIONS,
) -> grpc.Channel:
    """A channel to ``target`` ("host:port").

    With TLS the server's certificate must name ``server_name`` (default: the host in
    ``target``), and this party's own certificate is presented for mutual TLS.
    """
    tune_allocator()
    tls.verify_own_certificate()
    parse_address(target)
    channel_options = options.channel_options()
    if tls.insecure:
        warn_plaintext(f"create_channel {target}")
        return grpc.insecure_channel(target, options=channel_options)
    if server_name is not None:
        channel_options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, tls.channel_credentials(), options=channel_options)
