"""gRPC servicer for splitfed.v1.Aggregator: converts messages and calls the handlers
(:mod:`.handlers`), which say who may do what."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol, TypeVar

import grpc

from splitfed.errors import UnauthenticatedError, stream_errors, unary_errors
from splitfed.protocol.aggregator import DOWNLOAD_RESPONSE, SERVICE, UPLOAD_REQUEST
from splitfed.security.authz import Policy
from splitfed.security.identity import Identity, peer_identity
from splitfed.services.aggregator import handlers
from splitfed.services.aggregator.federation import Federation
from splitfed.streams import StreamGuard
from splitfed.transport import ServiceBinding, service_binding
from splitfed.v1 import aggregator_pb2
from splitfed.wire import (
    DEFAULT_CHUNK_BYTES,
    IncomingFrame,
    OutgoingFrame,
    ReceiveBudget,
    TensorLimits,
    iter_frames,
)

logger = logging.getLogger(__name__)


class _NamesFederation(Protocol):
    @property
    def federation(self) -> str: ...


_Request = TypeVar("_Request", bound=_NamesFederation)
_Result = TypeVar("_Result")


_CLIENTS = frozenset({"client"})
POLICY: Policy = {
    "Join": _CLIENTS,
    "GetRoundPlan": frozenset({"client", "admin"}),
    "AdvertiseKey": _CLIENTS,
    "UploadUpdate": _CLIENTS,
    "RevealSeeds": _CLIENTS,
    "DownloadGlobal": frozenset({"client", "admin"}),
    "WatchRound": frozenset({"client", "admin"}),
}


def _caller(context: grpc.ServicerContext) -> Identity:
    identity = peer_identity(context)
    if identity is None:
        raise UnauthenticatedError("no client certificate identity")
    return identity


# Streaming calls (uploads, downloads, watches) one identity may hold open at once: an
# honest member needs one watch and one transfer.
STREAMS_PER_IDENTITY = 3
# A watch that has seen no change for this long is ended (the client watches again).
STREAM_IDLE_TIMEOUT_S = 300.0


class AggregatorServicer:
    def __init__(
        self,
        federations: Mapping[str, Federation],
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        watch_poll_s: float = 1.0,
        max_streams: int = 12,
    ) -> None:
        self.federations = federations
        self.chunk_bytes = chunk_bytes
        self.watch_poll_s = watch_poll_s
        largest = max(f.settings.max_adapter_bytes for f in federations.values())
        self.limits = TensorLimits(max_tensor_bytes=largest, max_rank=4)
        self.budget = ReceiveBudget(max(2 * largest, 64 << 20))
        # Every streaming call holds a server thread for its life: all of them together
        # stay below the worker count (settings.stream_slots), and one identity gets a few.
        self.streams = StreamGuard(
            "Aggregator",
            max_streams=max_streams,
            idle_timeout_s=STREAM_IDLE_TIMEOUT_S,
            max_streams_per_identity=min(STREAMS_PER_IDENTITY, max_streams),
        )

    def _federation(self, name: str, caller: Identity) -> Federation:
        return handlers.federation_for(self.federations, name, caller)

    def _handle(
        self,
        handle: Callable[[_Request, Federation, Identity], _Result],
        request: _Request,
        context: grpc.ServicerContext,
    ) -> _Result:
        """``handle`` for the caller and the federation the request names."""
        caller = _caller(context)
        return handle(request, self._federation(request.federation, caller), caller)

    @unary_errors
    def Join(
        self, request: aggregator_pb2.JoinRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.JoinResponse:
        plan = handlers.handle_join(request, self.federations, _caller(context))
        return aggregator_pb2.JoinResponse(plan=plan.to_proto())

    @unary_errors
    def GetRoundPlan(
        self, request: aggregator_pb2.GetRoundPlanRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.GetRoundPlanResponse:
        plan = self._handle(handlers.handle_get_plan, request, context)
        return aggregator_pb2.GetRoundPlanResponse(plan=plan.to_proto())

    @unary_errors
    def AdvertiseKey(
        self, request: aggregator_pb2.AdvertiseKeyRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.AdvertiseKeyResponse:
        self._handle(handlers.handle_advertise_key, request, context)
        return aggregator_pb2.AdvertiseKeyResponse()

    @unary_errors
    def RevealSeeds(
        self, request: aggregator_pb2.RevealSeedsRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.RevealSeedsResponse:
        self._handle(handlers.handle_reveal, request, context)
        return aggregator_pb2.RevealSeedsResponse()

    @unary_errors
    def UploadUpdate(
        self,
        request_iterator: Iterator[IncomingFrame[aggregator_pb2.UploadUpdateRequest]],
        context: grpc.ServicerContext,
    ) -> aggregator_pb2.UploadUpdateResponse:
        caller = _caller(context)
        with self.streams.open(context, request_iterator, identity=str(caller)) as frames:
            duplicate, received = handlers.handle_upload(
                frames, self.federations, caller, self.limits, self.budget
            )
        return aggregator_pb2.UploadUpdateResponse(duplicate=duplicate, received=received)

    @stream_errors
    def DownloadGlobal(
        self, request: aggregator_pb2.DownloadGlobalRequest, context: grpc.ServicerContext
    ) -> Iterator[OutgoingFrame | aggregator_pb2.DownloadGlobalResponse]:
        caller = _caller(context)
        federation = self._federation(request.federation, caller)
        with self.streams.open(context, iter(()), identity=str(caller)) as stream:
            version, tensors = handlers.handle_download(request, federation)
            if not tensors:
                yield aggregator_pb2.DownloadGlobalResponse(version=version)
                return
            for name in sorted(tensors):
                frames = iter_frames(
                    tensors[name], name, DOWNLOAD_RESPONSE, chunk_bytes=self.chunk_bytes
                )
                for frame in stream.pace(frames):
                    frame.message.version = version  # type: ignore[attr-defined]
                    yield frame

    @stream_errors
    def WatchRound(
        self, request: aggregator_pb2.WatchRoundRequest, context: grpc.ServicerContext
    ) -> Iterator[aggregator_pb2.WatchRoundResponse]:
        caller = _caller(context)
        federation = self._federation(request.federation, caller)
        with self.streams.open(context, iter(()), identity=str(caller)) as stream:
            views = handlers.handle_watch(federation, caller, self.watch_poll_s, context.is_active)
            for view in views:
                yield from stream.pace(
                    [
                        aggregator_pb2.WatchRoundResponse(
                            plan=view.plan.to_proto(),
                            received=view.received,
                            participants=view.participants,
                            versions=view.plan.global_version,
                        )
                    ]
                )


class Ticker:
    """Applies the federations' deadlines even when no client calls."""

    def __init__(self, federations: Mapping[str, Federation], period_s: float = 0.5) -> None:
        self.federations = federations
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aggregator-ticker", daemon=True)
        self.period_s = period_s

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            for federation in self.federations.values():
                try:
                    federation.tick()
                except Exception:
                    logger.exception("[Aggregator] deadline check of %s failed", federation)


def binding(
    federations: Mapping[str, Federation],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_streams: int = 12,
) -> ServiceBinding:
    return service_binding(
        SERVICE,
        AggregatorServicer(federations, chunk_bytes=chunk_bytes, max_streams=max_streams),
        [UPLOAD_REQUEST, DOWNLOAD_RESPONSE],
    )
