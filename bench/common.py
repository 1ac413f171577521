"""What several benchmarks share: their model, the machine line and how they write
their figures.

The model helpers import torch and transformers when called: a benchmark without a
model (aggregator_memory.py) does not load them for its report."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaConfig


def llama_512x8(*, pad_token_id: int | None = 0) -> LlamaConfig:
    """The model split_overhead.py and split_step.py time: Llama layout, hidden size 512,
    8 layers of 8 heads, vocab 32000."""
    from splitfed.models.tiny import llama_config

    return llama_config(
        32000,
        512,
        8,
        intermediate_size=1376,
        heads=8,
        kv_heads=8,
        max_positions=1024,
        pad_token_id=pad_token_id,
    )


def save_random_llama(path: Path, config: LlamaConfig) -> None:
    """A random-initialised (seed 0) Llama model of ``config``, saved at ``path``."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


def report(path: Path | None, benchmark: str, ratios: dict[str, float], **parts: Any) -> None:
    """Print a line ``ratio <what>: <value>`` per ratio and, with ``path`` (--json), write
    ``{"benchmark": benchmark, **parts, "ratios": ratios}`` there, indented."""
    for what, value in ratios.items():
        print(f"ratio {what}: {value:.3f}")
    if path is not None:
        document = {"benchmark": benchmark, **parts, "ratios": ratios}
        path.write_text(json.dumps(document, indent=2) + "\n")


def machine(**extra: Any) -> dict[str, Any]:
    """The machine a benchmark runs on (cpus, platform, torch, python, then ``extra``),
    printed as its ``machine:`` line."""
    import torch

    described = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **extra,
    }
    print("machine: " + ", ".join(f"{k} {v}" for k, v in described.items()))
    return described
