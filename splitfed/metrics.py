"""Prometheus metrics of splitfed, and the HTTP endpoint that serves them.

Names follow the Prometheus conventions: a ``splitfed_`` prefix, base units in the name
(``_seconds``, ``_bytes``), counters exposed with ``_total``. This module holds the
machinery and the metrics of the core (wire, calls, revocation list age); each service
creates its own metrics in ``services/<name>/metrics.py``, so a process exports only the
metrics of what it runs (a client exports no backbone gauges). The authorization denials
(``splitfed.security.authz.DENIALS``) and the privacy spent
(``splitfed.security.perturbation.PRIVACY_EPSILON``) stay with their code.
docs/observability.md lists them all.

Every server built by :func:`splitfed.transport.create_server` counts its calls with
:class:`RpcMetricsInterceptor`. Gauges of state (sessions, KV caches, certificates) are
read when scraped, from the objects alive in the process (:class:`Live`), and so is the
age of the revocation list a server enforces.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from splitfed.interceptors import Handler, HandlerInterceptor

logger = logging.getLogger(__name__)

T = TypeVar("T")

# --- transport ------------------------------------------------------------------------

WIRE_BYTES = Counter(
    "splitfed_wire_payload_bytes",
    "Tensor payload bytes moved through the codec, by direction.",
    ["direction"],
)
WIRE_CHUNKS = Counter(
    "splitfed_wire_chunks",
    "Tensor chunks moved through the codec, by direction.",
    ["direction"],
)
WIRE_BUFFER_BYTES = Gauge(
    "splitfed_wire_receive_buffer_bytes",
    "Bytes held by receive buffers of tensors still arriving.",
)

# Calls last from a millisecond (unary) to a whole training session (streams).
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)

RPCS = Counter(
    "splitfed_rpcs",
    "Calls a server finished, by gRPC service, method and status code.",
    ["service", "method", "code"],
)
RPC_SECONDS = Histogram(
    "splitfed_rpc_duration_seconds",
    "Time from a call's start to its end on the server, by service, method and code.",
    ["service", "method", "code"],
    buckets=RPC_BUCKETS,
)
RPCS_IN_FLIGHT = Gauge(
    "splitfed_rpcs_in_flight",
    "Calls running on a server now (open streams included), by service and method.",
    ["service", "method"],
)

# --- state read when scraped ----------------------------------------------------------


class Live(Generic[T]):
    """The objects of one kind alive in this process (usually one), for gauges that read
    their state when scraped. Weak: a forgotten object drops out by itself."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: weakref.WeakSet[Any] = weakref.WeakSet()

    def add(self, obj: T) -> None:
        with self._lock:
            self._objects.add(obj)

    def discard(self, obj: T) -> None:
        with self._lock:
            self._objects.discard(obj)

    def __iter__(self) -> Iterator[T]:
        with self._lock:
            return iter(list(self._objects))

    def total(self, read: Callable[[T], float]) -> float:
        return float(sum(read(obj) for obj in self))


class RevocationSource(Protocol):
    # When the list was last fetched from the key manager (None: never, nothing saved).
    fetched_at: float | None


# The revocation lists servers in this process keep from their key manager
# (splitfed.clients.keys.RevocationPoller).
REVOCATION_LISTS: Live[RevocationSource] = Live()


class RevocationListAge(Collector):
    """Seconds since the oldest revocation list in ``sources`` was fetched, read when
    scraped; +Inf while one was never fetched (it then refuses no certificate)."""

    NAME = "splitfed_revocation_list_age_seconds"
    HELP = (
        "Seconds since this server last fetched the key manager's revocation list (loaded "
        "from its cache after a restart: the age of that fetch); +Inf before any fetch."
    )

    def __init__(self, sources: Live[RevocationSource]) -> None:
        self.sources = sources

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.NAME, self.HELP)]

    def collect(self) -> list[Metric]:
        gauge = GaugeMetricFamily(self.NAME, self.HELP)
        ages = [
            math.inf if source.fetched_at is None else time.time() - source.fetched_at
            for source in self.sources
        ]
        if ages:
            gauge.add_metric([], max(ages))
        return [gauge]


