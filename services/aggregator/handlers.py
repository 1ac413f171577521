"""Plain functions behind the Aggregator servicer: requests in, Python values out (round
plans as :class:`RoundPlan`, for a watch :class:`RoundView`), :mod:`splitfed.errors` for
everything wrong. The servicer only converts messages and calls these.

Every round call is for the federation's members only (an admin may read the round's
status, without its participants); a federation that does not exist and one the caller
is not a member of get the same PERMISSION_DENIED."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from splitfed.errors import InvalidArgumentError
from splitfed.protocol.aggregator import Phase, RoundPlan
from splitfed.security.identity import Identity
from splitfed.services.aggregator.federation import Federation, RoundView, not_a_member
from splitfed.v1 import aggregator_pb2
from splitfed.wire import IncomingFrame, ReceiveBudget, TensorAssembler, TensorLimits


def federation_for(
    federations: Mapping[str, Federation], name: str, caller: Identity, *, join: bool = False
) -> Federation:
    """The federation ``name`` for a caller that is one of its members (an admin may
    read any; ``join``: the caller is about to become one)."""
    federation = federations.get(name)
    if federation is None:
        raise not_a_member(caller.name, name)
    if not join and caller.role != "admin":
        federation.require_member(caller.name)
    return federation


def _view(federation: Federation, caller: Identity) -> RoundView:
    """The round as ``caller`` sees it (an admin: without the participants)."""
    return federation.plan(caller.name, member=caller.role != "admin")


def handle_join(
    request: aggregator_pb2.JoinRequest, federations: Mapping[str, Federation], caller: Identity
) -> RoundPlan:
    federation = federation_for(federations, request.federation, caller, join=True)
    federation.join(caller.name, int(request.num_samples), request.join_token)
    return federation.plan(caller.name).plan


def handle_get_plan(
    request: aggregator_pb2.GetRoundPlanRequest, federation: Federation, caller: Identity
) -> RoundPlan:
    federation.tick()
    return _view(federation, caller).plan


def handle_advertise_key(
    request: aggregator_pb2.AdvertiseKeyRequest, federation: Federation, caller: Identity
) -> None:
    federation.advertise_key(caller.name, request.round, request.attempt, request.public_key)


def handle_reveal(
    request: aggregator_pb2.RevealSeedsRequest, federation: Federation, caller: Identity
) -> None:
    federation.reveal(caller.name, request.round, request.attempt, dict(request.seeds))


def session_of(
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


def handle_upload(
    frames: Iterable[IncomingFrame[aggregator_pb2.UploadUpdateRequest]],
    federations: Mapping[str, Federation],
    caller: Identity,
    limits: TensorLimits,
    budget: ReceiveBudget,
) -> tuple[bool, int]:
    """One upload, its first message naming the federation and round: (duplicate,
    updates counted)."""
    identity = caller.name
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise InvalidArgumentError("an upload needs at least one message")
    head = first.message
    federation = federation_for(federations, head.federation, caller)
    session = session_of(federation, head, identity)
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
        return True, federation.plan(identity).received
    stream = _chain(first, iterator)
    del first  # a frame keeps its whole message (up to a chunk) alive
    try:
        # Chunks go straight to the spool file: the upload holds one message at a
        # time and none while it waits for the federation's lock.
        with TensorAssembler(limits, budget, sink=upload.writer) as assembler:
            for frame in stream:
                assembler.feed(frame.chunk_view())
                del frame
            assembler.finish()
        return federation.commit_upload(upload)
    finally:
        federation.end_upload(upload)


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    del first  # not kept while the rest of the stream is read
    yield from rest


def handle_download(
    request: aggregator_pb2.DownloadGlobalRequest, federation: Federation
) -> tuple[int, dict[str, torch.Tensor]]:
    """The version asked for (0: the latest) and its tensors: the global offset, or the
    average body adapter made with it."""
    version = request.version or federation.current_version()
    tensors = federation.body(version) if request.body else federation.offset(version)
    return version, tensors


def handle_watch(
    federation: Federation, caller: Identity, poll_s: float, active: Callable[[], bool]
) -> Iterator[RoundView]:
    """The round each time it changes, while ``active()``; ends after the plan of
    the federation's finish."""
    seen = None
    while active():
        key = federation.wait_for_change(seen, poll_s)
        federation.tick()
        if key == seen:
            continue
        seen = key
        if caller.role != "admin":
            federation.require_member(caller.name)  # still one
        view = _view(federation, caller)
        yield view
        if view.plan.phase == Phase.FINISHED:
            return
