"""One federation's rounds: selection, phases, deadlines, streaming aggregation, versions.

No gRPC in here: the servicer calls these methods, which raise :mod:`splitfed.errors`.

Durability. ``state.json`` holds the round, its phase, the joined and selected clients
and the current global version. Each counted update is folded into a running sum that is
written, with the list of contributors in its metadata, atomically after every upload
(``sum.safetensors``): an update is either in the sum and in the list or in neither, so a
restarted aggregator neither loses a confirmed update nor counts one twice. Uploads are
received into a spool file first (constant memory) and folded from it under the lock. A
closed round writes ``versions/v<n>.safetensors`` (the global offset) and the strategy's
state for it before ``state.json`` moves on, so a crash in between redoes the same close.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import torch

from splitfed.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
)
from splitfed.logs import log_context
from splitfed.metrics import (
    AGGREGATION_SECONDS,
    AGGREGATOR_JOINED,
    AGGREGATOR_PARTICIPANTS,
    AGGREGATOR_ROUND,
    AGGREGATOR_ROUNDS,
    AGGREGATOR_UPDATES,
    AGGREGATOR_VERSION,
)
from splitfed.services.aggregator.files import (
    read_tensors,
    write_tensors,
    write_tensors_streamed,
)
from splitfed.services.aggregator.settings import FederationSettings
from splitfed.services.aggregator.strategies import FedExP, make_strategy

logger = logging.getLogger(__name__)

WAITING, KEYS, UPLOAD, REVEAL, FINISHED = "waiting", "keys", "upload", "reveal", "finished"
# Elements folded per read from a spool file.
FOLD_ELEMENTS = 1 << 20


@dataclass
class RoundState:
    """What ``state.json`` holds."""

    round: int = 1
    attempt: int = 1
    phase: str = WAITING
    version: int = 0
    joined: list[str] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)
    deadline: float = 0.0
    message: str = ""
    # Secure aggregation: identity -> public key (hex), the dropped peers, who revealed.
    keys: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    revealed: dict[str, dict[str, str]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    # Server-side adapters: every (backbone, session) seen, identity -> [address, id].
    server_sessions: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class SpooledTensor:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Spool:
    """An upload received to disk: its tensors' bytes back to back, and where each is."""

    path: Path
    tensors: list[SpooledTensor] = field(default_factory=list)
    bytes: int = 0

    def schema(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {t.name: (t.shape, t.dtype.str) for t in self.tensors}

    def chunks(self) -> Iterator[tuple[str, int, np.ndarray[Any, Any]]]:
        """(tensor name, first element, values) in slices of at most FOLD_ELEMENTS."""
        with open(self.path, "rb") as handle:
            for tensor in self.tensors:
                for start in range(0, tensor.numel, FOLD_ELEMENTS):
                    count = min(FOLD_ELEMENTS, tensor.numel - start)
                    handle.seek(tensor.offset + start * tensor.dtype.itemsize)
                    values = np.fromfile(handle, dtype=tensor.dtype, count=count)
                    yield tensor.name, start, values


class SpoolWriter:
    """Writes an upload's tensors into its spool file as their chunks arrive (a
    :class:`~splitfed.wire.TensorSink`): the aggregator never holds an uploaded tensor,
    only the chunk being written. Checks each tensor's name, dtype and the update's size
    before a byte of it is written."""

    def __init__(self, spool: Spool, out: BinaryIO, expected: torch.dtype, max_bytes: int):
        self.spool = spool
        self.out = out
        self.expected = expected
        self.max_bytes = max_bytes

    def begin(self, name: str, dtype: torch.dtype, shape: Sequence[int]) -> None:
        secure = self.expected == torch.int64
        if dtype != self.expected:
            raise InvalidArgumentError(
                f"tensor {name!r}: expected {self.expected} deltas"
                + (" (masked fixed point)" if secure else "")
                + f", got {dtype}"
            )
        if not name or len(name) > 256 or any(t.name == name for t in self.spool.tensors):
            raise InvalidArgumentError(f"tensor name {name!r} is empty, too long or repeated")
        stored = np.dtype(np.uint64) if secure else np.dtype(np.float32)
        size = math.prod(shape) * stored.itemsize
        if self.spool.bytes + size > self.max_bytes:
            raise LimitExceededError(f"the update exceeds max_adapter_bytes ({self.max_bytes})")
        self.spool.bytes += size
        self.spool.tensors.append(SpooledTensor(name, tuple(shape), stored, self.out.tell()))

    def write(self, data: memoryview) -> None:
        try:
            self.out.write(data)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise LimitExceededError("the aggregator's disk is full; retry later") from None
            raise

    def close(self) -> None:
        self.out.close()

    def __enter__(self) -> SpoolWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PlainSum:
    """Running sum of weight * delta per tensor (float32), O(one adapter)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.sums = {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}

    def fold(self, name: str, start: int, values: np.ndarray[Any, Any], weight: float) -> None:
        """Add ``weight * values``; scales ``values`` (a chunk read for this) in place."""
        values = values.astype(np.float32, copy=False)
        values *= np.float32(weight)
        flat = self.sums[name].reshape(-1)
        flat[start : start + values.size] += values

    def state(self) -> dict[str, np.ndarray[Any, Any]]:
        return self.sums

    def load(self, tensors: Mapping[str, np.ndarray[Any, Any]]) -> None:
        for name, array in tensors.items():
            self.sums[name][...] = array

    def squared_norm(self) -> float:
        """The sum's squared L2 norm over all tensors."""
        return sum(float(np.dot(a.reshape(-1), a.reshape(-1))) for a in self.sums.values())

    def averaged(self, total_weight: float) -> Iterator[tuple[str, torch.Tensor]]:
        """The average, one tensor at a time by name, computed in place: each tensor of
        the sum is gone once its average has been taken (the close reads it once)."""
        for name in sorted(self.sums):
            array = self.sums.pop(name)
            array /= np.float32(total_weight)
            yield name, torch.from_numpy(array)


class ServerAdapters(Protocol):
    """Averages the body adapters that the backbones hold for a federation's sessions."""

    def aggregate(
        self,
        contributors: Mapping[str, tuple[tuple[str, str], int]],
        sessions: list[tuple[str, ...]],
    ) -> dict[str, torch.Tensor]:
        """Pull the contributors' session adapters, average them weighted by samples, push
        the average into every session of ``sessions``; returns the average."""
        ...


class Federation:
    def __init__(self, settings: FederationSettings, directory: Path) -> None:
        self.settings = settings
        self.directory = directory
        self.strategy = make_strategy(settings.strategy, settings.strategy_options)
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "versions").mkdir(exist_ok=True)
        self.spool_dir = directory / "spool"
        self.spool_dir.mkdir(exist_ok=True)
        for stale in self.spool_dir.iterdir():  # unconfirmed uploads: their clients retry
            stale.unlink()
        self.state = self._load_state()
        self._export_state()
        self.contributors: dict[str, int] = {}
        # identity -> (backbone address, session id) of this round's contributors
        self.sessions: dict[str, tuple[str, str]] = {}
        self.server_adapters: ServerAdapters | None = None
        self.schema: dict[str, tuple[tuple[int, ...], str]] = {}
        self.accumulator: Any = None
        # Sum over this round's updates of samples x the update's squared L2 norm (plain
        # aggregation only): what FedExP's server step size is computed from.
        self.update_sq = 0.0
        self._load_sum()
        if self.state.phase == REVEAL or (
            self.state.phase == UPLOAD and set(self.contributors) >= set(self._peers())
        ):
            self._maybe_close(time.time())

    # --- persistence ------------------------------------------------------------------

    def _load_state(self) -> RoundState:
        path = self.directory / "state.json"
        if not path.is_file():
            return RoundState()
        return RoundState(**json.loads(path.read_text()))

    def _save_state(self) -> None:
        path = self.directory / "state.json"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".state.")
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(self.state), out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        self._export_state()
        self.changed.notify_all()

    def _log_context(self) -> contextlib.AbstractContextManager[None]:
        return log_context(federation=self.settings.name, round=self.state.round)

    def _export_state(self) -> None:
        name, s = self.settings.name, self.state
        AGGREGATOR_ROUND.labels(name).set(s.round)
        AGGREGATOR_VERSION.labels(name).set(s.version)
        AGGREGATOR_JOINED.labels(name).set(len(s.joined))

    def _sum_path(self) -> Path:
        return self.directory / "sum.safetensors"

    def _reset_sum(self) -> None:
        """Forget this round's updates in memory (they stay in the sum file, if any)."""
        self.contributors, self.schema, self.accumulator = {}, {}, None
        self.sessions = {}
        self.update_sq = 0.0

    def _load_sum(self) -> None:
        path = self._sum_path()
        if not path.is_file():
            return
        tensors, meta = read_tensors(path)
        if (int(meta["round"]), int(meta["attempt"])) != (self.state.round, self.state.attempt):
            path.unlink()
            return
        self.contributors = {k: int(v) for k, v in json.loads(meta["contributors"]).items()}
        self.sessions = {k: (v[0], v[1]) for k, v in json.loads(meta.get("sessions", "{}")).items()}
        self.schema = {k: (tuple(v[0]), v[1]) for k, v in json.loads(meta["schema"]).items()}
        self.update_sq = float(meta.get("update_sq", "0"))
        self.accumulator = self._new_accumulator()
        self.accumulator.load(tensors)
        logger.info(
            "[Aggregator] %s round %d: resumed with %d update(s)",
            self.settings.name,
            self.state.round,
            len(self.contributors),
        )

    def _new_accumulator(self) -> Any:
        shapes = {name: shape for name, (shape, _) in self.schema.items()}
        if self.settings.secure_aggregation:
            from splitfed.security.secagg import MaskedSum, SecAggParams

            params = SecAggParams(
                self.settings.name, self.state.round, scale=self.settings.secagg_scale
            )
            return MaskedSum(params, shapes)
        return PlainSum(shapes)

    def _save_sum(self) -> None:
        write_tensors(
            self._sum_path(),
            self.accumulator.state(),
            {
                "round": str(self.state.round),
                "attempt": str(self.state.attempt),
                "contributors": json.dumps(self.contributors),
                "sessions": json.dumps({k: list(v) for k, v in self.sessions.items()}),
                "schema": json.dumps({k: [list(s), d] for k, (s, d) in self.schema.items()}),
                "update_sq": repr(self.update_sq),
            },
        )

    def _version_path(self, version: int) -> Path:
        return self.directory / "versions" / f"v{version}.safetensors"

    def _strategy_path(self, version: int) -> Path:
        return self.directory / "versions" / f"v{version}.strategy.safetensors"

    def offset(self, version: int) -> dict[str, torch.Tensor]:
        """The global offset at ``version`` (empty for version 0)."""
        if version == 0:
            return {}
        path = self._version_path(version)
        if not path.is_file():
            raise NotFoundError(f"federation {self.settings.name!r} has no version {version}")
        tensors, _ = read_tensors(path)
        return {name: torch.from_numpy(array) for name, array in tensors.items()}

    def _strategy_state(self, version: int) -> dict[str, torch.Tensor]:
        path = self._strategy_path(version)
        if version == 0 or not path.is_file():
            return {}
        tensors, _ = read_tensors(path)
        return {name: torch.from_numpy(array) for name, array in tensors.items()}

    # --- plans ------------------------------------------------------------------------

    def _peers(self) -> list[str]:
        """Who this round attempt waits for: selected clients (with secure aggregation,
        those that advertised a key)."""
        if self.settings.secure_aggregation and self.state.phase in (UPLOAD, REVEAL):
            return sorted(self.state.keys)
        return list(self.state.selected)

    def plan(self, identity: str) -> dict[str, Any]:
        with self.lock:
            s = self.state
            peers = self._peers()
            return {
                "federation": self.settings.name,
                "round": s.round,
                "attempt": s.attempt,
                "phase": s.phase,
                "global_version": s.version,
                "selected": identity in peers or (s.phase == KEYS and identity in s.selected),
                "uploaded": identity in self.contributors,
                "local_steps": self.settings.local_steps,
                "deadline": s.deadline,
                "adapter_seed": self.settings.adapter_seed,
                "secure_aggregation": self.settings.secure_aggregation,
                "peers": (
                    {name: bytes.fromhex(s.keys[name]) for name in peers}
                    if self.settings.secure_aggregation and s.phase in (UPLOAD, REVEAL)
                    else {}
                ),
                "secagg_scale": self.settings.secagg_scale,
                "dropped": list(s.dropped) if s.phase == REVEAL else [],
                "rounds": self.settings.rounds,
                "message": s.message,
                "received": len(self.contributors),
                "participants": len(peers),
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

    # --- joining and selection ----------------------------------------------------------

    def join(self, identity: str) -> None:
        with self.lock, self._log_context():
            if identity not in self.state.joined:
                self.state.joined.append(identity)
                logger.info("[Aggregator.Join] %s joined %s", identity, self.settings.name)
                self._save_state()
            if self.state.phase == WAITING:
                self._open(time.time())

    def require_member(self, identity: str) -> None:
        if identity not in self.state.joined:
            raise PermissionDeniedError(
                f"{identity} has not joined federation {self.settings.name!r}"
            )

    def _open(self, now: float, message: str = "") -> None:
        s = self.state
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
        rng = random.Random(f"{self.settings.name}/{s.round}/{s.attempt}")
        s.selected = sorted(rng.sample(sorted(s.joined), min(count, len(s.joined))))
        s.phase = KEYS if self.settings.secure_aggregation else UPLOAD
        s.deadline = now + self.settings.deadline_s
        s.keys, s.dropped, s.revealed, s.message = {}, [], {}, message
        self._reset_sum()
        self._save_state()
        # After state.json names the new attempt: a sum of an older one is never counted.
        with contextlib.suppress(FileNotFoundError):
            self._sum_path().unlink()
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

    def start_upload(self, identity: str, round_: int, attempt: int, base: int) -> bool:
        """Check an upload may start; False if it is a duplicate (already counted)."""
        with self.lock:
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
            return identity not in self.contributors

    def new_spool(self) -> tuple[Spool, SpoolWriter]:
        """A spool file for one upload and the sink that receives the upload into it."""
        fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix="upload-")
        spool = Spool(Path(name))
        expected = torch.int64 if self.settings.secure_aggregation else torch.float32
        return spool, SpoolWriter(
            spool, os.fdopen(fd, "wb"), expected, self.settings.max_adapter_bytes
        )

    def spool_tensor(self, spool: Spool, out: SpoolWriter, name: str, tensor: torch.Tensor) -> None:
        """Spool a whole tensor (what the sink receives chunk by chunk in the service)."""
        out.begin(name, tensor.dtype, tuple(tensor.shape))
        out.write(np.ascontiguousarray(tensor.numpy()).data.cast("B"))

    def commit_upload(
        self,
        identity: str,
        round_: int,
        attempt: int,
        base: int,
        samples: int,
        spool: Spool,
        session: tuple[str, str] | None = None,
    ) -> tuple[bool, int]:
        """Fold a complete upload into the running sum and persist it; (duplicate, count)."""
        if samples < 1:
            raise InvalidArgumentError("num_samples must be >= 1")
        with self.lock, self._log_context():
            if not self.start_upload(identity, round_, attempt, base):
                return True, len(self.contributors)
            schema = spool.schema()
            if not schema:
                raise InvalidArgumentError("the update holds no tensors")
            if not self.schema:
                self.schema = schema
                self.accumulator = self._new_accumulator()
            elif schema != self.schema:
                raise InvalidArgumentError(
                    "the update's tensors (names, shapes, dtypes) differ from the other "
                    "updates of this round"
                )
            weight = 1.0 if self.settings.secure_aggregation else float(samples)
            try:
                squares = 0.0
                for name, start, values in spool.chunks():
                    if self.settings.secure_aggregation:
                        self.accumulator.add_chunk(name, start, values)
                    else:
                        squares += float(np.dot(values, values))  # before fold scales it
                        self.accumulator.fold(name, start, values, weight)
                self.update_sq += weight * squares
                self.contributors[identity] = samples
                if session is not None:
                    self.sessions[identity] = session
                self._save_sum()
                AGGREGATOR_UPDATES.labels(self.settings.name).inc()
            except BaseException:
                # Back to what is on disk: the sum without this update.
                self._reset_sum()
                self._load_sum()
                raise
            logger.info(
                "[Aggregator.UploadUpdate] %s round %d: update %d/%d from %s (%d samples)",
                self.settings.name,
                round_,
                len(self.contributors),
                len(self._peers()),
                identity,
                samples,
            )
            count = len(self.contributors)
            self.changed.notify_all()
            self._maybe_close(time.time())
            return False, count

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
        except BaseException:
            # The close consumes the in-memory sum: back to what is on disk (the sum of
            # this round's updates), so that the next attempt to close starts over.
            self._reset_sum()
            self._load_sum()
            raise
        AGGREGATOR_ROUNDS.labels(self.settings.name, "closed").inc()

    def _close_round(self, now: float) -> None:
        s = self.state
        total = sum(self.contributors.values())
        state = self._strategy_state(s.version)
        scale = None
        if self.settings.secure_aggregation:
            for survivor, seeds in s.revealed.items():
                for dropped, seed in seeds.items():
                    self.accumulator.remove_masks(survivor, dropped, bytes.fromhex(seed))
            averages = self.accumulator.decoded(float(total))
        else:
            if isinstance(self.strategy, FedExP):
                scale = self.strategy.scale(
                    self.update_sq / total, self.accumulator.squared_norm() / total**2
                )
                state["scale"] = torch.tensor([scale], dtype=torch.float64)
            averages = self.accumulator.averaged(float(total))
        previous = self.offset(s.version)
        version = s.version + 1

        def offsets() -> Iterator[tuple[str, np.ndarray[Any, Any]]]:
            # Tensor by tensor (strategies work per tensor name), written as it is made:
            # the close holds the sum and a tensor or two, never a whole second adapter
            # (docs/benchmarks.md "Aggregator memory").
            for name, average in averages:
                step = self.strategy.step(previous, {name: average}, state)
                del average
                yield name, step[name].contiguous().numpy()

        write_tensors_streamed(
            self._version_path(version),
            {name: (shape, np.dtype(np.float32)) for name, (shape, _) in self.schema.items()},
            offsets(),
            {"round": str(s.round), "contributors": json.dumps(self.contributors)},
        )
        write_tensors(
            self._strategy_path(version),
            {n: t.contiguous().numpy() for n, t in state.items()},
            {"strategy": self.strategy.name},
        )
        if self.server_adapters is not None:
            known = {k: tuple(v) for k, v in s.server_sessions.items()}
            known.update(self.sessions)
            s.server_sessions = {k: list(v) for k, v in known.items()}
            body = self.server_adapters.aggregate(
                {
                    k: (self.sessions[k], n)
                    for k, n in self.contributors.items()
                    if k in self.sessions
                },
                list(known.values()),
            )
            if body:
                write_tensors(
                    self.directory / "versions" / f"v{version}.body.safetensors",
                    {n: t.contiguous().numpy() for n, t in body.items()},
                    {"round": str(s.round)},
                )
        s.history.append(
            {
                "round": s.round,
                "attempt": s.attempt,
                "version": version,
                "contributors": dict(self.contributors),
                "samples": total,
                "closed_at": now,
                **({"step_scale": scale} if scale is not None else {}),
            }
        )
        logger.info(
            "[Aggregator] %s round %d closed: version %d from %d update(s), %d samples%s",
            self.settings.name,
            s.round,
            version,
            len(self.contributors),
            total,
            "" if scale is None else f", server step x{scale:.3f}",
        )
        AGGREGATOR_PARTICIPANTS.labels(self.settings.name).set(len(self.contributors))
        s.version, s.round, s.attempt = version, s.round + 1, 1
        self._open(now)
        with contextlib.suppress(FileNotFoundError):
            self._sum_path().unlink()  # counted in the version; state.json has moved on


def federations(configs: Iterable[FederationSettings], state_dir: Path) -> dict[str, Federation]:
    return {f.name: Federation(f, state_dir / f.name) for f in configs}
