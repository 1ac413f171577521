"""gRPC servicer for splitfed.v1.Aggregator: converts messages, calls :class:`Federation`.

Every round RPC is for the federation's members only (an admin may read the round's
status, without its participants); a federation that does not exist and one the caller
is not a member of get the same PERMISSION_DENIED."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import grpc

from splitfed.errors import (
    InvalidArgumentError,
    UnauthenticatedError,
    stream_errors,
    unary_errors,
)
from splitfed.protocol.aggregator import (
    DOWNLOAD_RESPONSE,
    SERVICE,
    UPLOAD_REQUEST,
    Peer,
    Phase,
    RoundPlan,
)
from splitfed.security.authz import Policy
from splitfed.security.identity import Identity, peer_identity
from splitfed.services.aggregator.federation import (
    FINISHED,
    KEYS,
    REVEAL,
    UPLOAD,
    WAITING,
    Federation,
    not_a_member,
)
from splitfed.streams import StreamGuard
from splitfed.transport import ServiceBinding, service_binding
from splitfed.v1 import aggregator_pb2
from splitfed.wire import (
    DEFAULT_CHUNK_BYTES,
    IncomingFrame,
    OutgoingFrame,
    ReceiveBudget,
    TensorAssembler,
    TensorLimits,
    iter_frames,
)

logger = logging.getLogger(__name__)


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
    WAITING: Phase.WAITING,
    KEYS: Phase.KEYS,
    UPLOAD: Phase.UPLOAD,
    REVEAL: Phase.REVEAL,
    FINISHED: Phase.FINISHED,
}


def _caller(context: grpc.ServicerContext) -> Identity:
    identity = peer_identity(context)
    if identity is None:
        raise UnauthenticatedError("no client certificate identity")
    return identity


def to_plan(plan: Mapping[str, Any]) -> RoundPlan:
    """The contract's form of the plan :meth:`Federation.plan` returns."""
    return RoundPlan(
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
        peers=tuple(Peer(name, key) for name, key in sorted(plan["peers"].items())),
        secagg_scale=plan["secagg_scale"],
        dropped=tuple(plan["dropped"]),
        rounds=plan["rounds"],
        message=plan["message"],
        schema_digest=plan["schema_digest"],
    )


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

    def _federation(self, name: str, caller: Identity, *, join: bool = False) -> Federation:
        """The federation ``name`` for a caller that is one of its members (an admin may
        read any; ``join``: the caller is about to become one)."""
        federation = self.federations.get(name)
        if federation is None:
            raise not_a_member(caller.name, name)
        if not join and caller.role != "admin":
            federation.require_member(caller.name)
        return federation

    @staticmethod
    def _session_of(
        federation: Federation, head: aggregator_pb2.UploadUpdateRequest, owner: str
    ) -> tuple[str, str] | None:
        """The (backbone, session) an upload names, checked with that backbone to be the
        uploader's own session of this federation."""
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
        session = (head.backbone, head.backbone_session)
        if federation.server_adapters is not None:
            federation.server_adapters.verify(session, owner, settings.name)
        return session

    @unary_errors
    def Join(
        self, request: aggregator_pb2.JoinRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.JoinResponse:
        caller = _caller(context)
        federation = self._federation(request.federation, caller, join=True)
        federation.join(caller.name, int(request.num_samples), request.join_token)
        return aggregator_pb2.JoinResponse(plan=to_plan(federation.plan(caller.name)).to_proto())

    @unary_errors
    def GetRoundPlan(
        self, request: aggregator_pb2.GetRoundPlanRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.GetRoundPlanResponse:
        caller = _caller(context)
        federation = self._federation(request.federation, caller)
        federation.tick()
        plan = federation.plan(caller.name, member=caller.role != "admin")
        return aggregator_pb2.GetRoundPlanResponse(plan=to_plan(plan).to_proto())

    @unary_errors
    def AdvertiseKey(
        self, request: aggregator_pb2.AdvertiseKeyRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.AdvertiseKeyResponse:
        caller = _caller(context)
        self._federation(request.federation, caller).advertise_key(
            caller.name, request.round, request.attempt, request.public_key
        )
        return aggregator_pb2.AdvertiseKeyResponse()

    @unary_errors
    def RevealSeeds(
        self, request: aggregator_pb2.RevealSeedsRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.RevealSeedsResponse:
        caller = _caller(context)
        self._federation(request.federation, caller).reveal(
            caller.name, request.round, request.attempt, dict(request.seeds)
        )
        return aggregator_pb2.RevealSeedsResponse()

    @unary_errors
    def UploadUpdate(
        self,
        request_iterator: Iterator[IncomingFrame[aggregator_pb2.UploadUpdateRequest]],
        context: grpc.ServicerContext,
    ) -> aggregator_pb2.UploadUpdateResponse:
        caller = _caller(context)
        identity = caller.name
        with self.streams.open(context, request_iterator, identity=str(caller)) as frames:
            iterator = iter(frames)
            first = next(iterator, None)
            if first is None:
                raise InvalidArgumentError("an upload needs at least one message")
            head = first.message
            federation = self._federation(head.federation, caller)
            session = self._session_of(federation, head, identity)
            upload = federation.begin_upload(
                identity,
                head.round,
                head.attempt,
                head.base_version,
                int(head.num_samples),
                session,
            )
            if upload is None:
                for _ in iterator:  # already counted: drain, store nothing
                    pass
                return aggregator_pb2.UploadUpdateResponse(
                    duplicate=True, received=federation.plan(identity)["received"]
                )
            stream = _chain(first, iterator)
            del first  # a frame keeps its whole message (up to a chunk) alive
            try:
                # Chunks go straight to the spool file: the upload holds one message at a
                # time and none while it waits for the federation's lock.
                with TensorAssembler(self.limits, self.budget, sink=upload.writer) as assembler:
                    for frame in stream:
                        assembler.feed(frame.chunk_view())
                        del frame
                    assembler.finish()
                duplicate, received = federation.commit_upload(upload)
            finally:
                federation.end_upload(upload)
        return aggregator_pb2.UploadUpdateResponse(duplicate=duplicate, received=received)

    @stream_errors
    def DownloadGlobal(
        self, request: aggregator_pb2.DownloadGlobalRequest, context: grpc.ServicerContext
    ) -> Iterator[OutgoingFrame | aggregator_pb2.DownloadGlobalResponse]:
        caller = _caller(context)
        federation = self._federation(request.federation, caller)
        with self.streams.open(context, iter(()), identity=str(caller)) as stream:
            with federation.lock:
                version = request.version or federation.state.version
            tensors = federation.body(version) if request.body else federation.offset(version)
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
        seen = None
        with self.streams.open(context, iter(()), identity=str(caller)) as stream:
            while context.is_active():
                key = federation.wait_for_change(seen, self.watch_poll_s)
                federation.tick()
                if key == seen:
                    continue
                seen = key
                if caller.role != "admin":
                    federation.require_member(caller.name)  # still one
                plan = federation.plan(caller.name, member=caller.role != "admin")
                yield from stream.pace(
                    [
                        aggregator_pb2.WatchRoundResponse(
                            plan=to_plan(plan).to_proto(),
                            received=plan["received"],
                            participants=plan["participants"],
                            versions=plan["global_version"],
                        )
                    ]
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
    federations: Mapping[str, Federation],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_streams: int = 12,
) -> ServiceBinding:
    return service_binding(
        SERVICE,
        AggregatorServicer(federations, chunk_bytes=chunk_bytes, max_streams=max_streams),
        [UPLOAD_REQUEST, DOWNLOAD_RESPONSE],
    )
