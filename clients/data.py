"""Training and evaluation data on the client: read records from local files, turn them
into examples, tokenise and pad them, and cut them into the same micro-batches every time
(so a step can be redone, or resumed, exactly).

Files are JSON Lines (``.jsonl``), a JSON array (``.json``), CSV (``.csv``), Parquet
(``.parquet``, through pyarrow) or a directory written by ``datasets``' ``save_to_disk``.
Nothing is ever downloaded. An example is a prompt and a response; when the tokenizer has
a chat template (and it is not turned off), the prompt becomes the user's turn and the
response the assistant's, otherwise the text is ``bos prompt \\n response eos``.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from splitfed.files import StrPath

IGNORE = -100
FORMATS = (".jsonl", ".json", ".csv", ".parquet")
LAYOUTS = "prompt/response, instruction/input/output or text"


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


@dataclass(frozen=True)
class Record:
    """One row of a data file, and where it came from (for error messages)."""

    fields: Mapping[str, Any]
    where: str


def example_of(row: Mapping[str, Any], where: str) -> Example:
    """The example of a row in one of the training layouts (``LAYOUTS``)."""
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
        f"{where}: unknown columns {', '.join(sorted(row)) or '(none)'}; rename them to {LAYOUTS}"
    )


def _jsonl(path: Path) -> list[Record]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(
                f"{path}:{number}: not JSON ({exc}); write one object a line"
            ) from None
        records.append(Record(row, f"{path}:{number}"))
    return records


def _json(path: Path) -> list[Record]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc}); write an array of objects") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON array of objects, got {type(rows).__name__}")
    return [Record(row, f"{path} item {i}") for i, row in enumerate(rows)]


def _csv(path: Path) -> list[Record]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        records = []
        for row in reader:
            if None in row:
                raise ValueError(
                    f"{path}:{reader.line_num}: more values than the header has columns; "
                    "quote values that hold commas"
                )
            records.append(Record(row, f"{path}:{reader.line_num}"))
        return records


def _parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(str(path)).to_pylist()
    except Exception as exc:  # pyarrow raises its own error types
        raise ValueError(f"{path}: not a Parquet file ({exc})") from None
    return [Record(row, f"{path} row {i}") for i, row in enumerate(rows)]


def _saved_dataset(path: Path) -> list[Record]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{path} is a directory: reading a saved dataset needs the `datasets` package "
            f"(pip install datasets), or give a {', '.join(FORMATS)} file"
        ) from None
    rows = datasets.load_from_disk(str(path))
    return [Record(row, f"{path} row {i}") for i, row in enumerate(rows)]


READERS = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}


def read_records(path: Path) -> list[Record]:
    """The rows of a local data file (``FORMATS``) or saved dataset directory, each a
    mapping of field names to values; raises ValueError naming the file and the fix."""
    path = Path(path)
    if path.is_dir():
        records = _saved_dataset(path)
    elif not path.is_file():
        raise ValueError(
            f"data file {path} does not exist; give a {', '.join(FORMATS)} file "
            "or a directory saved by datasets"
        )
    else:
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise ValueError(
                f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; "
                f"use one of {', '.join(FORMATS)}"
            )
        records = reader(path)
    for record in records:
        if not isinstance(record.fields, Mapping):
            raise ValueError(f"{record.where}: expected an object with named fields")
    if not records:
        raise ValueError(f"{path} holds no examples; add at least one row with {LAYOUTS}")
    return records


def read_examples(path: StrPath) -> list[Example]:
    """Training examples from a data file (see :func:`read_records`)."""
    path = Path(path)
    return [example_of(r.fields, r.where) for r in read_records(path)]


class Batch(NamedTuple):
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _template(tokenizer: Any, messages: list[dict[str, str]], *, generation: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return str(text)


def prompt_tokens(tokenizer: Any, prompt: str, *, chat_template: bool = True) -> list[int]:
    """The tokens before a response: the chat template's user turn and generation prompt
    (when the tokenizer has one, ``chat_template`` is on and there is a prompt), else
    ``bos prompt \\n`` (``bos`` alone without a prompt: plain text)."""
    if chat_template and has_chat_template(tokenizer) and prompt:
        text = _template(tokenizer, [{"role": "user", "content": prompt}], generation=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    if not prompt:
        return bos
    return [*bos, *tokenizer.encode(prompt + "\n", add_special_tokens=False)]


def response_tokens(
    tokenizer: Any, prompt: str, response: str, *, chat_template: bool = True
) -> list[int]:
    """The tokens of ``response`` after :func:`prompt_tokens` of ``prompt``: the
    assistant's turn as the chat template ends it, else the response and eos."""
    if chat_template and has_chat_template(tokenizer) and prompt:
        user = [{"role": "user", "content": prompt}]
        head = _template(tokenizer, user, generation=True)
        full = _template(
            tokenizer, [*user, {"role": "assistant", "content": response}], generation=False
        )
        if not full.startswith(head):
            raise ValueError(
                "the tokenizer's chat template does not extend the prompt with the "
                "response; turn chat_template off"
            )
        return list(tokenizer.encode(full[len(head) :], add_special_tokens=False))
    return [*tokenizer.encode(response, add_special_tokens=False), tokenizer.eos_token_id]


def encode(
    example: Example, tokenizer: Any, max_length: int, *, chat_template: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response, and labels that ignore the prompt."""
    prompt = prompt_tokens(tokenizer, example.prompt, chat_template=chat_template)
    response = response_tokens(
        tokenizer, example.prompt, example.response, chat_template=chat_template
    )
    ids = [*prompt, *response][:max_length]
    labels = ([IGNORE] * len(prompt) + response)[:max_length]
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


def conversation_tokens(
    tokenizer: Any,
    turns: Sequence[tuple[str, str]],
    prompt: str,
    *,
    system: str = "",
    chat_template: bool = True,
) -> list[int]:
    """The tokens before the next reply of a conversation: earlier ``turns`` (user,
    assistant) and the new ``prompt``, through the chat template when the tokenizer has
    one (with ``system`` as the system turn), else in the training format: ``bos``, then
    each user turn and reply on lines of their own."""
    if chat_template and has_chat_template(tokenizer):
        messages = [{"role": "system", "content": system}] if system else []
        for user, reply in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": prompt})
        text = _template(tokenizer, messages, generation=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    lines = [system] if system else []
    for user, reply in turns:
        lines += [user, reply]
    return prompt_tokens(tokenizer, "\n".join([*lines, prompt]), chat_template=False)


def left_padded(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts for generation: ids and mask, padded on the left."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, length - len(row) :] = 1
    return ids, mask


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
        chat_template: bool = True,
    ) -> None:
        if batch_size < 1 or accumulation < 1:
            raise ValueError("batch_size and accumulation must be >= 1")
        self.encoded = [
            encode(e, tokenizer, max_length, chat_template=chat_template) for e in examples
        ]
        self.pad_id = int(tokenizer.pad_token_id)
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.seed = seed
        self.shuffle = shuffle
        self.per_epoch = max(1, len(self.encoded) // batch_size)

    def indices(self, index: int) -> list[int]:
        """Which examples micro-batch ``index`` holds, in its rows' order."""
        epoch, position = divmod(index, self.per_epoch)
        order = list(range(len(self.encoded)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
        return order[position * self.batch_size : (position + 1) * self.batch_size]

    def batch(self, index: int) -> Batch:
        return collate([self.encoded[i] for i in self.indices(index)], self.pad_id)

    def for_step(self, step: int) -> list[Batch]:
        first = (step - 1) * self.accumulation
        return [self.batch(first + i) for i in range(self.accumulation)]
