"""Training and evaluation data on the client: read records from local files, turn them
into examples, tokenise and pad them, and cut them into the same micro-batches every time
(so a step can be redone, or resumed, exactly).

Files are JSON Lines (``.jsonl``), a JSON array (``.json``), CSV (``.csv``), Parquet
(``.parquet``, through pyarrow) or a directory written by ``datasets``' ``save_to_disk``.
Nothing is ever downloaded. An example is a prompt and a response; when the tokenizer has
a chat template (and it is not turned off), the prompt becomes the user's turn and the
response the assistant's, otherwise the text is ``bos prompt \\n response eos``. A
``messages`` row is a whole conversation (system, user and assistant turns, as in the
OpenAI and Hugging Face chat formats), framed by :func:`messages_tokens`: only the
assistant turns carry labels.

One module (a little over 500 lines) on purpose: reading, layouts and tokenisation are
the one contract that training, evaluation, generation and chat share.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from splitfed.files import StrPath

IGNORE = -100
FORMATS = (".jsonl", ".json", ".csv", ".parquet")
LAYOUTS = "messages, prompt/response, instruction/input/output or text"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


@dataclass(frozen=True)
class Record:
    """One row of a data file, and where it came from (for error messages)."""

    fields: Mapping[str, Any]
    where: str


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: ``role`` is system, user or assistant."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Conversation:
    """A ``messages`` row: checked by :func:`parse_messages`; ``where`` it came from
    names it in errors (not compared)."""

    messages: tuple[Message, ...]
    where: str = field(default="", compare=False)


def _content(value: Any, what: str) -> str:
    """A message's content: a string, or OpenAI's list of text parts (joined by newlines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"{what} has a {kind or type(part).__name__!r} content part; only "
                    '{"type": "text", "text": "..."} parts are read'
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(
        f"{what} content must be a string or a list of text parts, got {type(value).__name__}"
    )


def parse_messages(value: Any, where: str, *, answer: bool = True) -> tuple[Message, ...]:
    """The messages of a conversation (a list of ``{"role", "content"}`` objects; a JSON
    string of one, as a CSV column holds it), checked: an optional system message first,
    then user and assistant turns alternating, starting with a user turn; with
    ``answer``, at least one assistant turn. Raises a one-line ValueError naming
    ``where``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(
                f"{where}: messages is not JSON ({exc}); write it as a JSON array of "
                '{"role": ..., "content": ...} objects'
            ) from None
    if isinstance(value, Mapping) or not isinstance(value, Sequence):
        raise ValueError(
            f"{where}: messages must be a list of {{role, content}} objects, "
            f"got {type(value).__name__}"
        )
    if not value:
        raise ValueError(f"{where}: messages is empty; give a user and an assistant turn")
    messages: list[Message] = []
    for number, item in enumerate(value, start=1):
        what = f"{where}: message {number}"
        if not isinstance(item, Mapping) or "role" not in item or "content" not in item:
            raise ValueError(f"{what} is not an object with a role and a content")
        role = item["role"]
        if role not in ROLES:
            raise ValueError(f"{what} has unknown role {role!r}; use {', '.join(ROLES)}")
        if role == "system" and number > 1:
            raise ValueError(f"{what} is a system message; only the first message may be one")
        previous = messages[-1].role if messages else "system"
        if role != "system" and previous != "system" and role == previous:
            raise ValueError(
                f"{what} is a second {role} turn in a row; merge them into one "
                "(user and assistant turns alternate)"
            )
        if role == "assistant" and previous == "system":
            raise ValueError(f"{what} is an assistant turn before any user turn; start with one")
        messages.append(Message(role, _content(item["content"], what)))
    if answer and not any(m.role == "assistant" for m in messages):
        raise ValueError(
            f"{where}: the conversation has no assistant turn, so nothing to learn or score; "
            "add the answer as an assistant message"
        )
    return tuple(messages)


def example_of(row: Mapping[str, Any], where: str) -> Example | Conversation:
    """The example of a row in one of the training layouts (``LAYOUTS``)."""
    if "messages" in row:
        return Conversation(parse_messages(row["messages"], where), where)
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


def read_examples(path: StrPath) -> list[Example | Conversation]:
    """Training examples from a data file (see :func:`read_records`)."""
    path = Path(path)
    return [example_of(r.fields, r.where) for r in read_records(path)]


def read_conversation(path: StrPath) -> tuple[Message, ...]:
    """The conversation that starts a chat: a ``.json`` file holding a messages list (or
    an object with ``messages``), or a ``.jsonl`` file of one such row; it may end with a
    user turn (still to be answered) and need not have an assistant turn."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path} ({exc.strerror or exc})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if path.suffix.lower() == ".jsonl" and len(lines) != 1:
        raise ValueError(f"{path}: holds {len(lines)} rows; give one conversation")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc}); give a messages list") from None
    if isinstance(value, Mapping):
        if "messages" not in value:
            raise ValueError(f"{path}: an object without messages; give a messages list")
        value = value["messages"]
    return parse_messages(value, str(path), answer=False)


