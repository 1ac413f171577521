"""Continuous batching of generation across sessions.

Every Generate stream hands its forward (a prompt or a decode step) to one
:class:`GenerationBatcher` and waits for its h2. Whenever the device takes the next
generation pass, the batcher takes the steps waiting at that moment (at most one per
session: a session's steps stay in order) and runs them as ONE forward of the body
(models/continuous.py): each session keeps its own KV cache, sessions join and leave
between passes, and each gets what it gets alone. No fixed sleep gathers a batch: a
pass starts when the compute queue gives it its turn, and whatever arrived while the
previous pass ran is the next batch; the adaptive window (:meth:`_hold_window`) waits
only for steps of sessions that are due (their clients' turnaround, learnt), until the
pass holds a cohort (:meth:`_cohort`: the cohort size that makes a round of all active
sessions shortest), and at most what a pass of one session costs.

What a pass holds (the scheduler's rules, docs/backbone.md "Continuous batching"):

* one step per session, oldest first, at most ``max_pass_sessions`` sessions;
* decode steps (one position) and prompts (several) in separate passes: the oldest
  waiting step decides which; a merged pass costs rows x its longest step;
* at most the token budget of new positions (rows x the longest step): the smaller of
  ``max_pass_tokens`` and what the device's free memory holds (:meth:`token_budget`);
  a longer prompt runs in chunks, and after each chunk goes to the back of the line, so
  a long prompt cannot hold the others' decode steps up;
* sessions merge when they share a body: in ``shared`` mode all of them; in
  ``per-client`` mode those with the same split, adapter kind and target modules, as one
  multi-adapter pass (each row its own session's LoRA or prefix); others run in their own
  pass of the same turn;
* a step is admitted against the KV-cache quotas before it runs (RESOURCE_EXHAUSTED,
  nothing changed, when the caches are full).

A pass runs on the compute queue in the turn of the session (and identity) whose step
found no pass queued (after a pass: of the oldest waiting step), so generation and
training take turns fairly (services/backbone/compute.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from splitfed.errors import AbortedError
from splitfed.models.continuous import CachedStep, base_run, mergeable, merged_cached_pass
from splitfed.models.multi_adapter import MultiAdapterBody
from splitfed.models.parts import PartCache
from splitfed.models.placement import free_bytes
from splitfed.services.backbone.bodies import SharedBody
from splitfed.services.backbone.compute import ComputeQueue
from splitfed.services.backbone.generation import Generation
from splitfed.services.backbone.metrics import (
    GENERATE_PASS_SECONDS,
    GENERATE_PASS_SESSIONS,
    GENERATE_PASS_TOKENS,
    GENERATE_TOKEN_BUDGET,
    GENERATE_WAIT_SECONDS,
    GENERATE_WINDOW_SECONDS,
)
from splitfed.services.backbone.sessions import Session
from splitfed.services.backbone.settings import BackboneSettings

logger = logging.getLogger(__name__)

# Multi-adapter bodies kept for generation (per-client mode), one per group of sessions.
GROUP_BODIES = 8
# Of the device's free memory, the share one generation pass may take.
FREE_MEMORY_SHARE = 0.5
# The adaptive window: a client's turnaround is learnt as an EWMA of this weight; a step
# is waited for until its turnaround times this slack; a pause longer than the limit
# ends a session's run of steps (it is not waited for).
EWMA = 0.3
WINDOW_SLACK = 1.5
TURNAROUND_LIMIT_S = 1.0


class _RunApartError(Exception):
    """The sessions of a group cannot share a pass: each runs in one of its own."""


def _size_class(sessions: int) -> str:
    """The metrics label of a pass of ``sessions`` sessions."""
    for top, label in ((1, "1"), (4, "2-4"), (8, "5-8"), (16, "9-16")):
        if sessions <= top:
            return label
    return "17+"


@dataclass(eq=False)
class _Request:
    """One session's forward on its Generate stream (or an evaluation forward: no KV
    cache of the session's involved): the positions still to run (a prompt may take
    several passes), the mask of the whole step, the pieces of h2."""

    session: Session
    hidden: torch.Tensor
    mask: torch.Tensor
    future: Future[torch.Tensor] = field(default_factory=Future)
    queued: float = field(default_factory=time.monotonic)
    arrived: float = field(default_factory=time.monotonic)
    pieces: list[torch.Tensor] = field(default_factory=list)
    admitted: bool = False
    # Positions the session's cache held before this step (restored if it fails).
    start: int = 0
    # An evaluation forward runs on a cache of its own, dropped after it.
    evaluation: bool = False
    scratch: PartCache | None = None

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    @property
    def rows(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def remaining(self) -> int:
        return int(self.hidden.shape[1])


@dataclass(eq=False)
class _Chunk:
    """A request's part in one pass: its next ``tokens`` positions."""

    request: _Request
    tokens: int

    @property
    def session(self) -> Session:
        return self.request.session

    @property
    def cache(self) -> PartCache:
        cache = self.request.scratch if self.request.evaluation else self.session.cache
        assert cache is not None  # made at admission
        return cache

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """h1 of these positions and the mask up to them (the cache holds what came
        before)."""
        request, end = self.request, self.cache.length + self.tokens
        return request.hidden[:, : self.tokens], request.mask[:, :end]


