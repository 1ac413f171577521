"""bench/federated.py end to end at its smallest: a federation of 4 client processes and
a centralized run against one backbone, both evaluated the same way, for two data orders
and averaged. The figures themselves are the benchmark's (docs/benchmarks.md); this
checks that it runs, that both runs learn, that the body stays frozen and that what it
prints is what it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_bench


@pytest.mark.slow
@pytest.mark.long
def test_federated_bench_trains_both_runs_and_reports_the_ratio(tmp_path: Path) -> None:
    out, plot = tmp_path / "figures.json", tmp_path / "curves.png"
    args = ["--rounds", "2", "--local-steps", "2", "--pretrain-steps", "0", "--evals", "2"]
    args += ["--eval-size", "32", "--sizes", "16,16,16,16", "--orders", "2", "--json", str(out)]
    result = run_bench("federated.py", *args, "--plot", str(plot))
    figures = json.loads(out.read_text())
    ratio = figures["ratios"]["federated/centralized eval loss"]
    assert f"\nratio federated/centralized eval loss: {ratio:.4f}\n" in result.stdout
    runs = figures["runs"]
    assert [run["order"] for run in runs] == [0, 1]
    for run in runs:
        central, fed = run["centralized"]["points"], run["federated"]["points"]
        assert [step for step, _ in central] == [step for step, _ in fed] == [0, 8, 16]
        # The same initial adapter, through the same evaluator.
        assert central[0][1] == pytest.approx(fed[0][1], abs=1e-6)
        assert central[-1][1] < central[0][1] and fed[-1][1] < fed[0][1]
        assert max(c["body_drift"] for c in run["federated"]["clients"]) < 1e-6
        assert len(run["federated"]["clients"]) == 4
    # Another data order is another run: the centralized trainer shuffles with another seed.
    assert runs[0]["centralized"]["train_losses"] != runs[1]["centralized"]["train_losses"]
    # The headline is the mean final federated loss over the mean final centralized one.
    for key in ("centralized", "federated"):
        finals = [run[key]["points"][-1][1] for run in runs]
        assert figures[key]["finals"] == finals
        assert figures[key]["points"][-1][1] == pytest.approx(sum(finals) / 2)
    assert ratio == pytest.approx(
        figures["federated"]["final_mean"] / figures["centralized"]["final_mean"]
    )
    assert figures["ratios"]["by order"] == pytest.approx(
        [r["federated"]["points"][-1][1] / r["centralized"]["points"][-1][1] for r in runs]
    )
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.long
def test_the_simulation_runs_both_modes(tmp_path: Path) -> None:
    out = tmp_path / "sim.jsonl"
    common = ["--rounds", "2", "--local-steps", "2", "--pretrain-steps", "0", "--evals", "2"]
    common += ["--workdir", str(tmp_path / "work"), "--json", str(out)]
    for mode in (["--mode", "central", "--lr", "5e-3"], ["--mode", "fed", "--strategy", "fedexp"]):
        result = run_bench("federated_sim.py", *mode, *common)
    central, fed = (json.loads(line) for line in out.read_text().splitlines())
    for record in (central, fed):
        assert [step for step, _ in record["curve"]] == [0, 8, 16]
        assert record["final"] < record["curve"][0][1]
    # The same initial adapter and eval set in both modes.
    assert central["curve"][0][1] == pytest.approx(fed["curve"][0][1])
    assert "step scale" in result.stdout  # fedexp's eta, each eval
