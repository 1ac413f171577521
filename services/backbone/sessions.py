"""The backbone's sessions: what one holds, and the registry that opens, finds, restores,
checkpoints, closes and expires them, with their owners, the session limits and the
streams that keep a session alive. No compute, no gRPC in here."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
from splitfed.models.adapters import AdapterSettings
from splitfed.models.optim import OptimizerSettings
from splitfed.models.parts import Body, PartCache
from splitfed.services.backbone.bodies import SharedBody, Trainable
from splitfed.services.backbone.settings import BackboneSettings
from splitfed.services.backbone.store import SessionRecord, SessionStore, Snapshot

logger = logging.getLogger(__name__)


def no_such_session(session_id: str) -> PermissionDeniedError:
    """The one refusal for a session the caller may not use, whether or not it exists."""
    return PermissionDeniedError(
        f"session {redact(session_id)!r} does not exist (closed, expired or never opened) "
        "or belongs to another identity"
    )


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

    def expect_next_step(self, step: int) -> None:
        """Refuse a training forward of any step but the one after the applied ones."""
        if step != self.step + 1:
            raise FailedPreconditionError(
                f"the session has applied {self.step} steps; expected step "
                f"{self.step + 1}, got {step}"
            )

    def applied(
        self, step: int, backbone_grad_sq_norm: float, learning_rate: float
    ) -> dict[str, Any]:
        """Step ``step`` was applied: its reply is stored first (a STEP repeated meanwhile
        reads the step, then the reply), then the step; returns the reply."""
        result: dict[str, Any] = {
            "backbone_grad_sq_norm": backbone_grad_sq_norm,
            "learning_rate": learning_rate,
            "already_applied": False,
        }
        self.last_result = result
        self.step = step
        self.in_step = False
        return result

    def cannot_apply(self, step: int) -> FailedPreconditionError:
        """The refusal of a STEP that is not the session's next one."""
        return FailedPreconditionError(
            f"the session has applied {self.step} steps; cannot apply step {step}"
        )

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


class SessionRegistry:
    """The sessions of one backbone by id, live or stored (a stored one comes back on
    its owner's first use after a restart), and who may use each."""

    def __init__(self, settings: BackboneSettings, shared: SharedBody, store: SessionStore) -> None:
        self.settings = settings
        self.shared = shared
        self.store = store
        # Called with each session that closes or expires (e.g. to end its keys).
        self.on_drop: list[Callable[[Session], None]] = []
        self._lock = threading.RLock()
        self._sessions: dict[str, Session] = {}
        self._shared_trainable: Trainable | None = None
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

    @property
    def shared_trainable(self) -> Trainable | None:
        """The one trainable of shared mode, once a session opened it."""
        with self._lock:
            return self._shared_trainable

    def _sessions_of(self, owner: str) -> int:
        """Sessions ``owner`` holds, live or stored (call with the lock held)."""
        live = sum(1 for s in self._sessions.values() if s.owner == owner)
        return live + sum(1 for o in self._stored.values() if o == owner)

    def held(self, owner: str | None = None) -> tuple[list[Session], int]:
        """``owner``'s (None: everyone's) live sessions and the number of stored ones."""
        with self._lock:
            sessions = [s for s in self._sessions.values() if owner is None or s.owner == owner]
            stored = sum(1 for o in self._stored.values() if owner is None or o == owner)
        return sessions, stored

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

    def claim_step(self, session: Session) -> None:
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

    def stream_opened(self, session: Session, *, training: bool) -> int:
        """A stream of ``session`` opened (it does not expire meanwhile); a training
        stream becomes the session's newest. The stream's generation."""
        with self._lock:
            session.streams += 1
            if training:
                session.generation += 1
            return session.generation

    def stream_closed(self, session: Session) -> None:
        with self._lock:
            session.streams -= 1
        session.touch()

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
        """Stop expiring sessions."""
        self._stop.set()
