"""bench/federated.py end to end at its smallest: a federation of 4 client processes and
a centralized run against one backbone, both evaluated the same way. The figures
themselves are the benchmark's (docs/benchmarks.md); this checks that it runs, that both
runs learn, that the body stays frozen and that what it prints is what it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_federated_bench_trains_both_runs_and_reports_the_ratio(tmp_path: Path) -> None:
    out, plot = tmp_path / "figures.json", tmp_path / "curves.png"
    args = ["--rounds", "2", "--local-steps", "2", "--pretrain-steps", "0", "--evals", "2"]
    args += ["--eval-size", "32", "--sizes", "16,16,16,16", "--json", str(out)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "federated.py"), *args, "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    ratio = figures["ratios"]["federated/centralized eval loss"]
    assert f"\nratio federated/centralized eval loss: {ratio:.4f}\n" in result.stdout
    central, fed = figures["centralized"]["points"], figures["federated"]["points"]
    assert [step for step, _ in central] == [step for step, _ in fed] == [0, 8, 16]
    # The same initial adapter, through the same evaluator.
    assert central[0][1] == pytest.approx(fed[0][1], abs=1e-6)
    assert central[-1][1] < central[0][1] and fed[-1][1] < fed[0][1]
    assert ratio == pytest.approx(fed[-1][1] / central[-1][1])
    assert max(c["body_drift"] for c in figures["federated"]["clients"]) < 1e-6
    assert len(figures["federated"]["clients"]) == 4
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
