"""The tiny model and the data the demo trains on, written to a directory: what
``splitfed demo`` runs and what ``splitfed demo --write-configs`` leaves for the README's
session. Nothing is downloaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from splitfed.models.tiny import BUNDLED_DATASET, make_tiny_checkpoint


@dataclass(frozen=True)
class Sample:
    """Where :func:`write_sample` put things: a Hugging Face checkpoint directory, the
    data owner's private training set and a held-out set (JSONL, prompt/response)."""

    model: Path
    train: Path
    heldout: Path


def _text(row: dict[str, str]) -> str:
    return f"{row['prompt']}\n{row['response']}" if "prompt" in row else row["text"]


def write_sample(root: Path) -> Sample:
    """A tiny base model that has read the bundled texts except the arithmetic, and the
    arithmetic questions as the data owner's private fine-tuning set."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in BUNDLED_DATASET.read_text().splitlines()]
    private = [r for r in rows if r.get("prompt", "").startswith("Add")]
    public = [_text(r) for r in rows if r not in private]
    train, heldout = root / "train.jsonl", root / "heldout.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in private))
    heldout.write_text("".join(json.dumps(r) + "\n" for r in private[::4]))
    model = make_tiny_checkpoint(
        root / "model",
        [_text(r) for r in rows],
        layers=6,
        hidden_size=64,
        pretrain_texts=public,
        pretrain_steps=300,
    )
    return Sample(model=model, train=train, heldout=heldout)
