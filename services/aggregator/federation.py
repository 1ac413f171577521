"""One federation's rounds: selection, phases, deadlines, streaming aggregation, versions.

No gRPC in here: the handlers (:mod:`.handlers`) call these methods, which raise
:mod:`splitfed.errors`. One module over ~500 lines on purpose: membership, the round's
state machine and the uploads in flight share one lock and one state, and its invariants
(an update is in the running sum iff its sender is in ``contributors``; nothing in flight
survives the step that declares dropouts) are checked in one place. What holds the
updates' bytes is in :mod:`.updates`, what is written to disk and how in
:mod:`.persistence`.

Durability. ``state.json`` holds the round, its phase, the joined and selected clients
and the current global version. Each counted update is folded into a running sum that is
written, with the list of contributors in its metadata, atomically after every upload
(``sum.safetensors``): an update is either in the sum and in the list or in neither, so a
restarted aggregator neither loses a confirmed update nor counts one twice. Uploads are
received into a spool file first (constant memory) and folded from it under the lock. A
closed round writes ``versions/v<n>.safetensors`` (the global offset) and the strategy's
state for it before ``state.json`` moves on, so a crash in between redoes the same close.

Hostile members (docs/security.md, "Threat model"). Only configured members join (listed
identities, or the federation's join token); an update must hold exactly the tensors of
the federation's schema (from its configuration, never from an upload), finite values,
and at most the samples its sender declared at join (and ``max_samples``). An upload in
flight is tracked from its first message: when the deadline closes the upload phase, a
complete one is counted and a partial one is discarded with its bytes destroyed, in the
same locked step that declares the dropouts, so no reveal of seeds ever meets a masked
update the aggregator still holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from splitfed.errors import (
    AbortedError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from splitfed.logs import log_context
from splitfed.models.schema import Schema, schema_digest
from splitfed.protocol.aggregator import Peer, Phase, RoundPlan
from splitfed.services.aggregator.metrics import (
    AGGREGATION_SECONDS,
    AGGREGATOR_JOINED,
    AGGREGATOR_PARTICIPANTS,
    AGGREGATOR_ROUND,
    AGGREGATOR_ROUNDS,
    AGGREGATOR_UPDATES,
    AGGREGATOR_VERSION,
    FEDERATION_EPSILON,
)
from splitfed.services.aggregator.persistence import (
    FINISHED,
    KEYS,
    REVEAL,
    UPLOAD,
    WAITING,
    FederationFiles,
    RoundState,
    SumRecord,
)
from splitfed.services.aggregator.settings import FederationSettings
from splitfed.services.aggregator.strategies import (
    FedExP,
    RobustStrategy,
    is_robust,
    make_strategy,
    private_strategy,
)
from splitfed.services.aggregator.updates import (
    COMMITTED,
    COMPLETE,
    DISCARDED,
    KeptUpdates,
    PlainSum,
    Spool,
    SpoolWriter,
    Upload,
)

logger = logging.getLogger(__name__)

# The contract's phase of each phase ``state.json`` holds.
PHASES = {
    WAITING: Phase.WAITING,
    KEYS: Phase.KEYS,
    UPLOAD: Phase.UPLOAD,
    REVEAL: Phase.REVEAL,
    FINISHED: Phase.FINISHED,
}


@dataclass(frozen=True)
class RoundView:
    """A round as :meth:`Federation.plan` shows it: the contract's plan, and what a
    watch adds to it (updates counted so far, participants the attempt waits for)."""

    plan: RoundPlan
    received: int
    participants: int


def not_a_member(identity: str, federation: str) -> PermissionDeniedError:
    """The one refusal for a federation that does not exist or that ``identity`` is not a
    member of: the answer tells nobody which federations exist."""
    return PermissionDeniedError(
        f"{identity} is not a member of a federation {federation!r} on this aggregator; its "
        "operator lists members in the federation's config (members, or a join token)"
    )


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class NotFiniteError(InvalidArgumentError):
    """A round's aggregate holds NaN or infinity: it is refused, not published."""


