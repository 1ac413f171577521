"""The tiny model and the data the demo trains on, written to a directory: what
``splitfed demo`` runs and what ``splitfed demo --write-configs`` leaves for the README's
session. Nothing is downloaded.

The fine-tuning task is one a 6-layer, 64-wide model learns in the demo's few dozen
steps and can be checked exactly: "Which is larger, 7 or 3?" -> "7" (two different
digits). The answer follows a rule over the prompt, so the held-out questions (pairs the
training never sees) measure whether the rule was learned, not remembered. The base model
has read the bundled texts and counted (it knows the digits and their order) but was never
asked the question: it answers with something else, so it scores 0 %.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from splitfed.models.tiny import BUNDLED_DATASET, make_tiny_checkpoint

# How many of the 90 questions are held out (never trained on).
HELD_OUT = 20


@dataclass(frozen=True)
class Sample:
    """Where :func:`write_sample` put things: a Hugging Face checkpoint directory, the
    data owner's private training set and a held-out set (JSONL, prompt/response)."""

    model: Path
    train: Path
    heldout: Path


def _text(row: dict[str, str]) -> str:
    return f"{row['prompt']}\n{row['response']}" if "prompt" in row else row["text"]


def task_rows() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, held-out) prompt/response rows of the task, disjoint, in a fixed order:
    every question "Which is larger, a or b?" over two different digits, answered by the
    larger one."""
    rows = [
        {"prompt": f"Which is larger, {a} or {b}?", "response": str(max(a, b))}
        for a in range(10)
        for b in range(10)
        if a != b
    ]
    random.Random(0).shuffle(rows)
    return rows[HELD_OUT:], rows[:HELD_OUT]


def _with_choices(row: dict[str, str]) -> dict[str, object]:
    a, b = re.findall(r"\d", row["prompt"])
    return {**row, "choices": [a, b], "label": row["response"]}


def counting_texts() -> list[str]:
    """Public text the base model learns the numbers from: counting, 0 to 200."""
    return [" ".join(str(n) for n in range(start, start + 8)) for start in range(0, 200, 3)]


def write_sample(root: Path) -> Sample:
    """A tiny base model pretrained on the bundled texts and on counting, the task's
    training questions as the data owner's private fine-tuning set, and its held-out
    questions (see the module's docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    train_rows, heldout_rows = task_rows()
    train, heldout = root / "train.jsonl", root / "heldout.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    # The held-out rows also name both candidates and the right one, so `splitfed eval
    # --data heldout.jsonl` scores them as classification (accuracy) besides the loss.
    heldout.write_text("".join(json.dumps(_with_choices(r)) + "\n" for r in heldout_rows))
    bundled = [_text(json.loads(line)) for line in BUNDLED_DATASET.read_text().splitlines()]
    public = bundled + counting_texts()
    # One thread: the tiny model's 64-wide matrices gain nothing from more, and on a busy
    # machine threads waiting for each other made this pretraining ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_tiny_checkpoint(
            root / "model",
            public + [_text(r) for r in train_rows],
            layers=6,
            hidden_size=64,
            pretrain_texts=public,
            pretrain_steps=300,
        )
    finally:
        torch.set_num_threads(threads)
    return Sample(model=model, train=train, heldout=heldout)
