"""What several benchmarks share: their model, the machine line and how they write
their figures.

The model helpers import torch and transformers when called: a benchmark without a
model (aggregator_memory.py) does not load them for its report."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, PreTrainedModel


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


def stop_child(proc: subprocess.Popen[Any]) -> None:
    """Stop a benchmark's server child that serves until its stdin closes: close it, wait
    up to 30 s, then kill."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def report(path: Path | None, benchmark: str, ratios: dict[str, float], **parts: Any) -> None:
    """Print a line ``ratio <what>: <value>`` per ratio and, with ``path`` (--json), write
    ``{"benchmark": benchmark, **parts, "ratios": ratios}`` there, indented."""
    for what, value in ratios.items():
        print(f"ratio {what}: {value:.3f}")
    if path is not None:
        document = {"benchmark": benchmark, **parts, "ratios": ratios}
        path.write_text(json.dumps(document, indent=2) + "\n")


def left_padded_prompts(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts the generation benchmarks time: 4 of 32 random tokens, rows 1 and 3
    left-padded by 5 and 11; (ids, attention mask)."""
    import torch

    prompts = torch.randint(3, 32000, (4, 32), generator=gen)
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[1, :5] = 0
    prompt_mask[3, :11] = 0
    return prompts, prompt_mask


def greedy_generate(
    model: PreTrainedModel, prompts: torch.Tensor, prompt_mask: torch.Tensor, new_tokens: int
) -> torch.Tensor:
    """The unsplit reference: Hugging Face greedy ``generate`` of exactly ``new_tokens``
    tokens (no EOS), without gradients; the prompts and the new tokens."""
    import torch

    with torch.no_grad():
        return model.generate(
            input_ids=prompts,
            attention_mask=prompt_mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )


def timing_figures(
    train: dict[str, list[float]], generation: dict[str, list[float]], tokens: int
) -> dict[str, dict[str, float]]:
    """The figures split_overhead.py and split_step.py compare, under the names of the
    series given: each ``train`` series' median step time (``train_step_s``) and each
    ``generation`` series' ``tokens`` over its median time (``generation_tokens_per_s``)."""
    return {
        "train_step_s": {name: statistics.median(times) for name, times in train.items()},
        "generation_tokens_per_s": {
            name: tokens / statistics.median(times) for name, times in generation.items()
        },
    }


# The cores this process may use, before pin_half narrows them: a child started after the
# client pinned itself inherits the client's half, so the halves are taken from here.
_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def pin_half(pid: int, *, server: bool) -> None:
    """On 2+ cores, give a server process the upper half of the cores this process
    started with and its client the lower half, as two machines would have; less
    scheduler noise between rounds."""
    if len(_CORES) >= 2:
        half = len(_CORES) // 2
        os.sched_setaffinity(pid, _CORES[half:] if server else _CORES[:half])


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
