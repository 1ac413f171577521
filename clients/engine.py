"""The generation engine behind ``splitfed serve openai`` (no HTTP here): one backbone
client, head and tail loaded once, and a pool of split sessions that concurrent
requests take one each.

The backbone keeps one KV cache per session, so a session serves one generation at a
time; requests on different sessions run at once and their steps merge on the backbone
(continuous batching, docs/backbone.md). With a training checkpoint the first session of
the pool is the checkpoint's own; the others are new sessions of the same [adapter]
settings holding a copy of its body adapter (``ExportAdapter`` / ``ImportAdapter``; in
``adapter_mode: shared`` every session already runs the one adapter). Sessions open
when the engine starts, or at their first use where the backbone was down then; a
session whose generation failed is closed and opened again at its next use.

A request is admitted first (:meth:`Engine.admit`: at most ``concurrency`` generating
and ``max_queued`` waiting, beyond that :class:`OverloadedError`), then waits for a free
session and generates (:meth:`Ticket.stream`): text deltas per row, cut at stop strings,
each row's last delta with its finish reason and token count.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import grpc
import torch
from prometheus_client import Counter, Gauge, Histogram
from transformers import AutoTokenizer

from splitfed.clients.app import (
    ClientConfig,
    SplitParts,
    SplitSession,
    backbone_client,
    keymanager_for,
    load_parts,
    sampling_options,
    split_session,
)
from splitfed.clients.backbone import BackboneClient, StreamLostError, client_crypto
from splitfed.clients.data import conversation_tokens, left_padded, prompt_tokens
from splitfed.clients.keys import KeyManagerClient
from splitfed.clients.streaming import text_deltas
from splitfed.clients.trainer import RECONNECT
from splitfed.errors import SplitfedError
from splitfed.models.generation import GenerationStep, SamplingOptions, SplitGenerator
from splitfed.models.loading import load_config
from splitfed.retry import RetryPolicy
from splitfed.security.releases import PrivacyLedger

logger = logging.getLogger(__name__)

# Generations last from a token to minutes.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

QUEUE_WAIT = Histogram(
    "splitfed_openai_queue_wait_seconds",
    "Time an admitted request waited for a free backbone session.",
    buckets=SECONDS_BUCKETS,
)
GENERATION_SECONDS = Histogram(
    "splitfed_openai_generation_seconds",
    "Time from a request's session to its last token, by finish (completed, cancelled, error).",
    ["outcome"],
    buckets=SECONDS_BUCKETS,
)
TOKENS = Counter(
    "splitfed_openai_tokens",
    "Tokens of requests, by kind (prompt, completion).",
    ["kind"],
)
SESSIONS_BUSY = Gauge("splitfed_openai_sessions_busy", "Pool sessions generating now.")
REQUESTS_WAITING = Gauge(
    "splitfed_openai_requests_waiting", "Admitted requests waiting for a session now."
)

# How often a request waiting for a session looks whether it was cancelled.
WAIT_POLL_S = 0.1


class OverloadedError(Exception):
    """Every session is busy and the queue is full (HTTP 429)."""


class BackboneUnavailableError(Exception):
    """The backbone cannot be reached, or it refused the session (HTTP 503)."""


@dataclass(frozen=True)
class Delta:
    """New text of row ``index``. A row's last delta has ``finish_reason`` ("stop": a
    stop token or stop string; "length": ``max_new_tokens`` reached) and ``tokens``, the
    tokens generated for it (a stop token counted; after a stop string, the tokens up to
    the one that completed it)."""

    index: int
    text: str
    finish_reason: str | None = None
    tokens: int = 0


class StopText:
    """A row's text as it arrives, cut at the first of ``stops``: what may be given out
    now (never the start of a stop string that may still complete)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.given = 0
        self.stopped = False

    def add(self, text: str) -> str:
        """Take new ``text``; the part that is settled (``stopped`` once a stop string
        appears: the text before it)."""
        self.text += text
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._give(cut)
        held = max(
            (n for s in self.stops for n in range(1, len(s)) if self.text.endswith(s[:n])),
            default=0,
        )
        return self._give(len(self.text) - held)

    def finish(self) -> str:
        """The rest, once the row ends without a stop string."""
        return self._give(len(self.text))

    def _give(self, end: int) -> str:
        delta = self.text[self.given : max(end, self.given)]
        self.given = max(end, self.given)
        return delta


