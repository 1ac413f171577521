"""Split overhead: head -> body -> tail in one process against the unsplit model.

Same weights and the same LoRA adapters (r=16 on q, k, v, o) on both. A Llama-layout
model of hidden size 512 and 8 layers (vocab 32000), batch 4 x 256 tokens:

* training step: forward + backward (cross-entropy on all tokens), median over blocks
  of rounds per path (unsplit, split, unsplit, split); the ratio is split time /
  unsplit time (<= 1.05 is the target: the split itself should cost nothing);
* generation: greedy, 64 new tokens for 4 prompts of 32 tokens with left padding, split
  (``SplitGenerator`` with a local body) against ``model.generate``; the ratio is split
  tokens/s / unsplit tokens/s (>= 0.95 is the target).

    python bench/split_overhead.py [--rounds 10] [--json PATH]

Prints a table and ``ratio split/unsplit train step time: X`` and ``ratio generation
tokens/s split/unsplit: Y``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from common import (
    greedy_generate,
    left_padded_prompts,
    llama_512x8,
    machine,
    report,
    timing_figures,
)
from transformers import LlamaForCausalLM

from splitfed.models import split_model
from splitfed.models.adapters import LoraSettings
from splitfed.models.generation import LocalStage, SamplingOptions, SplitGenerator
from splitfed.models.peft_import import inject_adapter_in_model
from splitfed.runtime import tune_allocator


def build(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_512x8(pad_token_id=None))
    inject_adapter_in_model(
        LoraSettings().peft_config(["q_proj", "k_proj", "v_proj", "o_proj"]), model
    )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    return model


def train_step_unsplit(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def train_step_split(parts: Any, loss_fn: Any, ids: torch.Tensor, mask: torch.Tensor) -> float:
    head, body, tail = parts
    start = time.perf_counter()
    logits = tail(body(head(ids, mask), mask), mask)
    loss_fn(logits, ids, vocab_size=logits.shape[-1]).backward()
    for part in parts:
        part.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per path")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="write all figures to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 1:
        parser.error("--rounds and --new-tokens must be at least 1")

    described = machine(transformers=transformers.__version__, threads=torch.get_num_threads())
    tune_allocator()  # as every splitfed process does (its channel/server factories call it)
    model = build(seed=0).train()
    parts = split_model(copy.deepcopy(model), 1, 1)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (4, 256), generator=gen)
    mask = torch.ones_like(ids)

    # Training step. Each path runs in blocks of rounds (A, B, A, B) after its own
    # warm-up: interleaving single steps made each step pay for the other's freed
    # memory (page faults), which swamped the difference being measured.
    unsplit_train: list[float] = []
    split_train: list[float] = []
    for _ in range(2):
        train_step_unsplit(model, ids, mask)
        unsplit_train += [
            train_step_unsplit(model, ids, mask) for _ in range(args.rounds // 2 or 1)
        ]
        train_step_split(parts, model.loss_function, ids, mask)
        split_train += [
            train_step_split(parts, model.loss_function, ids, mask)
            for _ in range(args.rounds // 2 or 1)
        ]

    # Generation: greedy, left-padded prompts.
    model.eval()
    for part in parts:
        part.eval()
    prompts, prompt_mask = left_padded_prompts(gen)
    generator = SplitGenerator(parts[0], LocalStage(parts[1]), parts[2])
    options = SamplingOptions(max_new_tokens=args.new_tokens)

    def unsplit_generate() -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = greedy_generate(model, prompts, prompt_mask, args.new_tokens)
        return time.perf_counter() - start, out[:, prompts.shape[1] :]

    def split_generate() -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = generator.generate(prompts, prompt_mask, options)
        return time.perf_counter() - start, out

    unsplit_generate()
    split_generate()
    unsplit_gen, split_gen = [], []
    for _ in range(max(3, args.rounds // 2)):
        seconds, reference = unsplit_generate()
        unsplit_gen.append(seconds)
        seconds, tokens = split_generate()
        split_gen.append(seconds)
        if not torch.equal(tokens, reference):
            print("error: split greedy tokens differ from generate", file=sys.stderr)
            return 1

    figures = timing_figures(
        {"unsplit": unsplit_train, "split": split_train},
        {"unsplit": unsplit_gen, "split": split_gen},
        tokens=prompts.shape[0] * args.new_tokens,
    )
    ratios = {
        "split/unsplit train step time": figures["train_step_s"]["split"]
        / figures["train_step_s"]["unsplit"],
        "generation tokens/s split/unsplit": figures["generation_tokens_per_s"]["split"]
        / figures["generation_tokens_per_s"]["unsplit"],
    }
    print(f"\n{'':28} {'unsplit':>10} {'split':>10}")
    train = figures["train_step_s"]
    print(f"{'train step (s, median)':28} {train['unsplit']:>10.3f} {train['split']:>10.3f}")
    print(
        f"{'generation (tokens/s)':28} {figures['generation_tokens_per_s']['unsplit']:>10.1f} "
        f"{figures['generation_tokens_per_s']['split']:>10.1f}"
    )
    print()
    report(
        args.json,
        "split_overhead",
        ratios,
        machine=described,
        rounds=args.rounds,
        raw={
            "unsplit_train": unsplit_train,
            "split_train": split_train,
            "unsplit_generation": unsplit_gen,
            "split_generation": split_gen,
        },
        figures=figures,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
