"""Where session state lives between steps and across restarts.

A :class:`SessionStore` keeps, per session, a small JSON-able record and two tensor
dicts (the body adapter, the optimizer's tensors). :class:`MemoryStore` forgets on
exit; :class:`DirectoryStore` writes safetensors + JSON so that a restarted backbone
resumes every session where it stopped. Both pass the same tests.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from splitfed.errors import NotFoundError


@dataclass
class SessionRecord:
    session_id: str
    owner: str
    k: int
    m: int
    adapter: dict[str, Any]
    optimizer: dict[str, Any]
    encoding: str
    step: int = 0
    # The reply to the last applied step, for a client that retries it.
    last_result: dict[str, Any] | None = None
    # Non-tensor optimizer and scheduler state.
    optimizer_meta: dict[str, Any] = field(default_factory=dict)
    encrypted: bool = False
    federation: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SessionRecord:
        return cls(**json.loads(text))


@dataclass
class Snapshot:
    record: SessionRecord
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]


class SessionStore(ABC):
    @abstractmethod
    def save(self, snapshot: Snapshot) -> None:
        """Replace the stored state of ``snapshot.record.session_id`` atomically."""

    @abstractmethod
    def load(self, session_id: str) -> Snapshot:
        """The stored state; raises NotFoundError if there is none."""

    @abstractmethod
    def delete(self, session_id: str) -> None:
        """Forget a session (no error if it is unknown)."""

    @abstractmethod
    def records(self) -> list[SessionRecord]:
        """Every stored session's record."""


def _cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


class MemoryStore(SessionStore):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[str, Snapshot] = {}

    def save(self, snapshot: Snapshot) -> None:
        copy = Snapshot(
            SessionRecord.from_json(snapshot.record.to_json()),
            _cpu(snapshot.adapter),
            _cpu(snapshot.optimizer),
        )
        with self._lock:
            self._snapshots[snapshot.record.session_id] = copy

    def load(self, session_id: str) -> Snapshot:
        with self._lock:
            snapshot = self._snapshots.get(session_id)
        if snapshot is None:
            raise NotFoundError(f"no stored state for session {session_id!r}")
        return Snapshot(
            SessionRecord.from_json(snapshot.record.to_json()),
            _cpu(snapshot.adapter),
            _cpu(snapshot.optimizer),
        )

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._snapshots.pop(session_id, None)

    def records(self) -> list[SessionRecord]:
        with self._lock:
            return [SessionRecord.from_json(s.record.to_json()) for s in self._snapshots.values()]


class DirectoryStore(SessionStore):
    """``<root>/<session>/session.json`` names the directory holding the latest complete
    snapshot (``step-<n>/adapter.safetensors``, ``optimizer.safetensors``); it is
    replaced atomically after that directory is fully written, so a crash at any point
    leaves the previous snapshot intact."""

    RECORD = "session.json"

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _dir(self, session_id: str) -> Path:
        if not session_id or "/" in session_id or session_id.startswith("."):
            raise NotFoundError(f"invalid session id {session_id!r}")
        return self.root / session_id

    def save(self, snapshot: Snapshot) -> None:
        record = snapshot.record
        directory = self._dir(record.session_id)
        with self._lock:
            directory.mkdir(parents=True, exist_ok=True)
            data = directory / f"step-{record.step}"
            tmp = directory / f".tmp-step-{record.step}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file(_cpu(snapshot.adapter), str(tmp / "adapter.safetensors"))
            save_file(_cpu(snapshot.optimizer), str(tmp / "optimizer.safetensors"))
            _fsync_dir(tmp)
            shutil.rmtree(data, ignore_errors=True)
            os.replace(tmp, data)
            body = json.dumps({"data": data.name, "record": json.loads(record.to_json())})
            pointer = directory / (self.RECORD + ".tmp")
            with pointer.open("w") as out:
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
            os.replace(pointer, directory / self.RECORD)
            for old in directory.glob("step-*"):
                if old.name != data.name:
                    shutil.rmtree(old, ignore_errors=True)

    def _read(self, directory: Path) -> tuple[SessionRecord, Path]:
        try:
            meta = json.loads((directory / self.RECORD).read_text())
        except FileNotFoundError:
            raise NotFoundError(f"no stored state for session {directory.name!r}") from None
        return SessionRecord(**meta["record"]), directory / meta["data"]

    def load(self, session_id: str) -> Snapshot:
        record, data = self._read(self._dir(session_id))
        return Snapshot(
            record,
            load_file(str(data / "adapter.safetensors")),
            load_file(str(data / "optimizer.safetensors")),
        )

    def delete(self, session_id: str) -> None:
        with self._lock:
            shutil.rmtree(self._dir(session_id), ignore_errors=True)

    def records(self) -> list[SessionRecord]:
        found = []
        for directory in sorted(self.root.iterdir()):
            if directory.is_dir() and (directory / self.RECORD).is_file():
                found.append(self._read(directory)[0])
        return found


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir():
        with child.open("rb") as handle:
            os.fsync(handle.fileno())
