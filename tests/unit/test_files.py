"""atomic_write: the file is replaced whole, with the asked mode, or left as it was."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from splitfed.files import atomic_write


@pytest.mark.parametrize(("private", "mode"), [(True, 0o600), (False, 0o644)])
def test_atomic_write_replaces_the_file_with_its_mode(
    tmp_path: Path, private: bool, mode: int
) -> None:
    path = tmp_path / "sub" / "data.bin"
    with atomic_write(path, private=private) as out:
        out.write(b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.bin"]


def test_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")

    def half_write() -> None:
        with atomic_write(path) as out:
            out.write(b"half")
            raise ValueError("half written")

    with pytest.raises(ValueError, match="half"):
        half_write()
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]
