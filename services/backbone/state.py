"""The backbone's state: the shared frozen body, sessions with their adapters, optimizer
state and KV caches, the compute queue, limits, quotas and expiry. No gRPC in here.

One module over ~500 lines: sessions, their quotas and the compute they run share one
lock and one set of invariants (what a session holds is what the quotas count)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, NamedTuple

import torch

from splitfed.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
    SplitfedError,
)
from splitfed.logs import redact
from splitfed.metrics import Live
from splitfed.models.adapters import (
    AdapterSettings,
    adapter_state,
    kv_geometry,
    load_adapter_state,
)
from splitfed.models.families import family_for
from splitfed.models.loading import load_config, load_part
from splitfed.models.optim import (
    OptimizerSettings,
    build_optimizer,
    clip_factor,
    grad_sq_norm,
    load_optimizer_tensors,
    optimizer_tensors,
    scale_grads,
)
from splitfed.models.parts import Body, PartCache, SplitSpec, empty_base
from splitfed.services.backbone.batching import ClientBatcher
from splitfed.services.backbone.compute import ComputeQueue
from splitfed.services.backbone.metrics import BACKBONE_KV_CACHE_BYTES, BACKBONE_SESSIONS
from splitfed.services.backbone.quotas import GraphCost, Usage
from splitfed.services.backbone.settings import BackboneSettings
from splitfed.services.backbone.store import (
    DirectoryStore,
    MemoryStore,
    SessionRecord,
    SessionStore,
    Snapshot,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How an admin names the one adapter of shared mode in ExportAdapter / ImportAdapter.
SHARED_ADAPTER = "shared"


def no_such_session(session_id: str) -> PermissionDeniedError:
    """The one refusal for a session the caller may not use, whether or not it exists."""
    return PermissionDeniedError(
        f"session {redact(session_id)!r} does not exist (closed, expired or never opened) "
        "or belongs to another identity"
    )


# The backbones of this process, read when metrics are scraped.
LIVE: Live[BackboneState] = Live()
BACKBONE_SESSIONS.set_function(lambda: LIVE.total(lambda b: len(b.sessions())))
BACKBONE_KV_CACHE_BYTES.set_function(
    lambda: LIVE.total(lambda b: sum(s.cache_bytes for s in b.sessions()))
)


@dataclass(frozen=True)
class ModelSummary:
    model_id: str
    family: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype
    min_k: int
    min_m: int


class SharedBody:
    """The frozen middle blocks, loaded once; sessions get bodies that share its weights."""

    def __init__(self, settings: BackboneSettings) -> None:
        self.settings = settings
        self.config = load_config(settings.model_path)
        self.family = family_for(self.config)
        self.num_layers = self.family.num_layers(self.config)
        SplitSpec(self.num_layers, settings.min_k, settings.min_m)
        dtype = DTYPES.get(settings.dtype)
        self.part = load_part(
            settings.model_path,
            "body",
            settings.min_k,
            settings.min_m,
            dtype=dtype,
            device=settings.device,
        )
        self.part.requires_grad_(False)
        self.dtype = next(self.part.parameters()).dtype
        self.summary = ModelSummary(
            model_id=settings.model_id,
            family=self.family.name,
            num_layers=self.num_layers,
            hidden_size=int(self.config.hidden_size),
            vocab_size=int(self.config.vocab_size),
            dtype=self.dtype,
            min_k=settings.min_k,
            min_m=settings.min_m,
        )

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.part.parameters())

    def body_for(self, k: int, m: int) -> Body:
        """A body for the split (k, m), sharing this body's frozen tensors (no copy)."""
        if k < self.settings.min_k or m < self.settings.min_m:
            raise InvalidArgumentError(
                f"this backbone holds blocks for k >= {self.settings.min_k} and "
                f"m >= {self.settings.min_m}; got k={k}, m={m}"
            )
        try:
            spec = SplitSpec(self.num_layers, k, m)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        blocks = [self.part.blocks[i - self.settings.min_k] for i in spec.layers("body")]
        shared: dict[int, Any] = {}
        for block in blocks:
            for tensor in itertools.chain(block.parameters(), block.buffers()):
                shared[id(tensor)] = tensor
        copies = [copy.deepcopy(block, shared) for block in blocks]
        base = empty_base(self.config, self.family, "body", spec.layers("body"))
        self.family.set_layers(base, copies)
        body = Body(self.family, self.config, spec, base).to(self.settings.device)
        body.train()
        return body

    def per_position_cache_bytes(self, body: Body) -> int:
        kv_heads, head_dim = kv_geometry(body)
        return 2 * len(body.layer_range) * kv_heads * head_dim * self.dtype.itemsize


