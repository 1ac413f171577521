"""The benchmarks in bench/ run and report in their documented format (figures are not
checked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import bench_module, run_bench


@pytest.mark.slow
def test_transport_bench_prints_ratios_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    args = ["--size-mib", "2", "--repeats", "1", "--chunk-kib", "64", "--json", str(out)]
    result = run_bench("transport.py", *args)
    lines = [line for line in result.stdout.splitlines() if line.startswith("ratio ")]
    assert "ratio transport codec/bare @64KiB" in "\n".join(lines)
    assert any(line.startswith("ratio transport codec/bare: ") for line in lines)
    figures = json.loads(out.read_text())
    assert set(figures["ratios"]) == {line[6:].rsplit(":", 1)[0] for line in lines}
    assert all(r["codec_mb_s"] and r["bare_mb_s"] for r in figures["chunks"])


@pytest.mark.slow
def test_frames_bench_prints_its_ratios_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "frames.json"
    tiny = ["--repeats", "1", "--round-trips", "2", "--warmup", "1", "--json", str(out)]
    result = run_bench("frames.py", *tiny)
    expected = {
        "frame round trip bare/splitfed 2MiB",
        "frame round trip bare/splitfed decode step",
        "frame round trip bare/splitfed",
    }
    lines = [line for line in result.stdout.splitlines() if line.startswith("ratio ")]
    assert {line[6:].rsplit(":", 1)[0] for line in lines} == expected
    figures = json.loads(out.read_text())
    assert set(figures["ratios"]) == expected
    ratios = figures["ratios"]
    assert ratios["frame round trip bare/splitfed"] == min(ratios.values())
    for frame in ("2MiB", "decode step"):
        times = figures["frames"][frame]["round_trip_s"]
        assert all(len(times[path]) == 1 and times[path][0] > 0 for path in ("bare", "splitfed"))


@pytest.mark.slow
@pytest.mark.long
def test_split_overhead_bench_prints_ratios_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "split.json"
    result = run_bench(
        "split_overhead.py", "--rounds", "1", "--new-tokens", "2", "--json", str(out)
    )
    assert "ratio split/unsplit train step time: " in result.stdout
    assert "ratio generation tokens/s split/unsplit: " in result.stdout
    assert set(json.loads(out.read_text())["ratios"]) == {
        "split/unsplit train step time",
        "generation tokens/s split/unsplit",
    }


@pytest.mark.slow
@pytest.mark.long
def test_parallel_bench_prints_its_ratio_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "parallel.json"
    tiny = ["--rounds", "2", "--blocks", "1", "--layers", "3", "--batch", "1", "--tokens", "8"]
    result = run_bench("parallel.py", *tiny, "--json", str(out))
    assert "ratio parallel client-batch/serial samples/s: " in result.stdout
    figures = json.loads(out.read_text())
    assert set(figures["ratios"]) == {"parallel client-batch/serial samples/s"}
    assert all(figures["figures"]["samples_per_s"][mode] > 0 for mode in ("serial", "client-batch"))


@pytest.mark.slow
@pytest.mark.long
def test_aggregator_memory_bench_checks_the_average_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    memory = ["--clients", "3", "--adapter-mib", "1", "--concurrency", "2", "--json", str(out)]
    result = run_bench("aggregator_memory.py", *memory)
    assert "ratio aggregator peak rss growth/adapter: " in result.stdout
    figures = json.loads(out.read_text())
    assert set(figures["ratios"]) == {"aggregator peak rss growth/adapter"}
    assert figures["figures"]["errors"] == []
    assert figures["figures"]["max_abs_error"] <= 1e-5
    assert figures["figures"]["baseline_kb"] > 0


@pytest.mark.slow
@pytest.mark.long
def test_concurrency_bench_prints_its_ratios_and_writes_json_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "concurrency.json", tmp_path / "scaling.png"
    tiny = ["--quick", "--sessions", "1,8", "--new-tokens", "2", "--prompt-tokens", "4"]
    result = run_bench(
        "concurrency.py", *tiny, "--tokens", "8", "--json", str(out), "--plot", str(png)
    )
    expected = {
        f"{kind} {n} sessions batched/serial" for kind in ("generation", "training") for n in (1, 8)
    }
    for what in expected:
        assert f"ratio {what}: " in result.stdout
    figures = json.loads(out.read_text())
    assert set(figures["ratios"]) == expected
    assert figures["settings"]["sessions"] == [1, 8]
    for kind, unit in (("generation", "tokens_per_s"), ("training", "samples_per_s")):
        assert set(figures["figures"][kind]) == {"1", "8"}
        for entry in figures["figures"][kind].values():
            assert all(entry[unit][mode] > 0 for mode in ("serial", "concurrent"))
            assert set(entry) >= {"blocks", "seconds", "client_cores", "backbone_cores"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.long
def test_gpu_scale_bench_runs_tiny_on_cpu_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu_scale.json"
    result = run_bench(
        "gpu_scale.py", "--config", "tiny", "--device", "cpu", "--quick", "--json", str(out)
    )
    expected = {
        "split/centralized step",
        "split/generate tokens/s",
        "generation 1 sessions concurrent/serial",
        "generation 4 sessions concurrent/serial",
        "training 1 sessions concurrent/serial",
        "training 2 sessions concurrent/serial",
    }
    printed = {
        line[6:].rsplit(":", 1)[0]
        for line in result.stdout.splitlines()
        if line.startswith("ratio ")
    }
    assert printed == expected
    figures = json.loads(out.read_text())
    assert figures["benchmark"] == "gpu_scale" and figures["partial"] is False
    assert set(figures["ratios"]) == expected
    assert all(value > 0 for value in figures["ratios"].values())
    assert {"machine", "settings", "figures"} <= set(figures)
    assert set(figures["figures"]) == {
        "setup",
        "step",
        "generate",
        "generation_sessions",
        "training_sessions",
    }
    assert set(figures["figures"]["generation_sessions"]["concurrent"]) == {"1", "4"}
    assert figures["machine"]["device"] == "cpu"
    assert (tmp_path / "gpu_scale_backbone.log").exists()


@pytest.mark.slow
def test_encoding_fidelity_bench_prints_ratios_and_writes_curves(tmp_path: Path) -> None:
    out = tmp_path / "encodings.json"
    tiny = ["--steps", "2", "--layers", "3", "--tokens", "17", "--vocab", "128", "--active", "8"]
    result = run_bench(
        "encoding_fidelity.py", *tiny, "--encodings", "raw/raw,int8/bf16", "--json", str(out)
    )
    assert "ratio final loss act-int8+grad-bf16/raw: " in result.stdout
    figures = json.loads(out.read_text())
    assert set(figures["ratios"]) == {"final loss act-int8+grad-bf16/raw"}
    assert [len(curve) for curve in figures["curves"].values()] == [2, 2]
    assert figures["rows"]["raw"]["mean_abs_diff"] == 0


@pytest.mark.slow
@pytest.mark.long  # 35 s: make test-long (the harness itself is checked in make test)
def test_wan_bench_prints_its_ratios_over_emulated_links(tmp_path: Path) -> None:
    reason = bench_module("wanlink").unavailable()
    if reason is not None:
        pytest.skip(f"the WAN harness cannot run here: {reason}")
    out = tmp_path / "wan.json"
    args = ["--tiny", "--quick", "--profiles", "lan,wan", "--json", str(out)]
    result = run_bench("wan.py", *args)
    lines = [line for line in result.stdout.splitlines() if line.startswith("ratio ")]
    figures = json.loads(out.read_text())
    assert set(figures["ratios"]) == {line[6:].rsplit(":", 1)[0] for line in lines}
    assert {
        "step wan/lan",
        "step wan/lan sequential",
        "step wan/lan pipelined raw",
        "generation wan steps/s / floor",
        "bytes per step int8/raw",
    } <= set(figures["ratios"])
    assert figures["figures"]["checks"]["wan"]["within_10_percent"] in (True, False)
    assert set(figures["figures"]["profiles"]["lan"]["bytes_per_token"]) == {"raw", "bf16", "int8"}


@pytest.mark.slow
@pytest.mark.long  # ~35 s: make test-long
def test_quantization_bench_prints_its_ratios_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "quantization.json"
    result = run_bench("quantization.py", "--tiny", "--quick", "--json", str(out))
    lines = [line for line in result.stdout.splitlines() if line.startswith("ratio ")]
    figures = json.loads(out.read_text())
    assert set(figures["ratios"]) == {line[6:].rsplit(":", 1)[0] for line in lines}
    assert set(figures["ratios"]) == {
        "body memory fp32/bf16",
        "body memory int8/bf16",
        "body memory nf4/bf16",
        "eval loss int8/none",
        "eval loss nf4/none",
        "eval loss merged int8/int8",
        "eval loss merged nf4/nf4",
        "step time int8/fp32",
        "step time nf4/fp32",
        "generation tokens/s int8/fp32",
        "generation tokens/s nf4/fp32",
    }
    assert all(value > 0 for value in figures["ratios"].values())
    memory = figures["memory"]["modes"]
    assert set(memory) == {"fp32", "bf16", "int8", "nf4"}
    # What each mode's weights take is exact; resident memory is only reported.
    assert memory["nf4"]["weight_bytes"] < memory["int8"]["weight_bytes"]
    assert memory["int8"]["weight_bytes"] < memory["bf16"]["weight_bytes"]
    assert memory["bf16"]["weight_bytes"] < memory["fp32"]["weight_bytes"]
    fidelity = figures["fidelity"]["modes"]
    assert set(fidelity["nf4"]["logits"]) >= {"max_abs", "mean_abs", "mean_kl", "top1_agreement"}
    assert fidelity["int8"]["logits"]["max_abs"] > 0


@pytest.mark.slow
@pytest.mark.long  # ~20 s: make test-long
def test_openai_bench_prints_its_ratios_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "openai.json"
    result = run_bench("openai.py", "--quick", "--json", str(out))
    lines = [line for line in result.stdout.splitlines() if line.startswith("ratio ")]
    figures = json.loads(out.read_text())
    assert set(figures["ratios"]) == {line[6:].rsplit(":", 1)[0] for line in lines}
    assert set(figures["ratios"]) == {
        "openai endpoint/direct generation tokens/s",
        "openai endpoint 2 concurrent/1 request tokens/s",
    }
    assert all(value > 0 for value in figures["ratios"].values())
    assert figures["figures"]["tokens"] == 8
