"""The bounded sample of `make chaos` (tests/chaos/run.py): one federated run, 3 clients x
3 rounds in real processes, with the backbone killed mid-training and the aggregator
killed with one update of a round counted, both by SIGKILL and restarted on their ports;
checked against the same run without kills (tests/chaos_kit.py says what and why)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from chaos_kit import Kill, Moment, Settings, check_run, run_federation


def test_a_run_with_its_backbone_and_aggregator_killed_equals_the_run_without(
    tmp_path: Path,
) -> None:
    settings = Settings(keymanager=False)
    kills = [
        # Round 1 is steps 1-6 of the 18 (3 clients x 2 local steps): mid-training.
        Kill("backbone", Moment("step", 4)),
        # Round 2's updates are the 4th to 6th of the 9: one counted, two not yet.
        Kill("aggregator", Moment("upload", 4)),
    ]
    with ThreadPoolExecutor(1) as pool:  # the reference beside: its processes overlap
        reference_run = pool.submit(run_federation, tmp_path / "reference", settings, [])
        outcome = run_federation(tmp_path / "chaos", settings, kills)
        reference = reference_run.result()
    assert not check_run(reference).problems
    assert [k.kill for k in outcome.kills] == kills, outcome.missed
    findings = check_run(outcome, reference)
    assert not findings.problems, findings.problems
    assert (findings.lost, findings.doubled) == (0, 0)
    assert not findings.redone  # no kill made a client train a round twice
