"""What the aggregator holds of a round's updates: each upload's spool file while it
arrives, and what is counted so far, as a running sum (:class:`PlainSum`, and
``security.secagg.MaskedSum`` with secure aggregation) or, for robust strategies, each
update kept whole on disk until the round closes (:class:`KeptUpdates`).

An :class:`Upload` is one update in flight: it is registered with its federation from its
first message, and ends counted (``committed``) or ``discarded``, never in between; a
discarded upload's bytes are destroyed (:meth:`SpoolWriter.destroy`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from splitfed.errors import AbortedError, InvalidArgumentError, LimitExceededError
from splitfed.models.schema import Schema

# Elements folded per read from a spool file.
FOLD_ELEMENTS = 1 << 20


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
    only the chunk being written. Checks each tensor's name and shape against the
    federation's schema, its dtype and the update's size before a byte of it is written.
    :meth:`destroy` (another thread, e.g. a deadline) empties and removes the file; every
    later write is refused."""

    def __init__(
        self,
        spool: Spool,
        out: BinaryIO,
        expected: torch.dtype,
        max_bytes: int,
        schema: Schema | None = None,
    ):
        self.spool = spool
        self.out = out
        self.expected = expected
        self.max_bytes = max_bytes
        self.schema = schema
        self.lock = threading.Lock()
        self.destroyed = False

    def begin(self, name: str, dtype: torch.dtype, shape: Sequence[int]) -> None:
        secure = self.expected == torch.int64
        if dtype != self.expected:
            raise InvalidArgumentError(
                f"tensor {name!r}: expected {self.expected} deltas"
                + (" (masked fixed point)" if secure else "")
                + f", got {dtype}"
            )
        if self.schema is not None:
            expected = self.schema.get(name)
            if expected is None:
                raise InvalidArgumentError(
                    f"tensor {name[:80]!r} is not in the federation's schema (its adapter has "
                    f"{len(self.schema)} tensors such as {next(iter(self.schema))!r}); check "
                    "the client's [adapter] and split settings against the federation's"
                )
            if tuple(shape) != expected:
                raise InvalidArgumentError(
                    f"tensor {name!r}: shape {list(shape)}, the federation's schema says "
                    f"{list(expected)}"
                )
        if not name or len(name) > 256 or any(t.name == name for t in self.spool.tensors):
            raise InvalidArgumentError(f"tensor name {name[:80]!r} is empty, too long or repeated")
        stored = np.dtype(np.uint64) if secure else np.dtype(np.float32)
        size = math.prod(shape) * stored.itemsize
        if self.spool.bytes + size > self.max_bytes:
            raise LimitExceededError(f"the update exceeds max_adapter_bytes ({self.max_bytes})")
        with self.lock:
            self._check_alive()
            offset = self.out.tell()
        self.spool.bytes += size
        self.spool.tensors.append(SpooledTensor(name, tuple(shape), stored, offset))

    def _check_alive(self) -> None:
        if self.destroyed:
            raise AbortedError(
                "the round's upload phase ended (its deadline) while this update was still "
                "arriving: it was discarded; get the current plan"
            )

    def write(self, data: memoryview) -> None:
        with self.lock:
            self._check_alive()
            try:
                self.out.write(data)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise LimitExceededError("the aggregator's disk is full; retry later") from None
                raise

    def close(self) -> None:
        with self.lock:
            self.out.close()

    def destroy(self) -> None:
        """Empty the spool file and remove it (its bytes are gone from the file system,
        not only unlinked); refuse every later write."""
        with self.lock:
            self.destroyed = True
            with contextlib.suppress(OSError, ValueError):
                self.out.flush()  # ValueError: already closed
            with contextlib.suppress(OSError):
                os.truncate(self.spool.path, 0)
            with contextlib.suppress(FileNotFoundError):
                self.spool.path.unlink()

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
        flat = self.sums[name].reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):  # checked when the round closes
            values *= np.float32(weight)
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


RECEIVING, COMPLETE, COMMITTED, DISCARDED = "receiving", "complete", "committed", "discarded"