class _GroupBody:
    """A multi-adapter body over sessions of one group (per-client mode), rebuilt when a
    session it lacks needs it; the rows of each pass name their sessions' indices."""

    def __init__(self, sessions: list[Session]) -> None:
        self.sessions = sessions
        self.index = {s.session_id: i for i, s in enumerate(sessions)}
        self.multi = MultiAdapterBody([s.body for s in sessions])


class GenerationBatcher:
    """Merges concurrent sessions' generation forwards into shared passes."""

    def __init__(
        self,
        settings: BackboneSettings,
        shared: SharedBody,
        queue: ComputeQueue,
        generation: Generation,
    ) -> None:
        self.settings = settings
        self.shared = shared
        self.max_sessions = settings.max_pass_sessions
        self._queue = queue
        self._generation = generation
        self._lock = threading.Lock()
        # Notified when a step arrives while a pass holds its window open.
        self._arrived = threading.Condition(self._lock)
        self._holding = False
        # Waiting requests per session, in order (only the first of each runs).
        self._waiting: dict[str, deque[_Request]] = {}
        self._scheduled = False
        self._groups: OrderedDict[Hashable, _GroupBody] = OrderedDict()
        # Groups whose adapters cannot share a pass: their sessions run apart.
        self._apart: set[Hashable] = set()
        # The adaptive window: when each session's last step came back, how long its
        # client takes to send the next one (EWMA), and what a pass costs by itself.
        self._returned: dict[str, float] = {}
        self._turnaround: dict[str, float] = {}
        self._pass_s = 0.0
        self._step_s = 0.0
        # Sessions per pass and padded positions per pass (the latest ones), for tests.
        self.pass_sizes: deque[int] = deque(maxlen=1024)
        self.pass_tokens: deque[int] = deque(maxlen=1024)

    @property
    def waiting(self) -> int:
        """Steps waiting or running now."""
        with self._lock:
            return sum(len(q) for q in self._waiting.values())

    # --- in a stream's thread --------------------------------------------------------

    def generate(self, session: Session, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``session``'s h2 for its forward, run in a merged pass; errors are its own."""
        return self._submit(_Request(session, hidden, mask))

    def evaluate(self, session: Session, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``session``'s h2 for an evaluation forward (TRAIN_OP_EVAL: no graph, no KV
        cache of the session's), merged with other sessions' prompts."""
        return self._submit(_Request(session, hidden, mask, evaluation=True))

    def _submit(self, request: _Request) -> torch.Tensor:
        session = request.session
        with self._lock:
            self._waiting.setdefault(session.session_id, deque()).append(request)
            self._note_arrival(session.session_id, request.arrived)
            if self._holding:
                self._arrived.notify()
            lead = not self._scheduled
            self._scheduled = True
        if lead:
            # No pass is queued: this thread runs the next one, at once when the device
            # is idle (no hand-off to the worker), else in its session's turn; steps
            # that arrive meanwhile wait for it and run in the pass after.
            self._queue.run_for(session, self._pass, "generate")
        return request.future.result()

    def discard(self, session: Session) -> None:
        """``session`` closed or expired: its waiting steps fail, its bodies are let go."""
        with self._lock:
            waiting = self._waiting.pop(session.session_id, deque())
            self._returned.pop(session.session_id, None)
            self._turnaround.pop(session.session_id, None)
            for key in [k for k, g in self._groups.items() if session.session_id in g.index]:
                del self._groups[key]
        for request in waiting:
            request.fail(AbortedError("the session closed while its generation step waited"))

    def close(self) -> None:
        """The backbone stops: every waiting step fails (its stream ends)."""
        with self._lock:
            waiting = [r for q in self._waiting.values() for r in q]
            self._waiting.clear()
            self._scheduled = True  # no pass is queued any more
        for request in waiting:
            request.fail(AbortedError("the backbone is shutting down"))

    # --- scheduling (lock held) ------------------------------------------------------

    def _schedule(self) -> None:
        """Queue the next pass on the compute queue unless one is queued or running."""
        if self._scheduled or not self._waiting:
            return
        oldest = min((q[0] for q in self._waiting.values()), key=lambda r: r.queued)
        self._scheduled = True
        session = oldest.session
        self._queue.submit(session.session_id, self._pass, "generate", owner=session.owner)

    def _note_arrival(self, sid: str, now: float) -> None:
        """A step of ``sid`` arrived: learn how long its client took since the last one
        came back (a pause longer than ``TURNAROUND_LIMIT_S`` is a new generation)."""
        returned = self._returned.pop(sid, None)
        if returned is None:
            return
        gap = now - returned
        if gap > TURNAROUND_LIMIT_S:
            self._turnaround.pop(sid, None)
            return
        last = self._turnaround.get(sid)
        self._turnaround[sid] = gap if last is None else last + EWMA * (gap - last)

    def _due(self, now: float) -> list[tuple[float, float]]:
        """(when it should arrive, its client's turnaround) of each session whose next
        step is due soon: from the moment its last step came back for about its
        client's turnaround."""
        due = []
        for sid, returned in self._returned.items():
            turnaround = self._turnaround.get(sid)
            if turnaround is None or sid in self._waiting:
                continue
            expected = returned + WINDOW_SLACK * turnaround
            if expected > now:
                due.append((expected, turnaround))
        return due

    def _cohort(self, waiting: int, due: list[tuple[float, float]]) -> int:
        """How many steps a pass should take when ``waiting`` wait and ``due`` are due.

        The N active sessions are served in c cohorts that alternate: a pass of k = N/c
        steps costs a + b k (a: a pass by itself, b: each step more, both learnt), and
        while the other cohorts' passes run, a cohort's clients turn around (time T).
        A round takes max(c a + b N, a + b N / c + T): the device busy, or one cohort's
        pass and turnaround. The c that makes the round shortest gives the cohort: one
        cohort of everyone when the clients are quick (T small against a pass), several
        when the device would otherwise wait for them."""
        sessions = waiting + len(due)
        if not self._pass_s:
            return sessions  # nothing learnt yet: wait (within the window) for everyone
        a, b = self._pass_s, self._step_s
        turnaround = sum(t for _, t in due) / len(due)
        rounds = {
            c: max(c * a + b * sessions, a + b * sessions / c + turnaround)
            for c in range(1, sessions + 1)
        }
        cohorts = min(rounds, key=lambda c: (rounds[c], c))
        return math.ceil(sessions / cohorts)

    def _hold_window(self) -> None:
        """Wait (lock held) for steps due soon before a pass, until the pass holds a
        cohort's worth (:meth:`_cohort`), and at most what a pass costs by itself (a step
        that misses this pass needs one of its own later). No wait when none is due (an
        idle device runs at once) or other work is queued for the device."""
        opened = time.monotonic()
        limit = opened + min(self._pass_s, self.settings.max_window_ms / 1000)
        while True:
            now = time.monotonic()
            due = self._due(now)
            if not due or now >= limit or self._queue.depth > 0:
                break
            if len(self._waiting) >= self._cohort(len(self._waiting), due):
                break
            self._holding = True
            try:
                self._arrived.wait(min(max(t for t, _ in due), limit) - now)
            finally:
                self._holding = False
        GENERATE_WINDOW_SECONDS.observe(time.monotonic() - opened)

    def token_budget(self) -> int:
        """New positions one pass may hold: ``max_pass_tokens``, less where the device's
        free memory would not hold their activations and merged cache."""
        budget = self.settings.max_pass_tokens
        free = free_bytes(self.shared.input_device)
        if free is not None:
            config = self.shared.config
            hidden = int(config.hidden_size)
            inner = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
            per_token = (4 * hidden + 2 * inner) * self.shared.dtype.itemsize
            budget = min(budget, max(1, int(free * FREE_MEMORY_SHARE) // per_token))
        GENERATE_TOKEN_BUDGET.set(budget)
        return budget

    def _select(self) -> list[_Chunk]:
        heads = sorted((q[0] for q in self._waiting.values()), key=lambda r: r.queued)
        if not heads:
            return []
        prompts = heads[0].remaining > 1  # the oldest step decides the kind of pass
        budget = self.token_budget()
        chosen: list[_Chunk] = []
        rows = longest = 0
        for request in heads:
            if (request.remaining > 1) != prompts or len(chosen) >= self.max_sessions:
                continue
            tokens = min(request.remaining, max(1, budget // request.rows))
            if chosen and (rows + request.rows) * max(longest, tokens) > budget:
                continue
            chosen.append(_Chunk(request, tokens))
            rows += request.rows
            longest = max(longest, tokens)
        return chosen

    # --- the pass (on the compute queue) ---------------------------------------------

    def _pass(self) -> None:
        with self._lock:
            self._hold_window()
            chunks = self._select()
        try:
            started = time.monotonic()
            admitted = [chunk for chunk in chunks if self._admit(chunk, started)]
            groups: dict[Hashable, list[_Chunk]] = {}
            for chunk in admitted:
                groups.setdefault(self._group_key(chunk), []).append(chunk)
            for key, members in groups.items():
                self._run_group(key, members)
        except Exception as exc:  # a fault of the batcher itself: no step waits forever
            logger.exception("[Backbone.Generate] a generation pass failed")
            for chunk in chunks:
                self._undo(chunk)
                chunk.request.fail(exc)
        finally:
            with self._lock:
                self._scheduled = False
                for chunk in chunks:
                    self._settle(chunk)
                self._schedule()

    def _admit(self, chunk: _Chunk, started: float) -> bool:
        """Check a request when its first chunk runs (shapes, KV-cache quotas)."""
        request = chunk.request
        if request.admitted:
            return True
        GENERATE_WAIT_SECONDS.observe(started - request.arrived)
        try:
            if request.evaluation:
                self.shared.check_inputs(request.hidden, request.mask, 0)
                request.hidden, request.mask = self.shared.inputs(request.hidden, request.mask)
                request.scratch = request.session.body.new_cache()
            else:
                request.hidden, request.mask = self._generation.admit(
                    request.session, request.hidden, request.mask
                )
        except Exception as exc:  # delivered to the step's stream
            request.fail(exc)
            return False
        request.start = chunk.cache.length
        request.admitted = True
        return True

    def _undo(self, chunk: _Chunk) -> None:
        """A failed step leaves the session's cache as it was before the step."""
        request, cache = chunk.request, chunk.session.cache
        if request.evaluation:
            return
        if request.admitted and cache is not None and cache.length > request.start:
            cache.kv.crop(cache.prefix_length + request.start)

    def _group_key(self, chunk: _Chunk) -> Hashable:
        """Chunks with equal keys run in one pass."""
        session = chunk.session
        alone = ("alone", session.session_id)
        if not mergeable(chunk.cache):
            return alone
        key: tuple[Hashable, ...]
        if self.settings.adapter_mode == "shared":
            key = ("body", id(session.body))
        else:
            adapter = session.trainable.adapter
            key = (session.k, session.m, adapter.kind, tuple(adapter.target_modules))
        if key in self._apart:
            return alone
        if not session.body.family.pads_anywhere:
            # Only sessions at equal lengths merge (no slot added).
            key = (*key, chunk.cache.length, chunk.tokens)
        return key

    def _learn_pass(self, sessions: int, took: float) -> None:
        """Learn from a decode pass what a pass costs by itself (the window's bound) and
        what each step more costs (EWMAs; the scheduler's cohort model)."""
        if sessions == 1:
            last = self._pass_s
            self._pass_s = took if not last else last + EWMA * (took - last)
        elif self._pass_s:
            step = max(0.0, (took - self._pass_s) / (sessions - 1))
            last = self._step_s
            self._step_s = step if not last else last + EWMA * (step - last)

    def _run_group(self, key: Hashable, chunks: list[_Chunk]) -> None:
        try:
            started = time.perf_counter()
            with torch.no_grad():
                try:
                    outputs = self._forward(key, chunks)
                except _RunApartError:
                    for chunk in chunks:
                        self._run_group(("alone", chunk.session.session_id), [chunk])
                    return
            took = time.perf_counter() - started
            GENERATE_PASS_SECONDS.labels(_size_class(len(chunks))).observe(took)
            if all(chunk.tokens == 1 for chunk in chunks):
                self._learn_pass(len(chunks), took)
        except Exception as exc:  # the pass failed: each of its steps fails, none applied
            logger.warning("[Backbone.Generate] a pass of %d sessions failed: %s", len(chunks), exc)
            for chunk in chunks:
                self._undo(chunk)
                chunk.request.fail(exc)
            return
        self.pass_sizes.append(len(chunks))
        tokens = sum(c.request.rows for c in chunks) * max(c.tokens for c in chunks)
        self.pass_tokens.append(tokens)
        GENERATE_PASS_SESSIONS.observe(len(chunks))
        GENERATE_PASS_TOKENS.observe(tokens)
        for chunk, output in zip(chunks, outputs, strict=True):
            request = chunk.request
            request.pieces.append(output)
            request.hidden = request.hidden[:, chunk.tokens :]
            request.queued = time.monotonic()  # the rest of a prompt: back of the line

    def _forward(self, key: Hashable, chunks: list[_Chunk]) -> list[torch.Tensor]:
        inputs = [chunk.inputs() for chunk in chunks]
        caches = [chunk.cache for chunk in chunks]
        if len(chunks) == 1:  # as alone: the session's own body
            (hidden, mask), cache = inputs[0], caches[0]
            output: torch.Tensor = chunks[0].session.body(hidden, mask, cache)
            return [output]
        if self.settings.adapter_mode == "shared":
            body = chunks[0].session.body
            steps = [
                CachedStep(hidden, mask, cache, body.prefix)
                for (hidden, mask), cache in zip(inputs, caches, strict=True)
            ]
            return merged_cached_pass(body.family, steps, base_run(body.base))
        try:
            group = self._group_body(key, [chunk.session for chunk in chunks])
        except ValueError as exc:  # adapters the grouped op lacks (DoRA, fan-in-fan-out, ...)
            logger.info("[Backbone.Generate] sessions of %s run apart: %s", key, exc)
            with self._lock:
                self._apart.add(key)
            raise _RunApartError from None
        members = [group.index[chunk.session.session_id] for chunk in chunks]
        return group.multi.cached(members, [h for h, _ in inputs], [m for _, m in inputs], caches)

    def _group_body(self, key: Hashable, sessions: list[Session]) -> _GroupBody:
        """The group's multi-adapter body, rebuilt (with every session it had that is
        still open) when it lacks one of ``sessions``."""
        with self._lock:
            group = self._groups.get(key)
            if group is not None:
                self._groups.move_to_end(key)
                if all(s.session_id in group.index for s in sessions):
                    return group
                known = {s.session_id for s in sessions}
                sessions = sessions + [s for s in group.sessions if s.session_id not in known]
        group = _GroupBody(sorted(sessions, key=lambda s: s.session_id))
        with self._lock:
            self._groups[key] = group
            while len(self._groups) > GROUP_BODIES:
                self._groups.popitem(last=False)
        return group

    def _settle(self, chunk: _Chunk) -> None:
        """After a pass: a finished (or failed) request leaves its session's line with
        its h2, and the session's cache bytes are counted again (lock held)."""
        request, session = chunk.request, chunk.session
        if not (request.future.done() or request.remaining == 0):
            return
        if request.admitted and not request.evaluation:
            self._generation.settle(session)
        request.scratch = None
        waiting = self._waiting.get(session.session_id)
        if waiting and waiting[0] is request:
            waiting.popleft()
            if not waiting:
                del self._waiting[session.session_id]
        if not request.future.done():
            request.future.set_result(torch.cat(request.pieces, dim=1))
            if not request.evaluation:  # a generation's client turns around
                self._returned[session.session_id] = time.monotonic()
