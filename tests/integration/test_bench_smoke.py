"""bench/transport.py runs and reports in its documented format (figures are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_transport_bench_prints_ratios_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    args = ["--size-mib", "2", "--repeats", "1", "--chunk-kib", "64", "--json", str(out)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "transport.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("ratio ")]
    assert "ratio transport codec/bare @64KiB" in "\n".join(lines)
    assert any(line.startswith("ratio transport codec/bare: ") for line in lines)
    figures = json.loads(out.read_text())
    assert set(figures["ratios"]) == {line[6:].rsplit(":", 1)[0] for line in lines}
    assert all(r["codec_mb_s"] and r["bare_mb_s"] for r in figures["chunks"])


@pytest.mark.slow
def test_split_overhead_bench_prints_ratios_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "split.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "split_overhead.py"),
            *["--rounds", "1", "--new-tokens", "2", "--json", str(out)],
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ratio split/unsplit train step time: " in result.stdout
    assert "ratio generation tokens/s split/unsplit: " in result.stdout
    assert set(json.loads(out.read_text())["ratios"]) == {
        "split/unsplit train step time",
        "generation tokens/s split/unsplit",
    }