REGISTRY.register(RevocationListAge(REVOCATION_LISTS))


# --- calls ----------------------------------------------------------------------------


def _split_method(full: str) -> tuple[str, str]:
    service, _, method = full.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


class _Call:
    """One call being measured; :meth:`end` records it once."""

    def __init__(self, service: str, method: str, context: grpc.ServicerContext) -> None:
        self.service, self.method, self.context = service, method, context
        self.started = time.perf_counter()
        self.ended = False
        RPCS_IN_FLIGHT.labels(service, method).inc()

    def end(self, failure: BaseException | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        # The code set by abort/set_code (grpc's ServicerContext.code(), absent from stubs).
        code_of = getattr(self.context, "code", None)
        code = code_of() if code_of is not None else None
        if code is None:
            if isinstance(failure, GeneratorExit) or (
                failure is not None and not self.context.is_active()
            ):
                code = grpc.StatusCode.CANCELLED  # the peer went away mid-call
            elif failure is not None:
                code = grpc.StatusCode.UNKNOWN  # gRPC reports an unhandled error so
            else:
                code = grpc.StatusCode.OK
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        elapsed = time.perf_counter() - self.started
        RPCS.labels(self.service, self.method, name).inc()
        RPC_SECONDS.labels(self.service, self.method, name).observe(elapsed)
        RPCS_IN_FLIGHT.labels(self.service, self.method).dec()


class RpcMetricsInterceptor(HandlerInterceptor):
    """Counts and times every call by service, method and status code; installed first
    (outermost) by :func:`splitfed.transport.create_server`, so refused calls count too."""

    def wrap(self, handler: Handler, method: str) -> Handler:
        return _measured(handler, *_split_method(method))


def _measured(
    handler: grpc.RpcMethodHandler[Any, Any], service: str, method: str
) -> grpc.RpcMethodHandler[Any, Any]:
    def unary(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            measured = _Call(service, method, context)
            try:
                response = behavior(request, context)
            except BaseException as exc:
                measured.end(exc)
                raise
            measured.end()
            return response

        return call

    def streaming(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            measured = _Call(service, method, context)
            try:
                yield from behavior(request, context)
            except BaseException as exc:
                measured.end(exc)
                raise
            measured.end()

        return call

    serializers = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), *serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), *serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), *serializers)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), *serializers)


# --- the endpoint ---------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsSettings:
    """The client's [metrics] section: serve this process's metrics over HTTP.

    ``port`` unset: no endpoint; 0: a free port (logged)."""

    port: int | None = None
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0-65535, got {self.port}")
        if not self.host:
            raise ValueError("host must not be empty (0.0.0.0 listens on every interface)")


class MetricsServer:
    """An HTTP server of ``/metrics`` on a daemon thread; see :func:`serve_metrics`."""

    def __init__(self, httpd: Any, thread: threading.Thread, host: str) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host = host
        self.port: int = httpd.server_port

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve_metrics(host: str, port: int) -> MetricsServer:
    """Serve the process's metrics at ``http://host:port/metrics`` (port 0: a free one).

    Also drops the ``_created`` series of counters and histograms from the exposition
    (process-wide): they double the output and no dashboard or alert reads them."""
    host = host.strip("[]")
    disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        httpd, thread = start_http_server(port, addr=host)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port}: {exc}") from None
    server = MetricsServer(httpd, thread, host)
    logger.info("[metrics] serving http://%s/metrics", server.address)
    return server


def start_metrics(settings: MetricsSettings) -> MetricsServer | None:
    """:func:`serve_metrics` as a [metrics] section asks (nothing without a port)."""
    if settings.port is None:
        return None
    return serve_metrics(settings.host, settings.port)
