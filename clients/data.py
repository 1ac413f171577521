"""Training data on the client: read examples, tokenise and pad them, and cut them into
the same micro-batches every time (so a step can be redone, or resumed, exactly)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

IGNORE = -100


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


def _example(row: Any, where: str) -> Example:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object")
    if "prompt" in row and "response" in row:
        return Example(str(row["prompt"]), str(row["response"]))
    if "instruction" in row and "output" in row:
        prompt = str(row["instruction"])
        if row.get("input"):
            prompt += "\n" + str(row["input"])
        return Example(prompt, str(row["output"]))
    if "text" in row:
        return Example("", str(row["text"]))
    raise ValueError(
        f"{where}: needs prompt/response, instruction/input/output or text fields; "
        f"got {', '.join(sorted(row)) or 'none'}"
    )


def read_examples(path: Path) -> list[Example]:
    """Examples from a JSONL file, or a directory written by ``datasets``' save_to_disk."""
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise ValueError(
                f"{path} is a directory: reading it needs the `datasets` package"
            ) from None
        return [
            _example(row, f"{path} row {i}")
            for i, row in enumerate(datasets.load_from_disk(str(path)))
        ]
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
        examples.append(_example(row, f"{path}:{number}"))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


class Batch(NamedTuple):
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def encode(example: Example, tokenizer: Any, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + eos, and labels that ignore the prompt."""
    prompt = (
        tokenizer.encode(example.prompt + "\n", add_special_tokens=False) if example.prompt else []
    )
    response = [
        *tokenizer.encode(example.response, add_special_tokens=False),
        tokenizer.eos_token_id,
    ]
    ids = ([tokenizer.bos_token_id, *prompt, *response])[:max_length]
    labels = ([IGNORE] * (1 + len(prompt)) + response)[:max_length]
    return ids, labels


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-padded batch."""
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for row, (tokens, targets) in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        labels[row, : len(targets)] = torch.tensor(targets)
    return Batch(ids, mask, labels)


class MicroBatches:
    """The deterministic sequence of micro-batches: epoch e is a shuffle seeded by
    (seed, e); step s takes micro-batches (s-1)*accumulation ... s*accumulation-1."""

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Any,
        *,
        batch_size: int,
        accumulation: int = 1,
        max_length: int = 512,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1 or accumulation < 1:
            raise ValueError("batch_size and accumulation must be >= 1")
        self.encoded = [encode(e, tokenizer, max_length) for e in examples]
        self.pad_id = int(tokenizer.pad_token_id)
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.seed = seed
        self.shuffle = shuffle
        self.per_epoch = max(1, len(self.encoded) // batch_size)

    def batch(self, index: int) -> Batch:
        epoch, position = divmod(index, self.per_epoch)
        order = list(range(len(self.encoded)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
        picked = order[position * self.batch_size : (position + 1) * self.batch_size]
        return collate([self.encoded[i] for i in picked], self.pad_id)

    def for_step(self, step: int) -> list[Batch]:
        first = (step - 1) * self.accumulation
        return [self.batch(first + i) for i in range(self.accumulation)]
