"""Client-batch: the training passes of concurrent sessions run merged, as one batched
pass; in shared adapter mode their steps are one optimizer step, in per-client mode each
member steps its own adapter (see "Per-client mode" below).

A *round* is one merged optimizer step. A session joins the round that is forming with
the forward pass of its step's first micro-batch; the round closes (its membership is
then fixed) when it holds ``max_merged_sessions`` sessions, when every session with an
open training stream has joined one, or ``batch_window_ms`` after it could start. One
round runs at a time, so every round's gradient is taken at the adapter the previous
round left (no stale gradients, no graph broken by another session's step).

In a round, micro-batch ``i`` of every member that has not yet sent STEP is one merged
pass: hidden states and masks are right-padded to the longest sequence (padding is
hidden zeros with mask 0, which no real position attends to or counts: positions come
from the mask) and concatenated along the batch; the output is split back and the
padding stripped. The pass keeps its graph until every member has sent its gradient;
one backward then runs over the concatenated gradients (zero at padding) and the input
gradients are split back the same way.

STEP (shared mode): when every member has sent its STEP, the adapter's gradient (the sum of the
members' gradients) is divided by the number of members, so the step follows the
gradient of the *mean of the members' losses*: with equal batch sizes and each client's
loss a mean over its batch, the gradient of the mean loss over the concatenated batch.
Global-norm clipping takes the backbone's squared norm plus every member's client
squared norm; each member is told, as ``backbone_grad_sq_norm``, everything but its own
part (the backbone's and the other members'), so every client scales by the same factor
as the backbone. The optimizer steps once; each member's session advances one step,
stores its reply and is checkpointed, so a repeated STEP is answered from the store.

Per-client mode: every session trains its own adapter on bodies that share one frozen
body. A round's members are sessions that can share a pass (the same split (k, m) and
adapter kind and target modules; others form rounds of their own), and a merged pass is
one :class:`~splitfed.models.multi_adapter.MultiAdapterBody` pass: the frozen matmuls once
for all rows, each member's rows through its own LoRA (or prefix), so the one backward
fills each member's own adapter gradient only. STEP keeps the round semantics above (the
round is applied once every member sent its STEP, in one job; a member that goes away
aborts the round for all) but each member's step is exactly its step alone: its own
global-norm clipping (its backbone squared norm plus its own client's), its own AdamW
step and schedule, its own reply; nothing is shared between members but the passes.
Rounds do not wait for each other: their members share no adapter, so every round may
run (its jobs taking turns with the others' on the compute queue), and a session whose
step begins while the other sessions are all in running rounds starts a round at once.
Sessions then fall into groups that pipeline: one group's passes run while another's
clients compute. Multi-adapter bodies of the latest member sets are kept (building one
copies no tensor, but walks and copies the module tree).

A member that goes away (its training stream ends, a new stream of its session starts)
before the round is applied, or a round that waits ``batch_timeout_s`` for a member's
next frame, ends the round: nothing is applied and every member gets ABORTED
(:class:`~splitfed.errors.AbortedError`), now or at its next frame, and redoes the step
on a new stream. A session that leaves a round that has not started yet just leaves.

One module of some 800 lines: the rounds, their merged passes and the threads that wait
on them share one condition variable and one set of invariants (in shared mode one round
runs at a time; a member is in at most one round), which are checked in one place. It depends only
on the session (:mod:`.sessions`), the compute queue, the settings and the STEP command
of the contract (:class:`~splitfed.protocol.backbone.StepCommand`).
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from splitfed.errors import (
    AbortedError,
    FailedPreconditionError,
    InvalidArgumentError,
    SplitfedError,
)
from splitfed.logs import redact
from splitfed.models.multi_adapter import MultiAdapterBody
from splitfed.models.parts import Body
from splitfed.protocol.backbone import StepCommand
from splitfed.services.backbone.compute import ComputeQueue
from splitfed.services.backbone.sessions import Session
from splitfed.services.backbone.settings import BackboneSettings

logger = logging.getLogger(__name__)

# The compute queue's turn for merged work (one job at a time, like every session's).
BATCH_KEY = "client-batch"
# Per-client mode: multi-adapter bodies kept, one per member set (module trees, no tensors).
MULTI_BODIES = 16
# A client's turnaround is learnt as an EWMA of this weight; a round waits for a session
# until its turnaround times this slack (at least the window) after its last step came
# back; a pause longer than the limit is not a turnaround.
EWMA = 0.3
WINDOW_SLACK = 1.5
IDLE_LIMIT_S = 60.0


class _Phase(enum.Enum):
    JOINING = "joining"
    FORWARD = "forward"
    FORWARDED = "forwarded"
    BACKWARD = "backward"
    DONE = "done"


@dataclass(eq=False)
class _Slot:
    """One member's rows in a merged pass (its inputs are dropped once used)."""

    session: Session
    rows: int
    tokens: int
    hidden: torch.Tensor | None
    mask: torch.Tensor | None
    output: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    grad_in: torch.Tensor | None = None
    # This member's share of the merged graph's estimated bytes (the backbone's quotas).
    graph_bytes: int = 0


