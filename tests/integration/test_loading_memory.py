"""Peak memory of loading a client's parts, measured in a fresh process: the client reads
only its own tensors and holds them once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_random_llama_450mb

MEASURE = """
import json, sys, torch
from pathlib import Path
from splitfed.models.loading import load_part

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

path = Path(sys.argv[1])
before = kib("VmRSS")
parts = [load_part(path, "head", 1, 1), load_part(path, "tail", 1, 1)]
total = 0
for part in parts:
    for tensor in list(part.parameters()) + list(part.buffers()):
        total += tensor.numel() * tensor.element_size()
        float(tensor.float().sum()) if tensor.numel() < (1 << 22) else float(tensor.sum())
print(json.dumps({"growth": (kib("VmHWM") - before) * 1024, "bytes": total,
                  "read": sorted(set(n for p in parts for n in p.source_tensors))}))
"""


@pytest.mark.slow
def test_loading_head_and_tail_grows_peak_rss_by_at_most_1_3x_their_bytes(tmp_path: Path) -> None:
    """A model of ~450 MB; the client process loads head and tail and touches every byte."""
    save_random_llama_450mb(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(
        f"head+tail: {figures['bytes'] / 2**20:.0f} MiB of tensors, peak RSS growth "
        f"{figures['growth'] / 2**20:.0f} MiB ({figures['growth'] / figures['bytes']:.2f}x)"
    )
    assert figures["bytes"] > 200 << 20
    assert figures["growth"] <= 1.3 * figures["bytes"]
    assert not [
        n
        for n in figures["read"]
        if n.startswith("model.layers.") and n.split(".")[2] not in {"0", "11"}
    ]