def conversation_parts(
    messages: Sequence[Message],
) -> tuple[str, list[tuple[str, str]], str | None]:
    """The inverse of :func:`messages_of` for checked messages (see
    :func:`parse_messages`): the system text ("" if none), the (user, assistant) turns,
    and a final user turn still to be answered (None if there is none)."""
    system = messages[0].content if messages and messages[0].role == "system" else ""
    rest = [m.content for m in messages if m.role != "system"]
    pending = rest.pop() if len(rest) % 2 else None
    return system, list(zip(rest[::2], rest[1::2], strict=True)), pending


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
    example: Example | Conversation,
    tokenizer: Any,
    max_length: int,
    *,
    chat_template: bool = True,
) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response (or of a whole conversation), and labels that
    ignore all but the response (the assistant turns); cut at ``max_length``."""
    if isinstance(example, Conversation):
        ids, labels = messages_tokens(
            tokenizer, example.messages, chat_template=chat_template, where=example.where
        )
        return ids[:max_length], labels[:max_length]
    prompt = prompt_tokens(tokenizer, example.prompt, chat_template=chat_template)
    response = response_tokens(
        tokenizer, example.prompt, example.response, chat_template=chat_template
    )
    ids = [*prompt, *response][:max_length]
    labels = ([IGNORE] * len(prompt) + response)[:max_length]
    return ids, labels


class _Framing:
    """Token ids and labels made of pieces of text (and single tokens): consecutive
    pieces that are labelled alike are encoded as one string, as :func:`encode` encodes
    a prompt and a response."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.text = ""
        self.labelled = False

    def add_text(self, text: str, *, labelled: bool) -> None:
        if labelled != self.labelled:
            self.flush()
            self.labelled = labelled
        self.text += text

    def add_token(self, token: int, *, labelled: bool) -> None:
        self.flush()
        self._extend([token], labelled)

    def flush(self) -> None:
        if self.text:
            self._extend(
                list(self.tokenizer.encode(self.text, add_special_tokens=False)), self.labelled
            )
            self.text = ""

    def _extend(self, ids: list[int], labelled: bool) -> None:
        self.ids += ids
        self.labels += ids if labelled else [IGNORE] * len(ids)


def messages_of(system: str, turns: Sequence[tuple[str, str]], prompt: str) -> tuple[Message, ...]:
    """The messages of a conversation given as a system text (none if empty), earlier
    (user, assistant) turns and the new user ``prompt``."""
    messages = [Message("system", system)] if system else []
    for user, reply in turns:
        messages += [Message("user", user), Message("assistant", reply)]
    return (*messages, Message("user", prompt))


def messages_tokens(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    chat_template: bool = True,
    generation_prompt: bool = False,
    where: str = "",
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and labels that keep only the assistant turns: each
    one's content and what ends its turn; -100 for the rest (system and user turns, role
    headers, the generation prompt).

    With the tokenizer's chat template (when it has one and ``chat_template`` is on), the
    whole conversation is rendered by ``apply_chat_template``, and each assistant turn is
    the difference between the conversation up to it with the generation prompt and with
    the turn (as :func:`response_tokens` finds a response); a template whose renderings
    do not extend one another that way is an error. Without one: ``bos``, then each
    system and user message and a newline, each assistant message and ``eos`` (a
    one-turn conversation is exactly a prompt/response example). ``generation_prompt``
    ends the text with what starts the next assistant turn (nothing without a template).
    Text labelled alike is encoded in one piece."""
    framing = _Framing(tokenizer)
    if not (chat_template and has_chat_template(tokenizer)):
        if tokenizer.bos_token_id is not None:
            framing.add_token(tokenizer.bos_token_id, labelled=False)
        for message in messages:
            if message.role == "assistant":
                framing.add_text(message.content, labelled=True)
                framing.add_token(tokenizer.eos_token_id, labelled=True)
            else:
                framing.add_text(message.content + "\n", labelled=False)
        framing.flush()
        return framing.ids, framing.labels
    prefix = f"{where}: " if where else ""

    def render(count: int, generation: bool, done: str) -> str:
        dicts = [m.as_dict() for m in messages[:count]]
        try:
            text = _template(tokenizer, dicts, generation=generation)
        except Exception as exc:  # jinja2's TemplateError, or what the template raises
            raise ValueError(
                f"{prefix}the tokenizer's chat template cannot render the conversation "
                f"({exc}); turn chat_template off"
            ) from None
        if not text.startswith(done):
            raise ValueError(
                f"{prefix}the tokenizer's chat template does not extend the conversation "
                f"turn by turn (at message {count}): an earlier rendering is not the start "
                "of a later one, so the assistant turns cannot be found; turn chat_template off"
            )
        return text

    done = ""
    for index, message in enumerate(messages):
        if message.role == "assistant":
            head = render(index, True, done)
            framing.add_text(head[len(done) :], labelled=False)
            done = render(index + 1, False, head)
            framing.add_text(done[len(head) :], labelled=True)
    if generation_prompt or (messages and messages[-1].role != "assistant"):
        end = render(len(messages), generation_prompt, done)
        framing.add_text(end[len(done) :], labelled=False)
    framing.flush()
    return framing.ids, framing.labels


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
    assistant) and the new ``prompt``, framed as a ``messages`` row is for training
    (:func:`messages_tokens` of :func:`messages_of`, with the generation prompt): through
    the chat template when the tokenizer has one (with ``system`` as the system turn),
    else ``bos``, the system text and each user turn on a line of their own, each reply
    followed by ``eos``."""
    messages = messages_of(system, turns, prompt)
    ids, _ = messages_tokens(
        tokenizer, messages, chat_template=chat_template, generation_prompt=True
    )
    return ids


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
        examples: Sequence[Example | Conversation],
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