class Trainable:
    """A body with an adapter, its AdamW optimizer and learning-rate schedule."""

    def __init__(self, body: Body, adapter: AdapterSettings, optimizer: OptimizerSettings) -> None:
        self.body = body
        self.adapter = adapter
        adapter.apply(body)
        self.params = [p for p in body.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(self.params, optimizer)
        # What a training pass's graph holds, fitted on first use (quotas.GraphCost).
        self.graph_cost: GraphCost | None = None

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.body)

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return optimizer_tensors(self.optimizer, self.scheduler)

    def restore(
        self,
        adapter: Mapping[str, torch.Tensor],
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
    ) -> None:
        load_adapter_state(self.body, adapter)
        if meta:
            load_optimizer_tensors(self.optimizer, self.scheduler, tensors, meta)


class PendingPass(NamedTuple):
    """A training forward awaiting its gradient: its input, output (the graph hangs on
    it) and the bytes the graph is estimated to hold (quotas.GraphCost)."""

    hidden: torch.Tensor
    output: torch.Tensor
    nbytes: int


@dataclass
class Session:
    session_id: str
    owner: str
    k: int
    m: int
    adapter: AdapterSettings
    optimizer_settings: OptimizerSettings
    encoding: str
    trainable: Trainable
    step: int = 0
    last_result: dict[str, Any] | None = None
    pending: dict[tuple[int, int], PendingPass] = field(default_factory=dict)
    cache: PartCache | None = None
    cache_bytes: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    streams: int = 0
    # Bumped by each new training stream; older streams of the session stop.
    generation: int = 0
    # Activations and gradients are sealed with the session's data keys.
    encrypted: bool = False
    # The federation the session trains for; its aggregators may move its body adapter.
    federation: str = ""
    # Between its first training forward of a step and that step (or ZERO_GRAD): the
    # adapter's gradients and graphs belong to this step (shared mode checks it).
    in_step: bool = False

    @property
    def body(self) -> Body:
        return self.trainable.body

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def record(self) -> SessionRecord:
        return SessionRecord(
            session_id=self.session_id,
            owner=self.owner,
            k=self.k,
            m=self.m,
            adapter=self.adapter.to_dict(),
            optimizer=asdict(self.optimizer_settings),
            encoding=self.encoding,
            step=self.step,
            last_result=self.last_result,
            encrypted=self.encrypted,
            federation=self.federation,
        )