@dataclass(eq=False)
class Upload:
    """One member's update for one round attempt, from its first message until it is
    counted or discarded. ``state``: receiving -> complete (all bytes spooled) ->
    committed, or -> discarded from either of the first two."""

    identity: str
    round: int
    attempt: int
    base: int
    samples: int
    spool: Spool
    writer: SpoolWriter
    session: tuple[str, str] | None = None
    state: str = RECEIVING
    # (duplicate, updates counted) once committed.
    result: tuple[bool, int] | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Spool a whole tensor (what the service receives chunk by chunk)."""
        self.writer.begin(name, tensor.dtype, tuple(tensor.shape))
        self.writer.write(np.ascontiguousarray(tensor.numpy()).data.cast("B"))

    def finish(self) -> None:
        """Every byte has arrived: close the spool file; the upload may now be counted."""
        with self.writer.lock:
            self.writer._check_alive()
            self.writer.out.close()
            if self.state == RECEIVING:
                self.state = COMPLETE

    def discard(self) -> None:
        """Never count this upload; destroy its bytes."""
        self.writer.destroy()
        self.state = DISCARDED

    def snapshot(self) -> str:
        """The state, read consistently with a concurrent :meth:`finish`."""
        with self.writer.lock:
            return self.state


class KeptUpdates:
    """A round's updates kept whole, one file each (the spool file, moved), for robust
    strategies that combine every update coordinate by coordinate. Each update may be
    scaled by a factor (norm clipping). What is kept is listed in the running-sum file's
    metadata (:meth:`meta`), written atomically after each update: a file that is not
    listed there is not counted and is removed at start-up."""

    def __init__(self, directory: Path, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.directory = directory
        directory.mkdir(exist_ok=True)
        self.shapes = dict(shapes)
        # identity -> (file name, factor, {tensor: byte offset})
        self.kept: dict[str, tuple[str, float, dict[str, int]]] = {}

    def keep(self, identity: str, spool: Spool, factor: float, tag: str) -> None:
        target = self.directory / f"{identity}.{tag}.bin"
        os.replace(spool.path, target)
        spool.path = target
        self.kept[identity] = (target.name, factor, {t.name: t.offset for t in spool.tensors})

    def state(self) -> dict[str, np.ndarray[Any, Any]]:
        return {}  # the updates are their own files

    def meta(self) -> str:
        return json.dumps({k: list(v) for k, v in sorted(self.kept.items())})

    def load(self, meta: str) -> None:
        for identity, (name, factor, offsets) in json.loads(meta).items():
            if not (self.directory / name).is_file():
                raise ValueError(f"kept update {name} of {identity} is missing")
            self.kept[identity] = (name, float(factor), {k: int(v) for k, v in offsets.items()})

    def remove_unlisted(self) -> None:
        listed = {name for name, _, _ in self.kept.values()}
        for path in self.directory.iterdir():
            if path.name not in listed:
                path.unlink()

    def combined(self, strategy: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """The strategy's combination of the kept updates, one tensor at a time by name,
        from memory-mapped slices of the files (memory: one slice per update)."""
        entries = [self.kept[identity] for identity in sorted(self.kept)]
        maps = [_float32_map(self.directory / name) for name, _, _ in entries]
        for name in sorted(self.shapes):
            shape = self.shapes[name]
            numel = math.prod(shape)
            out = np.empty(numel, dtype=np.float32)
            for start in range(0, numel, FOLD_ELEMENTS):
                count = min(FOLD_ELEMENTS, numel - start)
                values = np.stack(
                    [
                        memory[offsets[name] // 4 + start : offsets[name] // 4 + start + count]
                        * np.float32(factor)
                        for memory, (_, factor, offsets) in zip(maps, entries, strict=True)
                    ]
                )
                out[start : start + count] = strategy.combine(values)
            yield name, torch.from_numpy(out.reshape(shape))


def _float32_map(path: Path) -> np.ndarray[Any, Any]:
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.empty(0, dtype=np.float32)
    return np.memmap(path, dtype=np.float32, mode="r")