@dataclass(eq=False)
class _Pass:
    """One merged micro-batch: a forward over the members' rows, kept for one backward."""

    micro: int
    slots: dict[str, _Slot] = field(default_factory=dict)
    phase: _Phase = _Phase.JOINING
    hidden: torch.Tensor | None = None
    output: torch.Tensor | None = None
    # Per-client mode: each member's h1 (leaves) and h2, in the order of ``slots``.
    leaves: list[torch.Tensor] | None = None
    outputs: list[torch.Tensor] | None = None


@dataclass(eq=False)
class _Round:
    """One merged optimizer step (per-client mode: one step per member, applied together)."""

    number: int
    progress: float
    # Per-client mode: what a session must share with the members to join (_batch_key).
    key: tuple[Any, ...] = ()
    members: dict[str, Session] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    passes: dict[int, _Pass] = field(default_factory=dict)
    commands: dict[str, StepCommand] = field(default_factory=dict)
    # Membership is fixed once the first merged pass starts.
    closed: bool = False
    deadline: float = float("inf")
    busy: bool = False
    applying: bool = False
    results: dict[str, dict[str, Any]] | None = None
    error: Exception | None = None

    def awaited(self) -> list[str]:
        """The members whose next frame the round waits for."""
        for merged in self.passes.values():
            if merged.phase is _Phase.JOINING and merged.micro > 0:
                expected = set(self.members) - set(self.commands)
                return sorted(expected - set(merged.slots))
            if merged.phase is _Phase.FORWARDED:
                return sorted(s for s, slot in merged.slots.items() if slot.grad is None)
        return sorted(set(self.members) - set(self.commands))


@dataclass(frozen=True)
class _Work:
    """A merged job of a round, and what to do with its result (under the lock)."""

    rnd: _Round
    what: str
    sessions: int
    job: Callable[[], Any]
    finish: Callable[[Any], None]
    operation: str = "other"  # the compute time metric's label


def _pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """``tensor`` with zeros appended along dim 1 up to ``length``."""
    missing = length - tensor.shape[1]
    if missing == 0:
        return tensor
    shape = (tensor.shape[0], missing, *tensor.shape[2:])
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=1)


def _pieces(merged: torch.Tensor, slots: list[_Slot]) -> list[torch.Tensor]:
    """Each slot's rows of ``merged`` without the padding."""
    pieces, start = [], 0
    for slot in slots:
        pieces.append(merged[start : start + slot.rows, : slot.tokens].detach().contiguous())
        start += slot.rows
    return pieces


def _ordered(merged: _Pass) -> list[_Slot]:
    """The pass's slots by session id: the same members give the same order, so the
    multi-adapter body built for them is found again (per-client mode)."""
    return [merged.slots[sid] for sid in sorted(merged.slots)]


def _group_max_norm(commands: dict[str, StepCommand]) -> float:
    """The smallest positive max norm the members asked for (0: none asked to clip)."""
    positive = [c.max_grad_norm for c in commands.values() if c.max_grad_norm > 0]
    return min(positive) if positive else 0.0


