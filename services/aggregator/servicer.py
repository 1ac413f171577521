"""gRPC servicer for splitfed.v1.Aggregator: converts messages, calls :class:`Federation`."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import grpc

from splitfed.errors import (
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
    stream_errors,
    unary_errors,
)
from splitfed.security.authz import Policy
from splitfed.security.identity import peer_identity
from splitfed.services.aggregator.federation import (
    FINISHED,
    KEYS,
    REVEAL,
    UPLOAD,
    WAITING,
    Federation,
)
from splitfed.streams import StreamGuard
from splitfed.transport import ServiceBinding, service_binding
from splitfed.v1 import aggregator_pb2
from splitfed.wire import (
    DEFAULT_CHUNK_BYTES,
    FrameSpec,
    IncomingFrame,
    OutgoingFrame,
    ReceiveBudget,
    TensorAssembler,
    TensorLimits,
    iter_frames,
)

logger = logging.getLogger(__name__)

SERVICE = aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"]
SERVICE_NAME = SERVICE.full_name
UPLOAD_REQUEST = FrameSpec(aggregator_pb2.UploadUpdateRequest)
DOWNLOAD_RESPONSE = FrameSpec(aggregator_pb2.DownloadGlobalResponse)

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

PHASES = {
    WAITING: aggregator_pb2.ROUND_PHASE_WAITING,
    KEYS: aggregator_pb2.ROUND_PHASE_KEYS,
    UPLOAD: aggregator_pb2.ROUND_PHASE_UPLOAD,
    REVEAL: aggregator_pb2.ROUND_PHASE_REVEAL,
    FINISHED: aggregator_pb2.ROUND_PHASE_FINISHED,
}


def _caller(context: grpc.ServicerContext) -> str:
    identity = peer_identity(context)
    if identity is None:
        raise UnauthenticatedError("no client certificate identity")
    return identity.name


def to_plan(plan: Mapping[str, Any]) -> aggregator_pb2.RoundPlan:
    return aggregator_pb2.RoundPlan(
        federation=plan["federation"],
        round=plan["round"],
        attempt=plan["attempt"],
        phase=PHASES[plan["phase"]],
        global_version=plan["global_version"],
        selected=plan["selected"],
        uploaded=plan["uploaded"],
        local_steps=plan["local_steps"],
        deadline=plan["deadline"],
        adapter_seed=plan["adapter_seed"],
        secure_aggregation=plan["secure_aggregation"],
        peers=[
            aggregator_pb2.Peer(identity=name, public_key=key)
            for name, key in sorted(plan["peers"].items())
        ],
        secagg_scale=plan["secagg_scale"],
        dropped=plan["dropped"],
        rounds=plan["rounds"],
        message=plan["message"],
    )


class AggregatorServicer:
    def __init__(
        self,
        federations: Mapping[str, Federation],
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        watch_poll_s: float = 1.0,
    ) -> None:
        self.federations = federations
        self.chunk_bytes = chunk_bytes
        self.watch_poll_s = watch_poll_s
        largest = max(f.settings.max_adapter_bytes for f in federations.values())
        self.limits = TensorLimits(max_tensor_bytes=largest, max_rank=4)
        self.budget = ReceiveBudget(max(2 * largest, 64 << 20))
        self.streams = StreamGuard("Aggregator", max_streams=64)

    def _federation(self, name: str) -> Federation:
        federation = self.federations.get(name)
        if federation is None:
            raise NotFoundError(
                f"no federation {name!r}; this aggregator runs "
                f"{', '.join(sorted(self.federations))}"
            )
        return federation

    @staticmethod
    def _session_of(
        federation: Federation, head: aggregator_pb2.UploadUpdateRequest
    ) -> tuple[str, str] | None:
        settings = federation.settings
        if not settings.server_adapters:
            return None
        if not head.backbone or not head.backbone_session:
            raise InvalidArgumentError(
                "this federation averages server-side adapters: the upload must name its "
                "backbone and backbone_session"
            )
        if head.backbone not in settings.backbones:
            raise InvalidArgumentError(
                f"backbone {head.backbone!r} is not one of this federation's backbones "
                f"({', '.join(settings.backbones)})"
            )
        return head.backbone, head.backbone_session

    @unary_errors
    def Join(
        self, request: aggregator_pb2.JoinRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.JoinResponse:
        federation = self._federation(request.federation)
        identity = _caller(context)
        federation.join(identity)
        return aggregator_pb2.JoinResponse(plan=to_plan(federation.plan(identity)))

    @unary_errors
    def GetRoundPlan(
        self, request: aggregator_pb2.GetRoundPlanRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.GetRoundPlanResponse:
        federation = self._federation(request.federation)
        identity = _caller(context)
        federation.tick()
        return aggregator_pb2.GetRoundPlanResponse(plan=to_plan(federation.plan(identity)))

    @unary_errors
    def AdvertiseKey(
        self, request: aggregator_pb2.AdvertiseKeyRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.AdvertiseKeyResponse:
        self._federation(request.federation).advertise_key(
            _caller(context), request.round, request.attempt, request.public_key
        )
        return aggregator_pb2.AdvertiseKeyResponse()

    @unary_errors
    def RevealSeeds(
        self, request: aggregator_pb2.RevealSeedsRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.RevealSeedsResponse:
        self._federation(request.federation).reveal(
            _caller(context), request.round, request.attempt, dict(request.seeds)
        )
        return aggregator_pb2.RevealSeedsResponse()

    @unary_errors
    def UploadUpdate(
        self,
        request_iterator: Iterator[IncomingFrame[aggregator_pb2.UploadUpdateRequest]],
        context: grpc.ServicerContext,
    ) -> aggregator_pb2.UploadUpdateResponse:
        identity = _caller(context)
        with self.streams.open(context, request_iterator) as frames:
            iterator = iter(frames)
            first = next(iterator, None)
            if first is None:
                raise InvalidArgumentError("an upload needs at least one message")
            head = first.message
            federation = self._federation(head.federation)
            args = (identity, head.round, head.attempt, head.base_version)
            session = self._session_of(federation, head)
            if not federation.start_upload(*args):
                for _ in iterator:  # already counted: drain, store nothing
                    pass
                return aggregator_pb2.UploadUpdateResponse(
                    duplicate=True, received=federation.plan(identity)["received"]
                )
            spool, out = federation.new_spool()
            stream = _chain(first, iterator)
            del first  # a frame keeps its whole message (up to a chunk) alive
            try:
                # Chunks go straight to the spool file: the upload holds one message at a
                # time and none while it waits for the federation's lock.
                with out, TensorAssembler(self.limits, self.budget, sink=out) as assembler:
                    for frame in stream:
                        assembler.feed(frame.chunk_view())
                        del frame
                    assembler.finish()
                duplicate, received = federation.commit_upload(
                    *args, int(head.num_samples), spool, session
                )
            finally:
                with contextlib.suppress(FileNotFoundError):
                    spool.path.unlink()
        return aggregator_pb2.UploadUpdateResponse(duplicate=duplicate, received=received)

    @stream_errors
    def DownloadGlobal(
        self, request: aggregator_pb2.DownloadGlobalRequest, context: grpc.ServicerContext
    ) -> Iterator[OutgoingFrame | aggregator_pb2.DownloadGlobalResponse]:
        federation = self._federation(request.federation)
        identity = _caller(context)
        with federation.lock:
            federation.require_member(identity)
            version = request.version or federation.state.version
        tensors = federation.offset(version)
        if not tensors:
            yield aggregator_pb2.DownloadGlobalResponse(version=version)
            return
        for name in sorted(tensors):
            for frame in iter_frames(
                tensors[name], name, DOWNLOAD_RESPONSE, chunk_bytes=self.chunk_bytes
            ):
                frame.message.version = version  # type: ignore[attr-defined]
                yield frame

    @stream_errors
    def WatchRound(
        self, request: aggregator_pb2.WatchRoundRequest, context: grpc.ServicerContext
    ) -> Iterator[aggregator_pb2.WatchRoundResponse]:
        federation = self._federation(request.federation)
        identity = _caller(context)
        seen = None
        while context.is_active():
            key = federation.wait_for_change(seen, self.watch_poll_s)
            federation.tick()
            if key == seen:
                continue
            seen = key
            plan = federation.plan(identity)
            yield aggregator_pb2.WatchRoundResponse(
                plan=to_plan(plan),
                received=plan["received"],
                participants=plan["participants"],
                versions=plan["global_version"],
            )
            if plan["phase"] == FINISHED:
                return


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    del first  # not kept while the rest of the stream is read
    yield from rest


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
    federations: Mapping[str, Federation], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> ServiceBinding:
    return service_binding(
        SERVICE,
        AggregatorServicer(federations, chunk_bytes=chunk_bytes),
        [UPLOAD_REQUEST, DOWNLOAD_RESPONSE],
    )