class _Counted:
    """A generation's steps passed through, counting each row's tokens and whether it
    ended at a stop token; ends early once ``cancel`` is set."""

    def __init__(self, steps: Iterator[GenerationStep], rows: int, cancel: threading.Event) -> None:
        self.steps, self.cancel = steps, cancel
        self.tokens = [0] * rows
        self.stopped = [False] * rows

    def __iter__(self) -> Iterator[GenerationStep]:
        try:
            for step in self.steps:
                for row, finished in enumerate(step.finished.tolist()):
                    if not self.stopped[row]:
                        self.tokens[row] += 1
                        self.stopped[row] = bool(finished)
                yield step
                if self.cancel.is_set():
                    return
        finally:
            close = getattr(self.steps, "close", None)
            if close is not None:
                close()  # the generation's last step is done: the session is free


class _Slot:
    """One session of the pool, opened on first use and again after a failure."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.split: SplitSession | None = None
        self._stack = ExitStack()

    def close(self) -> None:
        stack, self._stack, self.split = self._stack, ExitStack(), None
        try:
            stack.close()
        except Exception as exc:  # the backbone may be gone: the session expires there
            logger.warning("[openai] closing pool session %d: %s", self.number, exc)


class Engine:
    """Generation for many concurrent requests through ``concurrency`` sessions of one
    backbone client (see the module's docstring). Use :meth:`from_config`."""

    def __init__(
        self,
        client: BackboneClient,
        config: ClientConfig,
        keymanager: KeyManagerClient | None = None,
        *,
        concurrency: int = 4,
        max_queued: int = 16,
        reconnect: RetryPolicy = RECONNECT,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued}")
        self.client, self.config, self.keymanager = client, config, keymanager
        self.concurrency, self.max_queued, self.reconnect = concurrency, max_queued, reconnect
        train = config.training
        self.tokenizer = AutoTokenizer.from_pretrained(str(train.model_path), local_files_only=True)
        model = load_config(train.model_path)
        self.max_positions = int(getattr(model, "max_position_embeddings", 2048))
        # [generation] with the tokenizer's stop and pad tokens: what `splitfed generate` uses.
        self.defaults = sampling_options(config, self.tokenizer)
        self.parts: SplitParts = load_parts(config)
        self.ledger = (
            PrivacyLedger(train.perturbation, directory=train.checkpoint_dir)
            if train.perturbation.enabled
            else None
        )
        self._slots = [_Slot(i) for i in range(concurrency)]
        self._free: queue.Queue[_Slot] = queue.Queue()
        for slot in self._slots:
            self._free.put(slot)
        self._lock = threading.Lock()
        self._admitted = 0
        self._body_adapter: dict[str, torch.Tensor] | None = None
        self._closed = False

    @classmethod
    @contextmanager
    def from_config(
        cls,
        config: ClientConfig,
        *,
        concurrency: int = 4,
        max_queued: int = 16,
        reconnect: RetryPolicy = RECONNECT,
        open_sessions: bool = True,
    ) -> Iterator[Engine]:
        """An engine for ``config`` with its own backbone client (and key manager
        client); its sessions are opened now (``open_sessions``; a backbone that cannot
        be reached is logged, and they open at first use) and closed on exit."""
        with backbone_client(config.backbone) as client, keymanager_for(config) as keys:
            engine = cls(
                client,
                config,
                keys,
                concurrency=concurrency,
                max_queued=max_queued,
                reconnect=reconnect,
            )
            try:
                if open_sessions:
                    try:
                        engine.open_sessions()
                    except BackboneUnavailableError as exc:
                        logger.warning("[openai] %s; sessions open at first use", exc)
                yield engine
            finally:
                engine.close()

    # --- prompts ----------------------------------------------------------------------

    @property
    def chat_template(self) -> bool:
        return self.config.training.chat_template

    def prompt_ids(self, prompt: str) -> list[int]:
        """A completion prompt's tokens, as ``splitfed generate`` formats it."""
        return prompt_tokens(self.tokenizer, prompt, chat_template=self.chat_template)

    def chat_ids(self, system: str, turns: Sequence[tuple[str, str]], prompt: str) -> list[int]:
        """A conversation's tokens before the next reply (as ``splitfed chat``)."""
        return conversation_tokens(
            self.tokenizer, turns, prompt, system=system, chat_template=self.chat_template
        )

    # --- sessions ---------------------------------------------------------------------

    def open_sessions(self) -> None:
        """Open every session of the pool that is not open (the checkpoint's first)."""
        for slot in self._slots:
            self._open(slot)

    def _open(self, slot: _Slot) -> SplitSession:
        if slot.split is not None:
            return slot.split
        try:
            copy = None
            if slot.number > 0 and self.parts.session_id:
                copy = self._trained_body()
            slot.split = slot._stack.enter_context(
                split_session(
                    self.client,
                    self.config,
                    self.keymanager,
                    ledger=self.ledger,
                    reconnect=self.reconnect,
                    parts=self.parts,
                    body_adapter=copy,
                )
            )
        except (StreamLostError, grpc.RpcError) as exc:
            slot.close()
            raise BackboneUnavailableError(f"the backbone is unavailable: {exc}") from exc
        except SplitfedError as exc:
            slot.close()
            raise BackboneUnavailableError(f"the backbone refused a session: {exc}") from exc
        logger.info("[openai] pool session %d: %s", slot.number, slot.split.session_id)
        return slot.split

    def _trained_body(self) -> dict[str, torch.Tensor]:
        """The checkpoint session's body adapter, for the pool's other sessions (empty
        in shared mode: every session runs the one adapter, so they are new sessions
        with nothing to copy)."""
        with self._lock:
            if self._body_adapter is not None:
                return self._body_adapter
        if self.client.model_info().adapter_mode == "shared":
            with self._lock:
                self._body_adapter = {}
            return {}
        session = self.parts.session_id
        crypto = None
        if self.config.training.encrypted and self.keymanager is not None:
            crypto = client_crypto(self.keymanager, session)  # opens; seals nothing
        tensors = self.client.export_adapter(session, crypto)
        with self._lock:
            self._body_adapter = tensors
        return tensors

    def close(self) -> None:
        """Close the pool's sessions (the checkpoint's stays on the backbone)."""
        self._closed = True
        for slot in self._slots:
            slot.close()

    # --- generation -------------------------------------------------------------------

    def admit(self) -> Ticket:
        """Admission of one request; :class:`OverloadedError` when ``concurrency`` requests
        generate and ``max_queued`` more wait. Release the ticket (``with``) when done."""
        with self._lock:
            if self._admitted >= self.concurrency + self.max_queued:
                raise OverloadedError(
                    f"{self.concurrency} requests are generating and {self.max_queued} "
                    "waiting; try again later"
                )
            self._admitted += 1
        return Ticket(self)

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    @property
    def idle_sessions(self) -> int:
        """Sessions free now (all of them when no request is generating)."""
        return self._free.qsize()

    @contextmanager
    def _session(self, cancel: threading.Event) -> Iterator[_Slot | None]:
        """A free slot (waiting for one); None if ``cancel`` was set while waiting."""
        started = time.perf_counter()
        REQUESTS_WAITING.inc()
        try:
            while True:
                try:
                    slot = self._free.get(timeout=WAIT_POLL_S)
                    break
                except queue.Empty:
                    if cancel.is_set():
                        yield None
                        return
        finally:
            REQUESTS_WAITING.dec()
        QUEUE_WAIT.observe(time.perf_counter() - started)
        SESSIONS_BUSY.inc()
        try:
            yield slot
        finally:
            SESSIONS_BUSY.dec()
            self._free.put(slot)

    def _generate(
        self,
        rows: Sequence[Sequence[int]],
        sampling: SamplingOptions,
        stops: Sequence[str],
        cancel: threading.Event,
    ) -> Iterator[Delta]:
        if self._closed:
            raise BackboneUnavailableError("the engine is closed")
        with self._session(cancel) as slot:
            if slot is None:
                return
            split = self._open(slot)
            started, outcome = time.perf_counter(), "error"
            try:
                yield from self._run(split, rows, sampling, stops, cancel)
                outcome = "cancelled" if cancel.is_set() else "completed"
            except GeneratorExit:
                outcome = "cancelled"
                raise
            except (StreamLostError, grpc.RpcError) as exc:
                slot.close()
                raise BackboneUnavailableError(f"the backbone is unavailable: {exc}") from exc
            except BaseException:
                slot.close()  # its stream may be mid-step: a fresh one next time
                raise
            finally:
                GENERATION_SECONDS.labels(outcome).observe(time.perf_counter() - started)

    def _run(
        self,
        split: SplitSession,
        rows: Sequence[Sequence[int]],
        sampling: SamplingOptions,
        stops: Sequence[str],
        cancel: threading.Event,
    ) -> Iterator[Delta]:
        ids, mask = left_padded([list(r) for r in rows], int(self.tokenizer.pad_token_id))
        generator = SplitGenerator(split.head, split.body(), split.tail)
        counted = _Counted(generator.stream(ids, mask, sampling), len(rows), cancel)
        texts = [StopText(stops) for _ in rows]
        done = [False] * len(rows)
        steps = iter(counted)
        try:
            for delta in text_deltas(steps, self.tokenizer, len(rows)):
                index = delta.index
                if done[index]:
                    continue
                row = texts[index]
                text = row.add(delta.text)
                if row.stopped or delta.finished:
                    done[index] = True
                    stop = row.stopped or counted.stopped[index]
                    text += "" if row.stopped else row.finish()
                    tokens = counted.tokens[index]
                    TOKENS.labels("completion").inc(tokens)
                    yield Delta(index, text, "stop" if stop else "length", tokens)
                    if all(done):
                        return
                elif text:
                    yield Delta(index, text)
                if cancel.is_set():
                    return
        finally:
            close = getattr(steps, "close", None)
            if close is not None:
                close()


class Ticket:
    """An admitted request (see :meth:`Engine.admit`); a context manager."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._released = False

    def stream(
        self,
        rows: Sequence[Sequence[int]],
        sampling: SamplingOptions,
        stops: Sequence[str] = (),
        cancel: threading.Event | None = None,
    ) -> Iterator[Delta]:
        """Generate ``rows`` (prompt tokens) as one batch on a free session (waiting for
        one); each row's text as it arrives. Setting ``cancel`` ends it at the next step
        (or while waiting) and frees the session."""
        TOKENS.labels("prompt").inc(sum(len(r) for r in rows))
        return self.engine._generate(rows, sampling, stops, cancel or threading.Event())

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.engine._release()

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    tokens: int


def collect(deltas: Iterable[Delta], rows: int) -> list[Completion]:
    """The whole completions of a generation's deltas."""
    texts, ends = [""] * rows, [("length", 0)] * rows
    for delta in deltas:
        texts[delta.index] += delta.text
        if delta.finish_reason is not None:
            ends[delta.index] = (delta.finish_reason, delta.tokens)
    return [Completion(t, *end) for t, end in zip(texts, ends, strict=True)]


def with_options(defaults: SamplingOptions, **options: Any) -> SamplingOptions:
    """``defaults`` with the options that are not None."""
    return replace(defaults, **{k: v for k, v in options.items() if v is not None})


def completion_rows(engine: Engine, prompts: Sequence[str], n: int = 1) -> list[list[int]]:
    """Each prompt's tokens ``n`` times, in the order of OpenAI's choices."""
    return [ids for ids in map(engine.prompt_ids, prompts) for _ in range(n)]
