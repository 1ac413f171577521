"""The aggregator's files: state.json and the running sum's record come back as written."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from splitfed.services.aggregator.persistence import (
    UPLOAD,
    FederationFiles,
    RoundState,
    SumRecord,
)


def test_state_json_round_trips_and_stale_spool_files_are_removed(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "upload-stale").write_bytes(b"x")
    files = FederationFiles(tmp_path)
    assert list(files.spool_dir.iterdir()) == []
    assert files.load_state() == RoundState()
    state = RoundState(round=3, attempt=2, phase=UPLOAD, joined=["a", "b"], declared={"a": 5})
    files.save_state(state)
    assert FederationFiles(tmp_path).load_state() == state


def test_the_running_sum_keeps_its_record(tmp_path: Path) -> None:
    files = FederationFiles(tmp_path)
    assert files.load_sum() is None
    record = SumRecord(
        round=2,
        attempt=1,
        contributors={"a": 3},
        sessions={"a": ("backbone:1", "s1")},
        schema_digest="d",
        update_sq=0.25,
    )
    files.save_sum(record, {"t": np.arange(4, dtype=np.float32)})
    stored = files.load_sum()
    assert stored is not None
    back, tensors = stored
    assert (back.round, back.attempt, back.contributors, back.sessions) == (
        2,
        1,
        {"a": 3},
        {"a": ("backbone:1", "s1")},
    )
    assert (back.schema_digest, back.update_sq) == ("d", 0.25)
    np.testing.assert_array_equal(tensors["t"], np.arange(4, dtype=np.float32))
    files.remove_sum()
    assert files.load_sum() is None