class ClientBatcher:
    """Merges the training passes and steps of concurrent sessions: of one shared adapter
    (shared mode), or each of its own adapter (per-client mode: multi-adapter passes).

    ``forward``, ``backward`` and ``step`` are called from the sessions' stream threads
    (not from compute-queue jobs: they wait for the other members); the merged work runs
    on ``queue`` in the thread of whichever member finds it ready.
    """

    def __init__(
        self,
        settings: BackboneSettings,
        queue: ComputeQueue,
        checkpoint: Callable[[Session], None],
    ) -> None:
        self.window_s = settings.batch_window_ms / 1000
        self.max_sessions = settings.max_merged_sessions
        self.timeout_s = settings.batch_timeout_s
        self._queue = queue
        self._checkpoint = checkpoint
        self._cond = threading.Condition(threading.Lock())
        # Rounds in order; only the first one runs.
        self._rounds: deque[_Round] = deque()
        self._round_of: dict[str, _Round] = {}
        # Why a session's round ended without it: raised at its next frame.
        self._aborted: dict[str, str] = {}
        # Open training streams per session.
        self._live: Counter[str] = Counter()
        # When each session's last step came back, and its client's turnaround (EWMA):
        # a round does not wait for a session that is idle.
        self._returned: dict[str, float] = {}
        self._turnaround: dict[str, float] = {}
        self._numbers = itertools.count(1)
        # Sessions per merged pass (the latest ones), and rounds applied.
        self.pass_sizes: deque[int] = deque(maxlen=1024)
        self.rounds_applied = 0
        # Per-client mode: each member its own adapter and step.
        self.per_client = settings.adapter_mode == "per-client"
        # Multi-adapter bodies of the latest member sets (per-client mode), by their
        # bodies' ids (the entry holds the bodies, so the ids stay theirs); own lock: jobs
        # read it outside the condition's.
        self._multi: OrderedDict[tuple[int, ...], tuple[tuple[Body, ...], MultiAdapterBody]]
        self._multi = OrderedDict()
        self._multi_lock = threading.Lock()

    @property
    def queued_sessions(self) -> int:
        """Sessions in a round now (running or forming)."""
        with self._cond:
            return len(self._round_of)

    # --- streams and sessions --------------------------------------------------------

    def attach(self, session: Session) -> None:
        """A training stream of ``session`` opened."""
        with self._cond:
            self._live[session.session_id] += 1

    def detach(self, session: Session, generation: int) -> None:
        """A training stream of ``session`` ended; if it was the newest, the session
        leaves its round."""
        sid = session.session_id
        with self._cond:
            self._live[sid] -= 1
            if self._live[sid] <= 0:
                del self._live[sid]
            if session.generation == generation:
                self._leave(sid, "ended its training stream")
            self._cond.notify_all()

    def forget(self, session: Session) -> None:
        """``session`` closed or expired: its client's timings are dropped."""
        with self._cond:
            self._returned.pop(session.session_id, None)
            self._turnaround.pop(session.session_id, None)

    def discard(self, session: Session) -> None:
        """``session`` starts its step over (a new stream, ZERO_GRAD, closed): it leaves
        its round, and what an ended round left for it is forgotten."""
        sid = session.session_id
        with self._cond:
            self._leave(sid, "started its step over")
            self._aborted.pop(sid, None)
            with self._multi_lock:  # they hold the session's body (a closed one's too)
                for key in [k for k, (bodies, _) in self._multi.items() if id(session.body) in k]:
                    del self._multi[key]
            self._cond.notify_all()

    # --- the training operations -----------------------------------------------------

    def pending_of(self, session: Session) -> tuple[int, int]:
        """(passes, estimated graph bytes) of ``session``'s forwards in its round that
        await their gradient (its inputs queued, or the merged graph kept for it)."""
        sid = session.session_id
        with self._cond:
            rnd = self._round_of.get(sid)
            if rnd is None or rnd.error is not None:
                return 0, 0
            slots = [
                merged.slots[sid]
                for merged in rnd.passes.values()
                if sid in merged.slots and merged.phase is not _Phase.DONE
            ]
            return len(slots), sum(slot.graph_bytes for slot in slots)

    def forward(
        self,
        session: Session,
        step: int,
        micro: int,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        *,
        graph_bytes: int = 0,
    ) -> torch.Tensor:
        """h2 of one micro-batch, computed in a pass merged with other sessions'
        (``graph_bytes``: what its rows of the merged graph are estimated to hold)."""
        sid = session.session_id
        with self._cond:
            self._raise_if_aborted(sid)
            rnd = self._round_of.get(sid)
            if rnd is None:
                if micro != 0:
                    raise FailedPreconditionError(
                        f"step {step} micro-batch {micro} came without its micro-batch 0; "
                        "redo the step from its first micro-batch"
                    )
                session.expect_next_step(step)
                self._note_arrival(sid)
                rnd = self._joinable(self._batch_key(session))
                rnd.members[sid] = session
                rnd.steps[sid] = step
                self._round_of[sid] = rnd
                merged = rnd.passes.setdefault(0, _Pass(0))
            else:
                if step != rnd.steps[sid]:
                    raise FailedPreconditionError(
                        f"the session is in step {rnd.steps[sid]}; got step {step}"
                    )
                if sid in rnd.commands:
                    raise FailedPreconditionError(f"step {step} was already sent to be applied")
                merged = rnd.passes.setdefault(micro, _Pass(micro))
                if sid in merged.slots:
                    raise FailedPreconditionError(
                        f"step {step} micro-batch {micro} was already sent forward"
                    )
                if merged.phase is not _Phase.JOINING:
                    raise FailedPreconditionError(
                        f"micro-batch {micro} of the merged step ran without this session"
                    )
            slot = _Slot(session, hidden.shape[0], hidden.shape[1], hidden, mask)
            slot.graph_bytes = graph_bytes
            merged.slots[sid] = slot
            self._progress(rnd)
            self._drive(rnd, sid, lambda: slot.output is not None)
            assert slot.output is not None
            return slot.output

    def backward(self, session: Session, step: int, micro: int, grad: torch.Tensor) -> torch.Tensor:
        """dL/dh1 of one micro-batch, from a backward merged with the pass's members'."""
        sid = session.session_id
        with self._cond:
            self._raise_if_aborted(sid)
            rnd = self._round_of.get(sid)
            merged = rnd.passes.get(micro) if rnd is not None and rnd.steps[sid] == step else None
            slot = merged.slots.get(sid) if merged is not None else None
            if (
                rnd is None
                or merged is None
                or slot is None
                or merged.phase is not _Phase.FORWARDED
                or slot.grad is not None
            ):
                raise FailedPreconditionError(
                    f"no forward pass of step {step} micro-batch {micro} is waiting for its "
                    "gradient"
                )
            assert slot.output is not None
            if grad.shape != slot.output.shape:
                raise InvalidArgumentError(
                    f"grad_h2 must have the shape of h2 {list(slot.output.shape)}, "
                    f"got {list(grad.shape)}"
                )
            slot.grad = grad
            self._progress(rnd)
            self._drive(rnd, sid, lambda: slot.grad_in is not None)
            assert slot.grad_in is not None
            return slot.grad_in

    def step(
        self, session: Session, step: int, client_sq_norm: float, max_norm: float
    ) -> dict[str, Any]:
        """Apply the round once every member sent its STEP; this member's reply."""
        sid = session.session_id
        with self._cond:
            self._raise_if_aborted(sid)
            rnd = self._round_of.get(sid)
            if rnd is None:
                raise FailedPreconditionError(
                    f"step {step} has no forward pass to apply; with client-batch a step "
                    "starts with its micro-batch 0"
                )
            if rnd.steps[sid] != step:
                raise session.cannot_apply(step)
            waiting = sum(
                1
                for merged in rnd.passes.values()
                if sid in merged.slots and merged.slots[sid].grad_in is None
            )
            if waiting:
                raise FailedPreconditionError(
                    f"{waiting} forward passes of step {step} still await their gradients"
                )
            joined = rnd
            if sid in joined.commands:
                # Repeated (by a client that reconnected while the round was applied).
                self._drive(joined, sid, lambda: joined.results is not None)
                assert joined.results is not None
                return {**joined.results[sid], "already_applied": True}
            joined.commands[sid] = StepCommand(client_sq_norm, max_norm)
            self._progress(joined)
            self._drive(joined, sid, lambda: joined.results is not None)
            assert joined.results is not None
            return dict(joined.results[sid])

    # --- rounds (everything below runs with the lock held) ---------------------------

    def _raise_if_aborted(self, sid: str) -> None:
        reason = self._aborted.get(sid)
        if reason is not None:
            raise AbortedError(reason)

    def _progress(self, rnd: _Round) -> None:
        rnd.progress = time.monotonic()
        self._cond.notify_all()

    def _batch_key(self, session: Session) -> tuple[Any, ...]:
        """Sessions with equal keys can share a pass (per-client mode: one multi-adapter
        pass needs the same blocks and the same kind of adapter on the same modules)."""
        if not self.per_client:
            return ()
        adapter = session.trainable.adapter
        return (session.k, session.m, adapter.kind, tuple(adapter.target_modules))

    def _joinable(self, key: tuple[Any, ...]) -> _Round:
        for rnd in reversed(self._rounds):
            if not rnd.closed and rnd.key == key and len(rnd.members) < self.max_sessions:
                return rnd
        rnd = _Round(next(self._numbers), progress=time.monotonic(), key=key)
        self._rounds.append(rnd)
        self._promote()
        return rnd

    def _running(self) -> list[_Round]:
        """The rounds that may run: the first one (shared mode: each round's gradient is
        taken at the adapter the previous one left), or every one (per-client mode: the
        members of two rounds share no adapter, so their rounds are independent; their
        jobs still take turns on the compute queue)."""
        return list(self._rounds) if self.per_client else list(self._rounds)[:1]

    def _promote(self) -> None:
        """Start the window of the rounds that may now run."""
        for rnd in self._running():
            if rnd.deadline == float("inf"):
                rnd.deadline = time.monotonic() + self.window_s

    def _note_arrival(self, sid: str) -> None:
        """``sid`` begins a step: learn how long its client took since its last step came
        back (an EWMA; a pause longer than ``IDLE_LIMIT_S`` is not a turnaround)."""
        returned = self._returned.get(sid)
        if returned is None:
            return
        gap = time.monotonic() - returned
        if gap <= IDLE_LIMIT_S:
            last = self._turnaround.get(sid)
            self._turnaround[sid] = gap if last is None else last + EWMA * (gap - last)

    def _due(self, sid: str, now: float) -> bool:
        """Whether a round should wait for ``sid``: it has not finished a step yet, or its
        last one came back less than the window (or 1.5 x its client's usual turnaround)
        ago. A session idle longer than that is not waited for (an idle device runs the
        others at once)."""
        returned = self._returned.get(sid)
        return returned is None or now < returned + self._patience(sid)

    def _patience(self, sid: str) -> float:
        return max(self.window_s, WINDOW_SLACK * self._turnaround.get(sid, 0.0))

    def _everyone_joined(self) -> bool:
        """Every session with an open training stream is in a round, or idle."""
        now = time.monotonic()
        return all(sid in self._round_of or not self._due(sid, now) for sid in self._live)

    def _leave(self, sid: str, reason: str) -> None:
        rnd = self._round_of.get(sid)
        if rnd is None or rnd.applying:
            return
        if not rnd.closed:
            # It has not started: the others go on without this session.
            del rnd.members[sid], rnd.steps[sid], self._round_of[sid]
            rnd.passes[0].slots.pop(sid, None)
            if not rnd.members:
                self._rounds.remove(rnd)
                self._promote()
            logger.info("[Backbone.Train] session %s left merged step %d", redact(sid), rnd.number)
            return
        logger.warning(
            "[Backbone.Train] merged step %d of %d sessions aborted: session %s %s",
            rnd.number,
            len(rnd.members),
            redact(sid),
            reason,
        )
        self._end(rnd, AbortedError(f"a session merged into this step {reason}; redo the step"))

    def _end(self, rnd: _Round, error: Exception | None) -> None:
        """Take ``rnd`` out: applied (``error`` None) or given up."""
        if rnd in self._rounds:
            self._rounds.remove(rnd)
        now = time.monotonic()
        for sid in rnd.members:
            self._returned[sid] = now
            if self._round_of.get(sid) is rnd:
                del self._round_of[sid]
            if error is not None:
                self._aborted[sid] = (
                    str(error)
                    if isinstance(error, AbortedError)
                    else "a merged pass failed on the backbone; redo the step"
                )
        if error is not None:
            rnd.error = error
        for merged in rnd.passes.values():
            merged.hidden = merged.output = None
            merged.leaves = merged.outputs = None
        self._promote()
        self._cond.notify_all()

    def _drive(self, rnd: _Round, sid: str, done: Callable[[], bool]) -> None:
        """Wait until ``done()``, meanwhile running whatever merged work is ready."""
        while True:
            if rnd.error is not None:
                error = rnd.error
                if isinstance(error, SplitfedError):
                    raise type(error)(str(error))
                raise AbortedError("a merged pass failed on the backbone; redo the step")
            if done():
                return
            if self._round_of.get(sid) is not rnd:
                raise AbortedError("this step was started over on another stream")
            work = self._ready_work()
            if work is not None:
                self._run(work)
                continue
            self._cond.wait(self._tick())

    def _tick(self) -> float | None:
        """Give up a running round that waited too long for a member; how long a waiter
        may sleep before something is due."""
        waits = [self._round_tick(rnd) for rnd in self._running()]
        due = [wait for wait in waits if wait is not None]
        return min(due) if due else None

    def _round_tick(self, head: _Round) -> float | None:
        now = time.monotonic()
        if not head.closed:
            # The window's end, or sooner when the last session awaited turns idle.
            idle_at = [
                self._returned[sid] + self._patience(sid)
                for sid in self._live
                if sid not in self._round_of and sid in self._returned
            ]
            return max(0.0, min([head.deadline, *(t for t in idle_at if t > now)]) - now)
        if head.busy or head.applying:
            return None  # the job's end notifies
        idle = now - head.progress
        if idle < self.timeout_s:
            return self.timeout_s - idle
        logger.warning(
            "[Backbone.Train] merged step %d aborted: no frame from session(s) %s for %.1f s",
            head.number,
            ", ".join(redact(sid) for sid in head.awaited()),
            idle,
        )
        self._end(
            head,
            AbortedError(
                f"a session merged into this step sent nothing for {self.timeout_s:g} s; "
                "redo the step"
            ),
        )
        return 0.0

    def _ready_work(self) -> _Work | None:
        """Claim a running round's next merged job, if one is ready."""
        for rnd in self._running():
            work = self._round_work(rnd)
            if work is not None:
                return work
        return None

    def _round_work(self, rnd: _Round) -> _Work | None:
        if rnd.busy or rnd.applying:
            return None
        for merged in rnd.passes.values():
            if merged.phase is _Phase.JOINING and self._may_start(rnd, merged):
                rnd.closed = True
                merged.phase = _Phase.FORWARD
                return self._forward_work(rnd, merged)
            if merged.phase is _Phase.FORWARDED and all(
                slot.grad is not None for slot in merged.slots.values()
            ):
                merged.phase = _Phase.BACKWARD
                return self._backward_work(rnd, merged)
        passes_done = all(p.phase is _Phase.DONE for p in rnd.passes.values())
        if passes_done and rnd.members and set(rnd.commands) == set(rnd.members):
            rnd.applying = True
            return self._apply_work(rnd)
        return None

    def _may_start(self, rnd: _Round, merged: _Pass) -> bool:
        if merged.micro > 0:
            expected = set(rnd.members) - set(rnd.commands)
            return expected <= set(merged.slots)
        return (
            len(rnd.members) >= self.max_sessions
            or time.monotonic() >= rnd.deadline
            or self._everyone_joined()
        )

    def _run(self, work: _Work) -> None:
        """Run a claimed job on the compute queue, without the lock."""
        rnd = work.rnd
        rnd.busy = True
        self._cond.release()
        started = time.perf_counter()
        try:
            result: Any = self._queue.run(BATCH_KEY, work.job, work.operation)
        except Exception as exc:
            result = exc
        finally:
            elapsed = time.perf_counter() - started
            self._cond.acquire()
        rnd.busy = False
        rnd.progress = time.monotonic()
        logger.debug(
            "[Backbone.Train] merged step %d %s: %d sessions, %.1f ms",
            rnd.number,
            work.what,
            work.sessions,
            elapsed * 1000,
        )
        work.finish(result)
        self._cond.notify_all()

    def _failed(self, rnd: _Round, result: Any) -> bool:
        """End ``rnd`` if its job failed; whether it did (or the round ended meanwhile)."""
        if isinstance(result, Exception):
            logger.error("[Backbone.Train] merged step %d failed", rnd.number, exc_info=result)
            if rnd.error is None:
                self._end(rnd, result)
            return True
        return rnd.error is not None

    # --- the merged jobs (run on the compute queue) ----------------------------------

    def _multi_body(self, bodies: tuple[Body, ...]) -> MultiAdapterBody:
        """The multi-adapter body over ``bodies``, kept for the next passes of the same
        members (the ``MULTI_BODIES`` latest member sets): building one walks and copies
        the module tree, some 60 ms for a 14-block body and 8 sessions on a CPU, about a
        third of their merged pass. On the compute queue, so one job at a time."""
        key = tuple(id(body) for body in bodies)
        with self._multi_lock:
            cached = self._multi.get(key)
            if cached is not None:
                self._multi.move_to_end(key)
                return cached[1]
        multi = MultiAdapterBody(bodies)
        with self._multi_lock:
            self._multi[key] = (bodies, multi)
            while len(self._multi) > MULTI_BODIES:
                self._multi.popitem(last=False)
        return multi

    def _forward_work(self, rnd: _Round, merged: _Pass) -> _Work:
        if self.per_client:
            return self._per_client_forward_work(rnd, merged)
        slots = list(merged.slots.values())

        def job() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
            trainable = slots[0].session.trainable
            if merged.micro == 0:
                # A round's gradient starts at zero (a given-up round may have left some).
                trainable.optimizer.zero_grad(set_to_none=True)
            length = max(slot.tokens for slot in slots)
            inputs = [(slot.hidden, slot.mask) for slot in slots]
            hidden = torch.cat([_pad(h, length) for h, _ in inputs if h is not None])
            mask_dtype = inputs[0][1].dtype if inputs[0][1] is not None else torch.long
            mask = torch.cat([_pad(m.to(mask_dtype), length) for _, m in inputs if m is not None])
            hidden.requires_grad_(True)
            with torch.enable_grad():
                output: torch.Tensor = trainable.body(hidden, mask)
            return hidden, output, _pieces(output, slots)

        def finish(result: Any) -> None:
            if self._failed(rnd, result):
                return
            merged.hidden, merged.output, pieces = result
            for slot, piece in zip(slots, pieces, strict=True):
                slot.output, slot.hidden, slot.mask = piece, None, None
            merged.phase = _Phase.FORWARDED
            self.pass_sizes.append(len(slots))

        what = f"forward of micro-batch {merged.micro}"
        return _Work(rnd, what, len(slots), job, finish, "forward")

    def _per_client_forward_work(self, rnd: _Round, merged: _Pass) -> _Work:
        slots = _ordered(merged)

        def job() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            if merged.micro == 0:
                # A round's gradients start at zero (a given-up round may have left some).
                for slot in slots:
                    slot.session.trainable.optimizer.zero_grad(set_to_none=True)
            leaves, masks = [], []
            for slot in slots:
                assert slot.hidden is not None and slot.mask is not None
                leaves.append(slot.hidden.detach().requires_grad_(True))
                masks.append(slot.mask)
            with torch.enable_grad():
                if len(slots) == 1:
                    outputs = [slots[0].session.body(leaves[0], masks[0])]
                else:
                    multi = self._multi_body(tuple(slot.session.body for slot in slots))
                    outputs = multi(leaves, masks)
            return leaves, outputs

        def finish(result: Any) -> None:
            if self._failed(rnd, result):
                return
            merged.leaves, merged.outputs = result
            assert merged.outputs is not None
            for slot, output in zip(slots, merged.outputs, strict=True):
                slot.output = output.detach().contiguous()
                slot.hidden = slot.mask = None
            merged.phase = _Phase.FORWARDED
            self.pass_sizes.append(len(slots))

        what = f"multi-adapter forward of micro-batch {merged.micro}"
        return _Work(rnd, what, len(slots), job, finish, "forward")

    def _backward_work(self, rnd: _Round, merged: _Pass) -> _Work:
        if self.per_client:
            return self._per_client_backward_work(rnd, merged)
        slots = list(merged.slots.values())
        hidden, output = merged.hidden, merged.output
        assert hidden is not None and output is not None

        def job() -> list[torch.Tensor]:
            grad = torch.zeros_like(output)
            start = 0
            for slot in slots:
                assert slot.grad is not None
                grad[start : start + slot.rows, : slot.tokens] = slot.grad.to(
                    device=output.device, dtype=output.dtype
                )
                start += slot.rows
            torch.autograd.backward(output, grad)
            assert hidden.grad is not None
            return _pieces(hidden.grad, slots)

        def finish(result: Any) -> None:
            merged.hidden = merged.output = None  # the graph is spent
            if self._failed(rnd, result):
                return
            for slot, piece in zip(slots, result, strict=True):
                slot.grad_in, slot.grad = piece, None
            merged.phase = _Phase.DONE

        what = f"backward of micro-batch {merged.micro}"
        return _Work(rnd, what, len(slots), job, finish, "backward")

    def _per_client_backward_work(self, rnd: _Round, merged: _Pass) -> _Work:
        slots = _ordered(merged)
        leaves, outputs = merged.leaves, merged.outputs
        assert leaves is not None and outputs is not None

        def job() -> list[torch.Tensor]:
            grads = []
            for slot, output in zip(slots, outputs, strict=True):
                assert slot.grad is not None
                grads.append(slot.grad.to(device=output.device, dtype=output.dtype))
            torch.autograd.backward(outputs, grads)
            result = []
            for leaf in leaves:
                assert leaf.grad is not None
                result.append(leaf.grad.detach())
            return result

        def finish(result: Any) -> None:
            merged.leaves = merged.outputs = None  # the graph is spent
            if self._failed(rnd, result):
                return
            for slot, piece in zip(slots, result, strict=True):
                slot.grad_in, slot.grad = piece, None
            merged.phase = _Phase.DONE

        what = f"multi-adapter backward of micro-batch {merged.micro}"
        return _Work(rnd, what, len(slots), job, finish, "backward")

    def _apply_work(self, rnd: _Round) -> _Work:
        if self.per_client:
            return self._per_client_apply_work(rnd)
        members, commands, steps = dict(rnd.members), dict(rnd.commands), dict(rnd.steps)

        def job() -> dict[str, dict[str, Any]]:
            # The mean of the members' losses: their gradients summed, over their count;
            # clipped by the norm of everything (the backbone's and every client's).
            clients_sq = sum(c.client_grad_sq_norm for c in commands.values())
            trainable = next(iter(members.values())).trainable
            backbone_sq, learning_rate = trainable.step(
                clients_sq, _group_max_norm(commands), mean_of=len(members)
            )
            results = {}
            for sid, session in members.items():
                # All but this client's own part, so it clips by the group's factor.
                others = sum(c.client_grad_sq_norm for s, c in commands.items() if s != sid)
                results[sid] = session.applied(steps[sid], backbone_sq + others, learning_rate)
                self._checkpoint(session)
            return results

        return _Work(rnd, "optimizer step", len(members), job, self._applied(rnd), "step")

    def _per_client_apply_work(self, rnd: _Round) -> _Work:
        members, commands, steps = dict(rnd.members), dict(rnd.commands), dict(rnd.steps)

        def job() -> dict[str, dict[str, Any]]:
            results = {}
            for sid, session in members.items():
                # Exactly this session's step alone (training.py): its own norm,
                # clipping, AdamW step and schedule.
                command = commands[sid]
                stepped = session.trainable.step(command.client_grad_sq_norm, command.max_grad_norm)
                results[sid] = session.applied(steps[sid], *stepped)
                self._checkpoint(session)
            return results

        return _Work(rnd, "optimizer steps", len(members), job, self._applied(rnd), "step")

    def _applied(self, rnd: _Round) -> Callable[[Any], None]:
        """What ends a round once its steps job ran: its results, or its failure."""

        def finish(result: Any) -> None:
            if isinstance(result, Exception):
                rnd.applying = False
                self._failed(rnd, result)
                return
            rnd.results = result
            self.rounds_applied += 1
            self._end(rnd, None)

        return finish
