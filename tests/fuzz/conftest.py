"""The fuzz run's report: cases sent per RPC, the statuses they got, and every failure."""

from __future__ import annotations

import pytest
from fuzz.budget import full_run
from fuzz.harness import LEDGER


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not LEDGER.total:
        return
    terminalreporter.section("fuzzing live services")
    terminalreporter.write_line(LEDGER.summary())
    if full_run():
        terminalreporter.write_line("what the refusals said (one example each):")
        terminalreporter.write_line(LEDGER.refusals())
    shown = LEDGER.failures if full_run() else LEDGER.unknown_failures()
    for failure in shown:
        terminalreporter.write_line("")
        terminalreporter.write_line(failure.describe())
    terminalreporter.write_line(
        f"fuzz total: {LEDGER.total} cases, {len(LEDGER.failures)} failures"
    )
