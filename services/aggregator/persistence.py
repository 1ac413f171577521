"""What one federation keeps on disk, in its directory, and how it is written.

* ``state.json``: the round (:class:`RoundState`), written atomically (temporary file,
  fsync, rename).
* ``sum.safetensors``: the running sum of this round attempt's counted updates, with
  what says which updates it holds (:class:`SumRecord`) in its metadata, so that an
  update is either in the sum and in its contributors or in neither.
* ``kept/``: the updates a robust strategy keeps whole until the close.
* ``versions/v<n>.safetensors`` (the global offset), ``v<n>.strategy.safetensors`` (the
  strategy's state for it) and ``v<n>.body.safetensors`` (the average body adapter of
  server-side adapters).
* ``spool/``: uploads being received (stale ones are removed at start: their clients
  retry).

No round logic in here: :class:`~splitfed.services.aggregator.federation.Federation`
decides what is written when."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitfed.files import atomic_write
from splitfed.services.aggregator.files import (
    read_tensors,
    tensor_schema,
    write_tensors,
    write_tensors_streamed,
)

WAITING, KEYS, UPLOAD, REVEAL, FINISHED = "waiting", "keys", "upload", "reveal", "finished"


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
    # identity -> the samples it declared when it joined: no update of it may claim more.
    declared: dict[str, int] = field(default_factory=dict)
    # Members by the join token: identity -> digest of the token it joined with (a new
    # token in the config ends their membership until they join with it).
    token_members: dict[str, str] = field(default_factory=dict)
    # Members the attempt's selection drew from (its client sampling rate is
    # len(selected) / candidates; DP-FedAvg's accountant).
    candidates: int = 0


@dataclass
class SumRecord:
    """Which updates the running sum holds: the metadata of ``sum.safetensors``."""

    round: int
    attempt: int
    # identity -> samples of its update; identity -> (backbone, session) of server adapters
    contributors: dict[str, int]
    sessions: dict[str, tuple[str, str]]
    schema_digest: str
    # Sum over the updates of samples x the update's squared L2 norm (plain aggregation).
    update_sq: float
    # The kept updates' listing (robust strategies), else None.
    kept: str | None = None

    def meta(self) -> dict[str, str]:
        meta = {
            "round": str(self.round),
            "attempt": str(self.attempt),
            "contributors": json.dumps(self.contributors),
            "sessions": json.dumps({k: list(v) for k, v in self.sessions.items()}),
            "schema_digest": self.schema_digest,
            "update_sq": repr(self.update_sq),
        }
        if self.kept is not None:
            meta["kept"] = self.kept
        return meta

    @classmethod
    def from_meta(cls, meta: Mapping[str, str]) -> SumRecord:
        return cls(
            round=int(meta["round"]),
            attempt=int(meta["attempt"]),
            contributors={k: int(v) for k, v in json.loads(meta["contributors"]).items()},
            sessions={k: (v[0], v[1]) for k, v in json.loads(meta.get("sessions", "{}")).items()},
            schema_digest=meta.get("schema_digest", ""),
            update_sq=float(meta.get("update_sq", "0")),
            kept=meta.get("kept", "{}"),
        )


def _read(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = read_tensors(path)
    return {name: torch.from_numpy(array) for name, array in tensors.items()}


class FederationFiles:
    """The files of the federation in ``directory`` (created if missing)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "versions").mkdir(exist_ok=True)
        self.spool_dir = directory / "spool"
        self.spool_dir.mkdir(exist_ok=True)
        for stale in self.spool_dir.iterdir():  # unconfirmed uploads: their clients retry
            stale.unlink()
        self.sum_path = directory / "sum.safetensors"
        self.kept_dir = directory / "kept"

    # --- state.json -------------------------------------------------------------------

    def load_state(self) -> RoundState:
        path = self.directory / "state.json"
        if not path.is_file():
            return RoundState()
        data = json.loads(path.read_text())
        known = {f.name for f in fields(RoundState)}
        return RoundState(**{k: v for k, v in data.items() if k in known})

    def save_state(self, state: RoundState) -> None:
        with atomic_write(self.directory / "state.json") as out:
            out.write(json.dumps(asdict(state)).encode())

    # --- the running sum --------------------------------------------------------------

    def load_sum(self) -> tuple[SumRecord, dict[str, np.ndarray[Any, Any]]] | None:
        """The stored running sum and its record; None if there is none."""
        if not self.sum_path.is_file():
            return None
        tensors, meta = read_tensors(self.sum_path)
        return SumRecord.from_meta(meta), tensors

    def save_sum(self, record: SumRecord, tensors: Mapping[str, np.ndarray[Any, Any]]) -> None:
        write_tensors(self.sum_path, tensors, record.meta())

    def remove_sum(self) -> None:
        self.sum_path.unlink(missing_ok=True)

    def remove_kept(self) -> None:
        if self.kept_dir.is_dir():
            for path in self.kept_dir.iterdir():
                path.unlink()

    # --- versions ---------------------------------------------------------------------

    def version_path(self, version: int) -> Path:
        return self.directory / "versions" / f"v{version}.safetensors"

    def _strategy_path(self, version: int) -> Path:
        return self.directory / "versions" / f"v{version}.strategy.safetensors"

    def _body_path(self, version: int) -> Path:
        return self.directory / "versions" / f"v{version}.body.safetensors"

    def version_shapes(self, version: int) -> dict[str, tuple[int, ...]] | None:
        """The tensor shapes of ``version``'s global offset; None if it is not stored."""
        path = self.version_path(version)
        if not path.is_file():
            return None
        return {n: shape for n, (shape, _) in tensor_schema(path).items()}

    def offset(self, version: int) -> dict[str, torch.Tensor] | None:
        """The global offset at ``version``; None if it is not stored."""
        path = self.version_path(version)
        return _read(path) if path.is_file() else None

    def body(self, version: int) -> dict[str, torch.Tensor]:
        """The average body adapter made with ``version``; empty if there is none."""
        path = self._body_path(version)
        return _read(path) if version and path.is_file() else {}

    def strategy_state(self, version: int) -> dict[str, torch.Tensor]:
        """The strategy's state after ``version``; empty if there is none."""
        path = self._strategy_path(version)
        return _read(path) if version and path.is_file() else {}

    def write_version(
        self,
        version: int,
        shapes: Mapping[str, tuple[int, ...]],
        offsets: Iterable[tuple[str, np.ndarray[Any, Any]]],
        meta: Mapping[str, str],
    ) -> None:
        """Write the global offset of ``version``, tensor by tensor as ``offsets`` makes
        them (float32, in the order of ``shapes``)."""
        write_tensors_streamed(
            self.version_path(version),
            {name: (shape, np.dtype(np.float32)) for name, shape in shapes.items()},
            offsets,
            dict(meta),
        )

    def write_strategy_state(
        self, version: int, state: Mapping[str, torch.Tensor], strategy: str
    ) -> None:
        write_tensors(
            self._strategy_path(version),
            {n: t.contiguous().numpy() for n, t in state.items()},
            {"strategy": strategy},
        )

    def write_body(self, version: int, body: Mapping[str, torch.Tensor], round_: int) -> None:
        write_tensors(
            self._body_path(version),
            {n: t.contiguous().numpy() for n, t in body.items()},
            {"round": str(round_)},
        )

    # --- the spool --------------------------------------------------------------------

    def new_spool(self) -> tuple[int, Path]:
        """A new spool file for an upload: (open descriptor, path)."""
        fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix="upload-")
        return fd, Path(name)
