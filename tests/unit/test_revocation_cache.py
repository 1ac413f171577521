"""A server's revocation list survives its restarts: saved after every fetch, loaded before
serving, its age exported (issue 15, item 10)."""

from __future__ import annotations

import logging
import math
import stat
import time
from pathlib import Path

import pytest

from splitfed.metrics import Live, RevocationListAge
from splitfed.security.authz import RevocationList


def test_the_list_is_saved_privately_and_restored(tmp_path: Path) -> None:
    revocations = RevocationList()
    revocations.update(3, {"a1", "b2"}, fetched_at=1000.0)
    path = tmp_path / "state" / "revocations.json"
    revocations.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["revocations.json"]  # no leftovers
    restored = RevocationList()
    assert restored.restore(path)
    assert restored.version == 3 and restored.fetched_at == 1000.0
    assert restored.is_revoked("a1") and restored.is_revoked("b2")
    assert not restored.is_revoked("c3")


@pytest.mark.parametrize(
    "content", ["", "{", '{"version": 1}', '{"version": "x", "serials": [], "fetched_at": 1}']
)
def test_an_unreadable_cache_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    path = tmp_path / "revocations.json"
    path.write_text(content)
    revocations = RevocationList()
    with caplog.at_level(logging.WARNING):
        assert not revocations.restore(path)
    assert str(path) in caplog.text
    assert revocations.version == 0 and revocations.fetched_at is None
    assert not revocations.restore(tmp_path / "missing.json")


def test_age_gauge_reports_the_oldest_list() -> None:
    lists: Live[RevocationList] = Live()
    gauge = RevocationListAge(lists)
    assert gauge.collect()[0].samples == []  # no key manager configured: no series
    fresh, old = RevocationList(), RevocationList()
    fresh.update(1, set())
    old.update(1, set(), fetched_at=time.time() - 600)
    lists.add(fresh)
    lists.add(old)
    (sample,) = gauge.collect()[0].samples
    assert sample.name == "splitfed_revocation_list_age_seconds" and sample.value >= 600
    never = RevocationList()  # nothing fetched, nothing saved: no revocation enforced
    lists.add(never)
    assert math.isinf(gauge.collect()[0].samples[0].value)