class BackboneState:
    """Everything a backbone serves, behind plain methods; handlers call these."""

    def __init__(self, settings: BackboneSettings, store: SessionStore | None = None) -> None:
        self.settings = settings
        self.shared = SharedBody(settings)
        if store is None:
            store = DirectoryStore(settings.state_dir) if settings.state_dir else MemoryStore()
        self.store = store
        self.queue = ComputeQueue()
        # Client-batch: training passes of concurrent sessions run merged (shared mode).
        self.batcher = (
            ClientBatcher(settings, self.queue, self.checkpoint) if settings.client_batch else None
        )
        # Called with each session that closes or expires (e.g. to end its keys).
        self.on_drop: list[Callable[[Session], None]] = []
        self._lock = threading.RLock()
        self._sessions: dict[str, Session] = {}
        self._shared_trainable: Trainable | None = None
        # Graph costs by (k, m, adapter without its seed): sessions alike cost alike.
        self._graph_costs: dict[tuple[int, int, AdapterSettings], GraphCost] = {}
        self._stop = threading.Event()
        self._janitor = threading.Thread(
            target=self._expire_loop, name="session-janitor", daemon=True
        )
        self._janitor.start()
        # Stored sessions whose records survive a restart come back on first use
        # (session id -> owner: only the owner's call restores one).
        self._stored = {r.session_id: r.owner for r in self.store.records()}
        if self._stored:
            logger.info("[Backbone] %d stored sessions can be resumed", len(self._stored))
        LIVE.add(self)

    # --- sessions --------------------------------------------------------------------

    def open_session(
        self,
        owner: str,
        *,
        model_id: str,
        k: int,
        m: int,
        adapter: AdapterSettings,
        optimizer: OptimizerSettings,
        encoding: str,
        session_id: str = "",
        encrypted: bool = False,
        federation: str = "",
    ) -> tuple[Session, bool]:
        if model_id and model_id != self.settings.model_id:
            raise NotFoundError(
                f"this backbone serves {self.settings.model_id!r}, not {model_id!r}"
            )
        if encoding and encoding not in self.settings.encodings:
            raise InvalidArgumentError(
                f"encoding {encoding!r} is not accepted; use one of "
                f"{', '.join(self.settings.encodings)}"
            )
        if session_id:
            session = self.get_session(session_id, owner)
            if session.encrypted != encrypted:
                raise FailedPreconditionError(
                    f"session {redact(session_id)!r} was opened with "
                    f"encrypted={session.encrypted}; resume it with the same setting"
                )
            return session, True
        with self._lock:
            if len(self._sessions) + len(self._stored) >= self.settings.max_sessions:
                raise LimitExceededError(
                    f"the backbone holds {self.settings.max_sessions} sessions, its limit; "
                    "close one or try later"
                )
            cap = self.settings.max_sessions_per_identity
            if self._sessions_of(owner) >= cap:
                raise LimitExceededError(
                    f"{owner} holds {cap} sessions, the limit per identity; close one "
                    "(CloseSession) or let it expire"
                )
            if adapter.kind == "lora" and adapter.r > self.settings.max_lora_rank:
                raise InvalidArgumentError(
                    f"LoRA rank {adapter.r} exceeds this backbone's max_lora_rank "
                    f"({self.settings.max_lora_rank})"
                )
            try:
                trainable = self._trainable_for(k, m, adapter, optimizer)
            except SplitfedError:
                raise
            except (ValueError, TypeError) as exc:  # peft refuses the adapter's targets
                raise InvalidArgumentError(f"adapter: {exc}") from None
            session = Session(
                session_id=secrets.token_hex(12),
                owner=owner,
                k=k,
                m=m,
                adapter=adapter,
                optimizer_settings=optimizer,
                encoding=encoding or "raw",
                trainable=trainable,
                encrypted=encrypted,
                federation=federation,
            )
            self._sessions[session.session_id] = session
        self.checkpoint(session)
        logger.info(
            "[Backbone.OpenSession] %s opened session %s (k=%d, m=%d, %s)",
            owner,
            redact(session.session_id),
            k,
            m,
            adapter.kind,
        )
        return session, False

    def _trainable_for(
        self, k: int, m: int, adapter: AdapterSettings, optimizer: OptimizerSettings
    ) -> Trainable:
        if self.settings.adapter_mode == "per-client":
            return Trainable(self.shared.body_for(k, m), adapter, optimizer)
        if (k, m) != (self.settings.min_k, self.settings.min_m):
            raise FailedPreconditionError(
                f"in shared adapter mode every session uses k={self.settings.min_k}, "
                f"m={self.settings.min_m}"
            )
        if self._shared_trainable is None:
            self._shared_trainable = Trainable(self.shared.body_for(k, m), adapter, optimizer)
        elif self._shared_trainable.adapter != adapter:
            raise FailedPreconditionError(
                "in shared adapter mode every session trains the same adapter configuration"
            )
        return self._shared_trainable

    def _sessions_of(self, owner: str) -> int:
        """Sessions ``owner`` holds, live or stored (call with the lock held)."""
        live = sum(1 for s in self._sessions.values() if s.owner == owner)
        return live + sum(1 for o in self._stored.values() if o == owner)

    def get_session(self, session_id: str, owner: str) -> Session:
        """``owner``'s session ``session_id``. Another identity's session and one that
        does not exist get the same refusal (:func:`no_such_session`), so that nobody
        learns from it whether a session exists."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None and self._stored.get(session_id) == owner:
                session = self._restore(session_id)
            if session is None or session.owner != owner:
                if session is not None or session_id in self._stored:
                    logger.warning(
                        "[Backbone] %s denied access to session %s of another identity",
                        owner or "(anonymous)",
                        redact(session_id),
                    )
                raise no_such_session(session_id)
            session.touch()
            return session

    def get_federated_session(
        self, session_id: str, aggregator: str, federation: str, owner: str
    ) -> Session:
        """A session for an aggregator: only one of the configured aggregators, acting for
        ``federation`` (one it may act for), and only a session that ``owner`` (a client
        identity, certificate name) opened for that federation. Every refusal is the same
        PERMISSION_DENIED, whether the session exists or not."""
        refusal = PermissionDeniedError(
            f"{aggregator} has no access to a session of {owner or '(no owner)'} for "
            f"federation {federation or '(none)'!r} with that id"
        )
        allowed = self.settings.aggregator_federations().get(aggregator)
        if allowed is None or not federation or not owner:
            raise refusal
        if allowed and federation not in allowed:
            logger.warning(
                "[Backbone] aggregator %s may not act for federation %s", aggregator, federation
            )
            raise refusal
        expected = f"client/{owner}"
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None and self._stored.get(session_id) == expected:
                session = self._restore(session_id)
        if session is None or session.federation != federation or session.owner != expected:
            logger.warning(
                "[Backbone] aggregator %s (federation %s) refused session %s for %s",
                aggregator,
                federation,
                redact(session_id),
                owner,
            )
            raise refusal
        session.touch()
        return session

    def _restore(self, session_id: str) -> Session:
        snapshot = self.store.load(session_id)
        record = snapshot.record
        adapter = AdapterSettings.from_dict(record.adapter)
        optimizer = OptimizerSettings(**record.optimizer)
        trainable = self._trainable_for(record.k, record.m, adapter, optimizer)
        trainable.restore(snapshot.adapter, snapshot.optimizer, record.optimizer_meta)
        session = Session(
            session_id=record.session_id,
            owner=record.owner,
            k=record.k,
            m=record.m,
            adapter=adapter,
            optimizer_settings=optimizer,
            encoding=record.encoding,
            trainable=trainable,
            step=record.step,
            last_result=record.last_result,
            encrypted=record.encrypted,
            federation=record.federation,
        )
        self._sessions[session_id] = session
        self._stored.pop(session_id, None)
        logger.info("[Backbone] resumed session %s at step %d", redact(session_id), record.step)
        return session

    def close_session(self, session_id: str, owner: str) -> None:
        session = self.get_session(session_id, owner)
        self._drop(session)

    def _drop(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.session_id, None)
            self._stored.pop(session.session_id, None)
        if self.batcher is not None:
            self.batcher.discard(session)
        session.pending.clear()
        session.cache = None
        session.cache_bytes = 0
        self.store.delete(session.session_id)
        for hook in self.on_drop:
            hook(session)
        logger.info("[Backbone] session %s closed", redact(session.session_id))

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def checkpoint(self, session: Session) -> None:
        record = session.record()
        tensors, meta = session.trainable.optimizer_state()
        record.optimizer_meta = meta
        self.store.save(Snapshot(record, session.trainable.adapter_tensors(), tensors))

    def _expire_loop(self) -> None:
        period = min(30.0, self.settings.idle_timeout_s / 4)
        while not self._stop.wait(period):
            self.expire_idle()

    def expire_idle(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        expired = [
            s
            for s in self.sessions()
            if s.streams == 0 and now - s.last_activity > self.settings.idle_timeout_s
        ]
        for session in expired:
            logger.info(
                "[Backbone] session %s expired after being idle", redact(session.session_id)
            )
            self._drop(session)
        return [s.session_id for s in expired]

    def close(self) -> None:
        LIVE.discard(self)
        self._stop.set()
        self.queue.close()

    @contextmanager
    def stream(self, session: Session, *, training: bool) -> Iterator[int]:
        """Mark a stream of ``session`` open (it does not expire meanwhile). A new
        training stream discards the unfinished step of an earlier one: the client
        redoes that step from its first micro-batch. Yields the stream's generation."""
        with self._lock:
            session.streams += 1
            if training:
                session.generation += 1
            generation = session.generation
        if training and self.batcher is not None:
            self.batcher.attach(session)
        try:
            if training:
                self.queue.run(session.session_id, lambda: self.zero_grad(session))
            yield generation
        finally:
            if training and self.batcher is not None:
                self.batcher.detach(session, generation)
            if training and session.in_step and generation == session.generation:
                # The stream ended mid-step: the step is discarded (the client redoes it
                # on its next stream), so it no longer holds the shared adapter.
                self.queue.run(session.session_id, lambda: self.zero_grad(session))
            with self._lock:
                session.streams -= 1
            session.touch()

    # --- training operations of a stream ----------------------------------------------

    def run_forward(
        self,
        session: Session,
        step: int,
        micro: int,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        *,
        train: bool,
    ) -> torch.Tensor:
        """:meth:`forward` in the session's turn on the compute queue; with client-batch,
        a training forward runs merged with other sessions' (``ClientBatcher``)."""
        if train and self.batcher is not None:
            self._check_batch(hidden, mask, 0)
            if session.trainable.graph_cost is None:  # probe passes: on the compute queue
                self.queue.run(session.session_id, partial(self._graph_cost, session))
            nbytes = self._admit_pass(session, hidden.shape[0], hidden.shape[1])
            hidden, mask = self._inputs(hidden, mask)
            return self.batcher.forward(session, step, micro, hidden, mask, graph_bytes=nbytes)
        job = partial(self.forward, session, step, micro, hidden, mask, train=train)
        return self.queue.run(session.session_id, job, "forward")

    def run_backward(
        self, session: Session, step: int, micro: int, grad: torch.Tensor
    ) -> torch.Tensor:
        if self.batcher is not None:
            return self.batcher.backward(session, step, micro, grad)
        return self.queue.run(
            session.session_id, partial(self.backward, session, step, micro, grad), "backward"
        )

    def run_step(
        self, session: Session, step: int, client_sq_norm: float, max_norm: float
    ) -> dict[str, Any]:
        if self.batcher is not None:
            replay = self._replay(session, step)
            if replay is not None:
                return replay
            return self.batcher.step(session, step, client_sq_norm, max_norm)
        return self.queue.run(
            session.session_id,
            partial(self.apply_step, session, step, client_sq_norm, max_norm),
            "step",
        )

    # --- compute (run on the queue's worker) -------------------------------------------

    def _check_batch(self, hidden: torch.Tensor, mask: torch.Tensor, cached: int) -> None:
        summary = self.shared.summary
        if hidden.dim() != 3 or hidden.shape[-1] != summary.hidden_size:
            raise InvalidArgumentError(
                f"h1 must be [batch, tokens, {summary.hidden_size}], got {list(hidden.shape)}"
            )
        if not hidden.is_floating_point():
            raise InvalidArgumentError(f"h1 must be floating point, got {hidden.dtype}")
        batch, tokens = hidden.shape[0], hidden.shape[1]
        if batch > self.settings.max_batch_size:
            raise LimitExceededError(
                f"batch of {batch} exceeds the limit of {self.settings.max_batch_size}"
            )
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] != cached + tokens:
            raise InvalidArgumentError(
                f"attention mask must be [{batch}, {cached + tokens}], got {list(mask.shape)}"
            )
        if mask.shape[1] > self.settings.max_sequence_length:
            raise LimitExceededError(
                f"sequence of {mask.shape[1]} positions exceeds the limit of "
                f"{self.settings.max_sequence_length}"
            )
        if mask.is_floating_point():
            raise InvalidArgumentError(f"attention mask must be integer, got {mask.dtype}")

    def _inputs(
        self, hidden: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.settings.device
        return hidden.to(device=device, dtype=self.shared.dtype), mask.to(device=device)

    def forward(
        self,
        session: Session,
        step: int,
        micro: int,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        *,
        train: bool,
    ) -> torch.Tensor:
        self._check_batch(hidden, mask, 0)
        hidden, mask = self._inputs(hidden, mask)
        if not train:
            with torch.no_grad():
                result: torch.Tensor = session.body(hidden, mask)
                return result.detach()
        if (step, micro) in session.pending:
            raise FailedPreconditionError(
                f"step {step} micro-batch {micro} was already sent forward"
            )
        if step != session.step + 1:
            raise FailedPreconditionError(
                f"the session has applied {session.step} steps; expected step "
                f"{session.step + 1}, got {step}"
            )
        self._graph_cost(session)
        nbytes = self._admit_pass(session, hidden.shape[0], hidden.shape[1])
        self._claim_shared_step(session)
        hidden.requires_grad_(True)
        with torch.enable_grad():
            output: torch.Tensor = session.body(hidden, mask)
        session.pending[(step, micro)] = PendingPass(hidden, output, nbytes)
        return output.detach()

    # --- quotas ----------------------------------------------------------------------

    def _graph_cost(self, session: Session) -> GraphCost:
        """The graph cost of the session's passes, fitted on first use (on the compute
        queue: it runs probe passes)."""
        trainable = session.trainable
        if trainable.graph_cost is None:
            key = (session.k, session.m, dataclasses.replace(trainable.adapter, seed=0))
            cost = self._graph_costs.get(key)
            if cost is None:
                cost = GraphCost.calibrate(trainable.body, self.shared.summary.hidden_size)
                self._graph_costs[key] = cost
            trainable.graph_cost = cost
        return trainable.graph_cost

    def _pending_of(self, session: Session) -> tuple[int, int]:
        """(passes, estimated bytes) of ``session``'s forwards awaiting their gradient."""
        if self.batcher is not None:
            return self.batcher.pending_of(session)
        passes = list(session.pending.values())
        return len(passes), sum(p.nbytes for p in passes)

    def usage(self, owner: str | None = None) -> Usage:
        """What ``owner``'s sessions (None: all sessions) hold now."""
        with self._lock:
            sessions = [s for s in self._sessions.values() if owner is None or s.owner == owner]
            stored = sum(1 for o in self._stored.values() if owner is None or o == owner)
        pending = [self._pending_of(s) for s in sessions]
        return Usage(
            sessions=len(sessions) + stored,
            pending_passes=sum(p for p, _ in pending),
            pending_bytes=sum(b for _, b in pending),
            cache_bytes=sum(s.cache_bytes for s in sessions),
        )

    def _admit_pass(self, session: Session, rows: int, tokens: int) -> int:
        """Check that one more training pass of ``rows`` x ``tokens`` fits every quota on
        passes awaiting their gradient; its estimated graph bytes."""
        s = self.settings
        assert session.trainable.graph_cost is not None
        nbytes = session.trainable.graph_cost.estimate(rows, tokens)
        passes, _ = self._pending_of(session)
        if passes >= s.max_pending_passes:
            raise LimitExceededError(
                f"{passes} forward passes of this session already await their gradient, the "
                "limit per session; send their BACKWARD (or ZERO_GRAD) before more FORWARDs"
            )
        largest = min(s.max_pending_bytes, s.max_pending_bytes_per_identity)
        if nbytes > largest:
            raise LimitExceededError(
                f"a training pass of {rows} x {tokens} tokens would hold about {nbytes} bytes "
                f"until its gradient; the backbone allows {largest}: send smaller micro-batches"
            )
        mine = self.usage(session.owner)
        if mine.pending_passes >= s.max_pending_passes_per_identity:
            raise LimitExceededError(
                f"{session.owner} has {mine.pending_passes} forward passes awaiting their "
                f"gradient, the limit per identity; send their BACKWARD first"
            )
        if mine.pending_bytes + nbytes > s.max_pending_bytes_per_identity:
            raise LimitExceededError(
                f"the passes of {session.owner} awaiting their gradient hold about "
                f"{mine.pending_bytes} bytes; {nbytes} more exceed the limit per identity "
                f"({s.max_pending_bytes_per_identity}): send their BACKWARD first"
            )
        total = self.usage().pending_bytes
        if total + nbytes > s.max_pending_bytes:
            raise LimitExceededError(
                f"passes awaiting their gradient in all sessions hold about {total} bytes; "
                f"{nbytes} more exceed the backbone's limit ({s.max_pending_bytes}); try later"
            )
        return nbytes

    def _claim_shared_step(self, session: Session) -> None:
        """In shared mode without client-batch, one session's step at a time: another
        session's graph or gradients on the one adapter would be corrupted by this one's
        (its STEP updates the adapter in place). Refused clearly instead."""
        with self._lock:
            busy = next(
                (
                    other
                    for other in self._sessions.values()
                    if other is not session
                    and other.in_step
                    and other.trainable is session.trainable
                ),
                None,
            )
            if busy is not None:
                raise FailedPreconditionError(
                    "adapter_mode shared trains one session's step at a time and session "
                    f"{redact(busy.session_id)} is in the middle of step {busy.step + 1}; turn "
                    "client_batch on to train concurrent sessions together"
                )
            session.in_step = True

    def backward(self, session: Session, step: int, micro: int, grad: torch.Tensor) -> torch.Tensor:
        pending = session.pending.pop((step, micro), None)
        if pending is None:
            raise FailedPreconditionError(
                f"no forward pass of step {step} micro-batch {micro} is waiting for its gradient"
            )
        hidden, output, _ = pending
        if grad.shape != output.shape:
            raise InvalidArgumentError(
                f"grad_h2 must have the shape of h2 {list(output.shape)}, got {list(grad.shape)}"
            )
        torch.autograd.backward(output, grad.to(device=output.device, dtype=output.dtype))
        assert hidden.grad is not None
        return hidden.grad.detach()

    def _replay(self, session: Session, step: int) -> dict[str, Any] | None:
        """The stored reply to a STEP the session already applied; None for a new step."""
        if step > session.step:
            return None
        if session.last_result is not None and step == session.step:
            return {**session.last_result, "already_applied": True}
        raise FailedPreconditionError(f"step {step} was applied long ago (now at {session.step})")

    def apply_step(
        self, session: Session, step: int, client_sq_norm: float, max_norm: float
    ) -> dict[str, Any]:
        replay = self._replay(session, step)
        if replay is not None:
            return replay
        if step != session.step + 1:
            raise FailedPreconditionError(
                f"the session has applied {session.step} steps; cannot apply step {step}"
            )
        if session.pending:
            raise FailedPreconditionError(
                f"{len(session.pending)} forward passes of step {step} still await their gradients"
            )
        trainable = session.trainable
        backbone_sq = grad_sq_norm(trainable.params)
        scale_grads(trainable.params, clip_factor(client_sq_norm + backbone_sq, max_norm))
        learning_rate = trainable.optimizer.param_groups[0]["lr"]
        trainable.optimizer.step()
        trainable.scheduler.step()
        trainable.optimizer.zero_grad(set_to_none=True)
        session.step = step
        session.in_step = False
        session.last_result = {
            "backbone_grad_sq_norm": backbone_sq,
            "learning_rate": float(learning_rate),
            "already_applied": False,
        }
        self.checkpoint(session)
        return session.last_result

    def zero_grad(self, session: Session) -> None:
        session.pending.clear()
        session.in_step = False
        if self.batcher is not None:
            # Only this session's part: the shared gradient belongs to a merged step.
            self.batcher.discard(session)
            return
        session.trainable.optimizer.zero_grad(set_to_none=True)

    def generate(self, session: Session, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cache = session.cache if session.cache is not None else session.body.new_cache()
        self._check_batch(hidden, mask, cache.length)
        rows = cache.batch if cache.length else None
        if rows is not None and rows != hidden.shape[0]:
            raise InvalidArgumentError(
                f"the session's KV cache holds {rows} rows, this step has {hidden.shape[0]}: "
                "every step of a generation has the batch of its prefill; reset the cache "
                "(GENERATE_OP_RESET) to start another"
            )
        new_bytes = (
            hidden.shape[0]
            * (cache.length + hidden.shape[1])
            * self.shared.per_position_cache_bytes(session.body)
        )
        others = [s for s in self.sessions() if s is not session]
        everyone = sum(s.cache_bytes for s in others) + new_bytes
        if everyone > self.settings.max_cache_bytes:
            raise LimitExceededError(
                f"KV caches would hold {everyone} bytes; the limit is "
                f"{self.settings.max_cache_bytes}: reset a cache or try later"
            )
        mine = sum(s.cache_bytes for s in others if s.owner == session.owner) + new_bytes
        if mine > self.settings.max_cache_bytes_per_identity:
            raise LimitExceededError(
                f"the KV caches of {session.owner} would hold {mine} bytes; the limit per "
                f"identity is {self.settings.max_cache_bytes_per_identity}: reset a cache "
                "(GENERATE_OP_RESET) or close a session"
            )
        hidden, mask = self._inputs(hidden, mask)
        with torch.no_grad():
            output: torch.Tensor = session.body(hidden, mask, cache)
        session.cache = cache
        session.cache_bytes = cache.nbytes()
        return output

    def reset_cache(self, session: Session) -> None:
        session.cache = None
        session.cache_bytes = 0

    def trim_cache(self, session: Session, length: int) -> int:
        if session.cache is None:
            if length:
                raise InvalidArgumentError("the session has no cache to trim")
            return 0
        try:
            session.cache.trim(length)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        session.cache_bytes = session.cache.nbytes()
        return session.cache.length

    def export_adapter(self, session: Session) -> dict[str, torch.Tensor]:
        return {
            name: t.detach().to("cpu") for name, t in session.trainable.adapter_tensors().items()
        }

    def import_adapter(self, session: Session, tensors: Mapping[str, torch.Tensor]) -> int:
        """Replace the session's adapter tensors named in ``tensors``: all finite, none
        unknown. The shared adapter (:meth:`shared_adapter`) changes for every session,
        so not while one is in the middle of a step on it (its graph would break)."""
        own = session.trainable.adapter_tensors()
        unknown = sorted(set(tensors) - set(own))
        if unknown:
            raise InvalidArgumentError(f"the session's adapter has no tensor {unknown[0]!r}")
        for name in sorted(tensors):
            tensor = tensors[name]
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise InvalidArgumentError(
                    f"adapter tensor {name!r} is not finite (NaN or infinity); nothing was imported"
                )
        shared = session.session_id == SHARED_ADAPTER
        sharing = [s for s in self.sessions() if s.trainable is session.trainable]
        if shared and (
            any(s.in_step or self._pending_of(s)[0] for s in sharing)
            or (self.batcher is not None and self.batcher.queued_sessions)
        ):
            raise FailedPreconditionError(
                "the shared adapter is in the middle of a step (forward passes await their "
                "gradient or the step is not applied yet); import between steps"
            )
        try:
            load_adapter_state(session.body, tensors)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        for each in sharing if shared else [session]:
            self.checkpoint(each)
        return len(own)

    def shared_adapter(self) -> Session:
        """The one adapter of shared mode, as a session an admin addresses by the id
        :data:`SHARED_ADAPTER` (ExportAdapter/ImportAdapter); its ``step`` counts the
        optimizer steps the adapter applied. Nothing of it is stored apart: an import
        checkpoints the sessions that train it."""
        if self.settings.adapter_mode != "shared":
            raise FailedPreconditionError(
                "this backbone trains one adapter per session (adapter_mode per-client); "
                f"there is no shared adapter to address as {SHARED_ADAPTER!r}"
            )
        with self._lock:
            trainable = self._shared_trainable
            if trainable is None:
                raise FailedPreconditionError(
                    "no session has opened the shared adapter yet: its configuration comes "
                    "from the first session"
                )
            return Session(
                session_id=SHARED_ADAPTER,
                owner="",
                k=self.settings.min_k,
                m=self.settings.min_m,
                adapter=trainable.adapter,
                optimizer_settings=OptimizerSettings(),
                encoding="raw",
                trainable=trainable,
                step=int(trainable.scheduler.last_epoch),
            )

    def check_adapter_access(self, session: Session, role: str, *, importing: bool) -> None:
        """Who may move a session's adapter: in shared mode the adapter is everyone's, so a
        client may neither replace it nor (unless ``export_shared_adapter``) read it;
        admins and aggregators may."""
        if self.settings.adapter_mode != "shared" or role in ("admin", "aggregator"):
            return
        if importing:
            raise PermissionDeniedError(
                "in adapter_mode shared every session trains one adapter: only an admin or an "
                "aggregator may replace it, not a client's ImportAdapter"
            )
        if not self.settings.export_shared_adapter:
            raise PermissionDeniedError(
                "in adapter_mode shared the adapter is trained on every client's data; "
                "clients may read it only where the operator sets [backbone] "
                "export_shared_adapter = true"
            )
