"""Files written whole or not at all, and the type of a path the SDK takes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# What a public function of the SDK takes as a path: a str or any os.PathLike (Path, ...),
# turned into a Path at the boundary.
StrPath = str | os.PathLike[str]


@contextlib.contextmanager
def atomic_write(path: StrPath, *, private: bool = True) -> Iterator[BinaryIO]:
    """A binary file to fill that replaces ``path`` when the block ends: written under a
    temporary name in the same directory (mkstemp: exclusive, mode 0600; 0644 unless
    ``private``), fsynced, then renamed into place. If the block raises, the temporary
    file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates a fresh file, exclusively and with mode 0600, in the same directory,
    # so the data never sits in a file others can read and the rename is atomic.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if not private:
            os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