class ServerAdapters(Protocol):
    """The body adapters that the backbones hold for a federation's sessions."""

    def verify(self, session: tuple[str, str], owner: str, federation: str) -> None:
        """Raise ``PermissionDeniedError`` unless the backbone at ``session[0]`` holds
        session ``session[1]`` of ``owner`` opened for ``federation``."""
        ...

    def aggregate(
        self, contributors: Mapping[str, tuple[tuple[str, str], int]], federation: str
    ) -> dict[str, torch.Tensor]:
        """Pull the contributors' session adapters (identity -> (session, samples)),
        average them weighted by samples, push the average into those sessions; returns
        the average."""
        ...


class Federation:
    def __init__(self, settings: FederationSettings, directory: Path) -> None:
        self.settings = settings
        self.directory = directory
        self.strategy = make_strategy(settings.strategy, settings.strategy_options)
        self.robust = is_robust(self.strategy)
        # DP-FedAvg: updates clipped and weighed equally, noise on the sum.
        self.private = private_strategy(self.strategy)
        # The federation's tensors: from its configuration, never from an upload.
        self.schema: Schema = settings.tensor_schema()
        self.schema_digest = schema_digest(self.schema)
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.files = FederationFiles(directory)
        self.state = self._load_state()
        self._check_versions()
        self.epsilon = self._epsilon()
        self._export_state()
        self.contributors: dict[str, int] = {}
        # identity -> (backbone address, session id) of this round's contributors
        self.sessions: dict[str, tuple[str, str]] = {}
        # identity -> its upload of this round attempt that is not yet counted
        self.inflight: dict[str, Upload] = {}
        self.server_adapters: ServerAdapters | None = None
        self.accumulator: Any = None
        # Sum over this round's updates of samples x the update's squared L2 norm (plain
        # aggregation only): what FedExP's server step size is computed from.
        self.update_sq = 0.0
        self._load_sum()
        if self.state.phase == REVEAL or (
            self.state.phase == UPLOAD and set(self.contributors) >= set(self._peers())
        ):
            with self.lock:  # a close notifies waiters, which needs the lock
                self._maybe_close(time.time())

    def __repr__(self) -> str:
        return f"Federation({self.settings.name!r})"

    # --- persistence ------------------------------------------------------------------

    def _load_state(self) -> RoundState:
        state = self.files.load_state()
        # Members removed from the configuration (or whose join token changed) are out.
        gone = [i for i in state.joined if not self._allowed(i, state)]
        if gone:
            logger.warning(
                "[Aggregator] %s: %d former member(s) are no longer allowed by the config: %s",
                self.settings.name,
                len(gone),
                ", ".join(gone),
            )
            state.joined = [i for i in state.joined if i not in gone]
        return state

    def _check_versions(self) -> None:
        """The latest version must have the configured schema (a changed schema would mix
        tensors of two adapters)."""
        if self.state.version == 0:
            return
        stored = self.files.version_shapes(self.state.version)
        if stored is not None and stored != self.schema:
            raise ValueError(
                f"federation {self.settings.name!r}: its schema differs from the tensors of "
                f"its version {self.state.version} "
                f"({self.files.version_path(self.state.version)}); a federation keeps one "
                "adapter shape for its life: restore the schema or start a new federation"
            )

    def _save_state(self) -> None:
        self.files.save_state(self.state)
        self._export_state()
        self.changed.notify_all()

    def _log_context(self) -> contextlib.AbstractContextManager[None]:
        return log_context(federation=self.settings.name, round=self.state.round)

    def _export_state(self) -> None:
        name, s = self.settings.name, self.state
        AGGREGATOR_ROUND.labels(name).set(s.round)
        AGGREGATOR_VERSION.labels(name).set(s.version)
        AGGREGATOR_JOINED.labels(name).set(len(s.joined))
        if self.private is not None:
            FEDERATION_EPSILON.labels(name).set(self.epsilon)

    def _epsilon(self) -> float:
        """DP-FedAvg: epsilon (at the strategy's delta) over the closed rounds in the
        history, each a sampled Gaussian mechanism with the noise multiplier and client
        sampling rate it recorded. A round closed without DP-FedAvg (before the federation
        switched to it) released an update without noise: epsilon is then infinite.
        0.0 for a federation that does not use DP-FedAvg (nothing is reported for it)."""
        if self.private is None:
            return 0.0
        from splitfed.security.dp_fedavg import federation_epsilon

        rounds = []
        for entry in self.state.history:
            dp = entry.get("dp")
            rounds.append(
                (float(dp["noise_multiplier"]), float(dp["sample_rate"])) if dp else (0.0, 1.0)
            )
        return federation_epsilon(rounds, self.private.delta)

    def _reset_sum(self) -> None:
        """Forget this round's updates in memory (they stay in the sum file, if any)."""
        self.contributors, self.accumulator = {}, None
        self.sessions = {}
        self.update_sq = 0.0

    def _load_sum(self) -> None:
        stored = self.files.load_sum()
        if stored is None:
            self.files.remove_kept()
            return
        record, tensors = stored
        if (record.round, record.attempt) != (self.state.round, self.state.attempt):
            self.files.remove_sum()
            self.files.remove_kept()
            return
        if record.schema_digest != self.schema_digest:
            logger.warning(
                "[Aggregator] %s round %d: the stored running sum is of another schema; "
                "its updates are discarded and their senders upload again",
                self.settings.name,
                self.state.round,
            )
            self.files.remove_sum()
            self.files.remove_kept()
            return
        self.contributors = record.contributors
        self.sessions = record.sessions
        self.update_sq = record.update_sq
        self.accumulator = self._new_accumulator()
        if self.robust:
            self.accumulator.load(record.kept or "{}")
            self.accumulator.remove_unlisted()
        else:
            self.accumulator.load(tensors)
        logger.info(
            "[Aggregator] %s round %d: resumed with %d update(s)",
            self.settings.name,
            self.state.round,
            len(self.contributors),
        )

    def _new_accumulator(self) -> Any:
        if self.settings.secure_aggregation:
            from splitfed.security.secagg import MaskedSum, SecAggParams

            params = SecAggParams(
                self.settings.name, self.state.round, scale=self.settings.secagg_scale
            )
            return MaskedSum(params, self.schema)
        if self.robust:
            return KeptUpdates(self.files.kept_dir, self.schema)
        return PlainSum(self.schema)

    def _save_sum(self) -> None:
        record = SumRecord(
            round=self.state.round,
            attempt=self.state.attempt,
            contributors=self.contributors,
            sessions=self.sessions,
            schema_digest=self.schema_digest,
            update_sq=self.update_sq,
            kept=self.accumulator.meta() if self.robust else None,
        )
        self.files.save_sum(record, self.accumulator.state())

    def offset(self, version: int) -> dict[str, torch.Tensor]:
        """The global offset at ``version`` (empty for version 0)."""
        if version == 0:
            return {}
        tensors = self.files.offset(version)
        if tensors is None:
            raise NotFoundError(f"federation {self.settings.name!r} has no version {version}")
        return tensors

    def body(self, version: int) -> dict[str, torch.Tensor]:
        """The average body adapter made with ``version`` (server-side adapters); empty
        if there is none."""
        return self.files.body(version)

    def current_version(self) -> int:
        """The latest global version (0 before the first round closes)."""
        with self.lock:
            return self.state.version

    # --- membership ---------------------------------------------------------------------

    def _allowed(self, identity: str, state: RoundState | None = None) -> bool:
        """Whether the configuration lets ``identity`` be a member."""
        state = state or self.state
        digest = self.settings.join_token_sha256
        return identity in self.settings.members or bool(
            digest and state.token_members.get(identity) == digest
        )

    def is_member(self, identity: str) -> bool:
        with self.lock:
            return identity in self.state.joined and self._allowed(identity)

    def require_member(self, identity: str) -> None:
        if not self.is_member(identity):
            raise not_a_member(identity, self.settings.name)

    def join(self, identity: str, samples: int, token: str = "") -> None:
        """Admit a member: listed in ``members``, or presenting the join token. ``samples``
        is the size of its dataset: no update of it may claim more (a later join may lower
        it, never raise it)."""
        with self.lock, self._log_context():
            digest = self.settings.join_token_sha256
            by_token = bool(digest and token and hmac.compare_digest(token_digest(token), digest))
            if not (identity in self.settings.members or by_token or self._allowed(identity)):
                logger.warning(
                    "[Aggregator.Join] %s refused: not a member of %s%s",
                    identity,
                    self.settings.name,
                    " (wrong join token)" if token else "",
                )
                raise not_a_member(identity, self.settings.name)
            if not 1 <= samples <= self.settings.max_samples:
                raise InvalidArgumentError(
                    f"declare your dataset's size at join: num_samples must be in [1, "
                    f"{self.settings.max_samples}] (the federation's max_samples), got {samples}"
                )
            s = self.state
            previous = s.declared.get(identity)
            if previous is not None and samples > previous:
                raise FailedPreconditionError(
                    f"{identity} joined with {previous} samples and may not claim more "
                    f"({samples}); ask the federation's operator to reset its membership"
                )
            changed = previous != samples
            s.declared[identity] = samples
            if by_token and s.token_members.get(identity) != digest:
                s.token_members[identity] = digest
                changed = True
            if identity not in s.joined:
                s.joined.append(identity)
                logger.info("[Aggregator.Join] %s joined %s", identity, self.settings.name)
                changed = True
            if changed:
                self._save_state()
            if s.phase == WAITING:
                self._open(time.time())

    # --- plans ------------------------------------------------------------------------

    def _peers(self) -> list[str]:
        """Who this round attempt waits for: selected clients (with secure aggregation,
        those that advertised a key)."""
        if self.settings.secure_aggregation and self.state.phase in (UPLOAD, REVEAL):
            return sorted(self.state.keys)
        return list(self.state.selected)

    def plan(self, identity: str, *, member: bool = True) -> RoundView:
        """The plan as ``identity`` sees it. Peers' names and keys and the dropped peers
        go only to this round's participants; ``member=False`` (an admin's status view)
        shows the round without them."""
        with self.lock:
            s = self.state
            peers = self._peers()
            selected = member and (
                identity in peers or (s.phase == KEYS and identity in s.selected)
            )
            participant = member and identity in peers
            plan = RoundPlan(
                federation=self.settings.name,
                round=s.round,
                attempt=s.attempt,
                phase=PHASES[s.phase],
                global_version=s.version,
                selected=selected,
                uploaded=member and identity in self.contributors,
                local_steps=self.settings.local_steps,
                deadline=s.deadline,
                adapter_seed=self.settings.adapter_seed,
                secure_aggregation=self.settings.secure_aggregation,
                peers=(
                    tuple(Peer(name, bytes.fromhex(s.keys[name])) for name in sorted(peers))
                    if participant
                    and self.settings.secure_aggregation
                    and s.phase in (UPLOAD, REVEAL)
                    else ()
                ),
                secagg_scale=self.settings.secagg_scale,
                dropped=tuple(s.dropped) if participant and s.phase == REVEAL else (),
                rounds=self.settings.rounds,
                message=s.message,
                schema_digest=self.schema_digest,
                **self._dp_plan(),
            )
            return RoundView(plan, received=len(self.contributors), participants=len(peers))

    def _dp_plan(self) -> dict[str, float]:
        """The plan's DP-FedAvg fields (none without it). With secure aggregation each
        client adds noise of sigma * C / sqrt(min_clients): a round closes with at least
        min_clients updates, so their sum carries at least sigma * C."""
        dp = self.private
        if dp is None:
            return {}
        secure = self.settings.secure_aggregation
        return {
            "dp_clip_norm": dp.clip,
            "dp_noise_multiplier": dp.sigma,
            "dp_client_noise_std": (
                dp.sum_noise_std / math.sqrt(self.settings.min_clients) if secure else 0.0
            ),
            "dp_epsilon": self.epsilon,
            "dp_delta": dp.delta,
        }

    def wait_for_change(self, seen: tuple[Any, ...] | None, timeout_s: float) -> tuple[Any, ...]:
        """Block until the round's visible state differs from ``seen`` (or timeout)."""
        with self.lock:
            key = self._status_key()
            if key == seen:
                self.changed.wait(timeout_s)
                key = self._status_key()
            return key

    def _status_key(self) -> tuple[Any, ...]:
        s = self.state
        return (s.round, s.attempt, s.phase, s.version, len(self.contributors), len(s.keys))

    # --- selection ----------------------------------------------------------------------

    def _open(self, now: float, message: str = "") -> None:
        s = self.state
        self._discard_inflight("a new round attempt started")
        if self.settings.rounds and s.round > self.settings.rounds:
            s.phase = FINISHED
            self._reset_sum()
            self._save_state()
            return
        if len(s.joined) < self.settings.start_clients:
            s.phase, s.selected, s.message = WAITING, [], message
            self._reset_sum()
            self._save_state()
            return
        count = max(
            self.settings.min_clients, math.ceil(self.settings.sample_fraction * len(s.joined))
        )
        # DP-FedAvg's amplification by sampling assumes nobody can predict who is
        # selected: its selection is drawn from the OS, not seeded by federation and round.
        rng = (
            random.SystemRandom()
            if self.private is not None
            else random.Random(f"{self.settings.name}/{s.round}/{s.attempt}")
        )
        s.selected = sorted(rng.sample(sorted(s.joined), min(count, len(s.joined))))
        s.candidates = len(s.joined)
        s.phase = KEYS if self.settings.secure_aggregation else UPLOAD
        s.deadline = now + self.settings.deadline_s
        s.keys, s.dropped, s.revealed, s.message = {}, [], {}, message
        self._reset_sum()
        self._save_state()
        # After state.json names the new attempt: a sum of an older one is never counted.
        self.files.remove_sum()
        self.files.remove_kept()
        logger.info(
            "[Aggregator] %s round %d attempt %d: %s selected (%s)",
            self.settings.name,
            s.round,
            s.attempt,
            len(s.selected),
            s.phase,
        )

    def _retry(self, now: float, why: str) -> None:
        s = self.state
        message = f"round {s.round} attempt {s.attempt} failed: {why}; retrying"
        AGGREGATOR_ROUNDS.labels(self.settings.name, "retried").inc()
        logger.warning("[Aggregator] %s: %s", self.settings.name, message)
        s.attempt += 1
        self._open(now, message)

    # --- secure aggregation -------------------------------------------------------------

    def _check_round(self, identity: str, round_: int, attempt: int, phase: str) -> None:
        s = self.state
        self.require_member(identity)
        if (round_, attempt) != (s.round, s.attempt) or s.phase != phase:
            raise FailedPreconditionError(
                f"federation {self.settings.name!r} is in round {s.round} attempt "
                f"{s.attempt} ({s.phase}), not round {round_} attempt {attempt} ({phase}); "
                "get the current plan"
            )

    def advertise_key(self, identity: str, round_: int, attempt: int, key: bytes) -> None:
        if not self.settings.secure_aggregation:
            raise FailedPreconditionError("this federation does not use secure aggregation")
        if len(key) != 32:
            raise InvalidArgumentError("an X25519 public key has 32 bytes")
        with self.lock:
            self._check_round(identity, round_, attempt, KEYS)
            if identity not in self.state.selected:
                raise FailedPreconditionError(f"{identity} is not selected for this round")
            self.state.keys[identity] = key.hex()
            if set(self.state.keys) >= set(self.state.selected):
                self.state.phase = UPLOAD
                self.state.deadline = time.time() + self.settings.deadline_s
            self._save_state()

    def reveal(self, identity: str, round_: int, attempt: int, seeds: Mapping[str, bytes]) -> None:
        with self.lock, self._log_context():
            self._check_round(identity, round_, attempt, REVEAL)
            if identity not in self.contributors:
                raise FailedPreconditionError(f"{identity} has no update in this round")
            if set(seeds) != set(self.state.dropped):
                raise InvalidArgumentError(
                    f"reveal the seeds for exactly the dropped peers {self.state.dropped}"
                )
            if any(len(seed) != 32 for seed in seeds.values()):
                raise InvalidArgumentError("pairwise seeds have 32 bytes")
            self.state.revealed[identity] = {peer: seed.hex() for peer, seed in seeds.items()}
            self._save_state()
            self._maybe_close(time.time())

    # --- uploads ------------------------------------------------------------------------

    def _check_upload(self, identity: str, round_: int, attempt: int, base: int) -> None:
        self._check_round(identity, round_, attempt, UPLOAD)
        if identity not in self._peers():
            raise FailedPreconditionError(
                f"{identity} is not a participant of round {round_} attempt {attempt}"
            )
        if base != self.state.version:
            raise FailedPreconditionError(
                f"stale update: trained from version {base}, the global is at version "
                f"{self.state.version}; download it and train again"
            )

    def begin_upload(
        self,
        identity: str,
        round_: int,
        attempt: int,
        base: int,
        samples: int,
        session: tuple[str, str] | None = None,
    ) -> Upload | None:
        """Register an upload from its first message; None if its update is already
        counted (a duplicate). Its bytes go to ``upload.writer``; then
        :meth:`commit_upload`, and :meth:`end_upload` in every case."""
        with self.lock:
            self._check_upload(identity, round_, attempt, base)
            if identity in self.contributors:
                return None
            limit = min(self.state.declared.get(identity, 0), self.settings.max_samples)
            if not 1 <= samples <= limit:
                raise InvalidArgumentError(
                    f"num_samples {samples} is not in [1, {limit}]: an update may claim at "
                    "most the samples its member declared at join (and the federation's "
                    "max_samples)"
                )
            if identity in self.inflight:
                raise FailedPreconditionError(
                    f"an upload of {identity} for round {round_} is already in progress; "
                    "wait for its answer"
                )
            fd, path = self.files.new_spool()
            spool = Spool(path)
            expected = torch.int64 if self.settings.secure_aggregation else torch.float32
            writer = SpoolWriter(
                spool, os.fdopen(fd, "wb"), expected, self.settings.max_adapter_bytes, self.schema
            )
            upload = Upload(identity, round_, attempt, base, samples, spool, writer, session)
            self.inflight[identity] = upload
            return upload

    def commit_upload(self, upload: Upload) -> tuple[bool, int]:
        """Count a complete upload (fold it into the round and persist it); returns
        (duplicate, updates counted). An upload the deadline discarded raises ABORTED."""
        upload.finish()
        with self.lock, self._log_context():
            if upload.state == COMMITTED:  # counted by the deadline while it waited
                assert upload.result is not None
                return upload.result
            if upload.state == DISCARDED or self.inflight.get(upload.identity) is not upload:
                raise AbortedError(
                    "this upload was discarded (its round attempt ended); get the current plan"
                )
            self._check_upload(upload.identity, upload.round, upload.attempt, upload.base)
            count = self._count(upload)
            self._maybe_close(time.time())
            return False, count

    def end_upload(self, upload: Upload) -> None:
        """The upload's call is over: if it was not counted, discard it (bytes destroyed)."""
        with self.lock:
            if self.inflight.get(upload.identity) is upload:
                del self.inflight[upload.identity]
            if upload.state != COMMITTED:
                upload.discard()
        with contextlib.suppress(FileNotFoundError):
            if upload.spool.path.parent == self.files.spool_dir:
                upload.spool.path.unlink()

    def _discard_inflight(self, why: str) -> None:
        for upload in list(self.inflight.values()):
            logger.info("[Aggregator] discarding the upload of %s: %s", upload.identity, why)
            upload.discard()
        self.inflight.clear()

    def _settle_inflight(self) -> None:
        """At the end of the upload phase: count every complete upload, discard (and
        destroy) every partial one. Runs under the lock, before any dropout is declared."""
        for identity, upload in list(self.inflight.items()):
            if upload.snapshot() == COMPLETE:
                try:
                    self._count(upload)
                    continue
                except Exception as exc:
                    logger.warning(
                        "[Aggregator] the waiting upload of %s was not counted: %s", identity, exc
                    )
            logger.info(
                "[Aggregator] %s round %d: the deadline discards the unfinished upload of %s",
                self.settings.name,
                self.state.round,
                identity,
            )
            upload.discard()
            del self.inflight[identity]

    def _count(self, upload: Upload) -> int:
        """Fold ``upload`` into the round and persist it (under the lock)."""
        identity = upload.identity
        spool = upload.spool
        received = {t.name: t.shape for t in spool.tensors}
        if received != self.schema:
            missing = sorted(set(self.schema) - set(received))
            raise InvalidArgumentError(
                f"the update lacks {len(missing)} tensor(s) of the federation's schema, e.g. "
                f"{missing[0]!r}"
                if missing
                else "the update's tensors differ from the federation's schema"
            )
        if self.accumulator is None:
            self.accumulator = self._new_accumulator()
        secure = self.settings.secure_aggregation
        equal = secure or self.robust or self.private is not None
        weight = 1.0 if equal else float(upload.samples)
        try:
            squares, factor = 0.0, 1.0
            if secure:
                for name, start, values in spool.chunks():
                    self.accumulator.add_chunk(name, start, values)
            else:
                squares = self._check_finite(spool)
                clip = self.settings.clip_update_norm
                if self.private is not None:
                    clip = min(clip or math.inf, self.private.clip)
                if clip and squares > clip * clip:
                    factor = clip / math.sqrt(squares)
                if self.robust:
                    tag = f"r{upload.round}a{upload.attempt}"
                    self.accumulator.keep(identity, spool, factor, tag)
                else:
                    for name, start, values in spool.chunks():
                        self.accumulator.fold(name, start, values, weight * factor)
            self.update_sq += weight * squares * factor * factor
            self.contributors[identity] = upload.samples
            if upload.session is not None:
                self.sessions[identity] = upload.session
            self._save_sum()
            AGGREGATOR_UPDATES.labels(self.settings.name).inc()
        except BaseException:
            # Back to what is on disk: the sum without this update.
            self._reset_sum()
            self._load_sum()
            raise
        upload.state = COMMITTED
        upload.result = (False, len(self.contributors))
        self.inflight.pop(identity, None)
        logger.info(
            "[Aggregator.UploadUpdate] %s round %d: update %d/%d from %s (%d samples%s)",
            self.settings.name,
            upload.round,
            len(self.contributors),
            len(self._peers()),
            identity,
            upload.samples,
            f", clipped x{factor:.3g}" if factor < 1 else "",
        )
        self.changed.notify_all()
        return len(self.contributors)

    @staticmethod
    def _check_finite(spool: Spool) -> float:
        """The update's squared L2 norm; refuses NaN and infinity."""
        squares = 0.0
        for name, _, values in spool.chunks():
            if not np.isfinite(values).all():
                raise InvalidArgumentError(
                    f"tensor {name!r} of the update holds NaN or infinite values; refused"
                )
            wide = values.astype(np.float64)
            squares += float(np.dot(wide, wide))
        if not math.isfinite(squares):
            raise InvalidArgumentError("the update's norm is not finite; refused")
        return squares

    # --- closing ------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Apply deadlines."""
        with self.lock, self._log_context():
            self._maybe_close(time.time() if now is None else now)

    def _maybe_close(self, now: float) -> None:
        s = self.state
        expired = s.deadline and now >= s.deadline
        if s.phase == KEYS and expired:
            if len(s.keys) >= self.settings.min_clients:
                s.phase, s.deadline = UPLOAD, now + self.settings.deadline_s
                self._save_state()
            else:
                self._retry(now, f"{len(s.keys)} of min {self.settings.min_clients} keys")
        elif s.phase == UPLOAD:
            peers = set(self._peers())
            if not set(self.contributors) >= peers and expired:
                # Every upload that has started is counted or destroyed now, in this
                # locked step, before anyone is declared dropped.
                self._settle_inflight()
            if set(self.contributors) >= peers:
                self._close(now)
            elif expired:
                if len(self.contributors) < self.settings.min_clients:
                    self._retry(
                        now,
                        f"{len(self.contributors)} of min {self.settings.min_clients} updates "
                        "arrived before the deadline",
                    )
                elif self.settings.secure_aggregation:
                    s.dropped = sorted(peers - set(self.contributors))
                    s.phase, s.deadline = REVEAL, now + self.settings.deadline_s
                    self._save_state()
                else:
                    self._close(now)
        elif s.phase == REVEAL:
            if set(s.revealed) >= set(self.contributors):
                self._close(now)
            elif expired:
                self._retry(now, "survivors did not reveal their seeds for dropped peers")

    def _close(self, now: float) -> None:
        try:
            with AGGREGATION_SECONDS.labels(self.settings.name).time():
                self._close_round(now)
        except NotFiniteError as exc:
            # Not published: the attempt is retried without these updates.
            self._reset_sum()
            self._retry(now, str(exc))
            return
        except BaseException:
            # The close consumes the in-memory sum: back to what is on disk (the sum of
            # this round's updates), so that the next attempt to close starts over.
            self._reset_sum()
            self._load_sum()
            raise
        AGGREGATOR_ROUNDS.labels(self.settings.name, "closed").inc()

    def _noised(
        self, averages: Iterable[tuple[str, torch.Tensor]], contributors: int
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """DP-FedAvg in plain rounds: the average of the clipped updates plus the sum's
        noise N(0, (sigma * C)^2) divided by the contributors, tensor by tensor."""
        from splitfed.security.dp_fedavg import add_noise, noise_generator

        assert self.private is not None
        generator = noise_generator()
        std = self.private.sum_noise_std / contributors
        for name, average in averages:
            yield name, add_noise(average, std, generator)

    def _dp_record(self) -> dict[str, float] | None:
        """What the accountant needs of the round being closed (in its history entry):
        the noise multiplier and the client sampling rate (selected / members the
        selection drew from), and the clip norm and client noise for the record."""
        if self.private is None:
            return None
        s = self.state
        candidates = s.candidates or len(s.joined)
        plan = self._dp_plan()
        return {
            "noise_multiplier": self.private.sigma,
            "sample_rate": min(1.0, len(s.selected) / max(candidates, 1)),
            "clip_norm": self.private.clip,
            "client_noise_std": plan["dp_client_noise_std"],
        }

    def _close_round(self, now: float) -> None:
        s = self.state
        total = sum(self.contributors.values())
        # DP-FedAvg weighs every update 1: the sum is divided by the contributors.
        divisor = len(self.contributors) if self.private is not None else total
        state = self.files.strategy_state(s.version)
        scale = None
        averages: Iterable[tuple[str, torch.Tensor]]
        if self.settings.secure_aggregation:
            for survivor, seeds in s.revealed.items():
                for dropped, seed in seeds.items():
                    self.accumulator.remove_masks(survivor, dropped, bytes.fromhex(seed))
            averages = self.accumulator.decoded(float(divisor))
        elif self.robust:
            robust: RobustStrategy = self.strategy  # type: ignore[assignment]
            averages = self.accumulator.combined(robust)
        else:
            if isinstance(self.strategy, FedExP):
                scale = self.strategy.scale(
                    self.update_sq / total, self.accumulator.squared_norm() / total**2
                )
                state["scale"] = torch.tensor([scale], dtype=torch.float64)
            averages = self.accumulator.averaged(float(divisor))
            if self.private is not None and self.private.sigma > 0:
                averages = self._noised(averages, len(self.contributors))
        previous = self.offset(s.version)
        version = s.version + 1

        def offsets() -> Iterator[tuple[str, np.ndarray[Any, Any]]]:
            # Tensor by tensor (strategies work per tensor name), written as it is made:
            # the close holds the sum and a tensor or two, never a whole second adapter
            # (docs/benchmarks.md "Aggregator memory").
            for name, average in averages:
                step = self.strategy.step(previous, {name: average}, state)
                del average
                array = step[name].contiguous().numpy()
                if not np.isfinite(array).all():
                    raise NotFiniteError(
                        f"the aggregate of tensor {name!r} is not finite (NaN or infinity); "
                        "the round's result was refused, not published"
                    )
                yield name, array

        self.files.write_version(
            version,
            self.schema,
            offsets(),
            {"round": str(s.round), "contributors": json.dumps(self.contributors)},
        )
        self.files.write_strategy_state(version, state, self.strategy.name)
        if self.server_adapters is not None:
            body = self.server_adapters.aggregate(
                {
                    k: (self.sessions[k], n)
                    for k, n in self.contributors.items()
                    if k in self.sessions
                },
                self.settings.name,
            )
            if body:
                self.files.write_body(version, body, s.round)
        dp = self._dp_record()
        s.history.append(
            {
                "round": s.round,
                "attempt": s.attempt,
                "version": version,
                "contributors": dict(self.contributors),
                "samples": total,
                "closed_at": now,
                **({"step_scale": scale} if scale is not None else {}),
                **({"dp": dp} if dp is not None else {}),
            }
        )
        if self.private is not None:
            self.epsilon = self._epsilon()
        logger.info(
            "[Aggregator] %s round %d closed: version %d from %d update(s), %d samples%s%s",
            self.settings.name,
            s.round,
            version,
            len(self.contributors),
            total,
            "" if scale is None else f", server step x{scale:.3f}",
            ""
            if self.private is None
            else f", dp_fedavg epsilon {self.epsilon:.4g} at delta {self.private.delta:g}",
        )
        AGGREGATOR_PARTICIPANTS.labels(self.settings.name).set(len(self.contributors))
        s.version, s.round, s.attempt = version, s.round + 1, 1
        self._open(now)
        self.files.remove_sum()  # counted in the version; state.json has moved on


def federations(configs: Iterable[FederationSettings], state_dir: Path) -> dict[str, Federation]:
    return {f.name: Federation(f, state_dir / f.name) for f in configs}
