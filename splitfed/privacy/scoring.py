"""How much an attack recovered: tokens, whole sensitive values, and text.

An attack answers, for some positions of some examples, which token it believes stands
there (-1 where it makes no claim). Three figures score it against the truth:

* **token accuracy**: the share of claimed positions whose token is right;
* **sensitive-field exact match**: the share of marked sensitive values (a name, a date)
  all of whose tokens are claimed and right; values the attack makes no claim on at all
  (a label attack sees only the response) are not counted;
* **ROUGE-L**: the F-measure (``rouge_score``) of the text decoded from the claimed tokens
  against the text of the true tokens at the same positions, per example, averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from splitfed.clients.data import Example, encode, prompt_tokens
from splitfed.privacy.records import PrivateRecord, Span


def _offsets(tokenizer: Any, text: str, expected: list[int]) -> list[tuple[int, int]] | None:
    """Character offsets of ``text``'s tokens, if the tokenizer splits it into ``expected``
    (it may not, where the training format encodes parts separately)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(expected):
        return None
    return [(int(a), int(b)) for a, b in encoded["offset_mapping"]]


def field_positions(
    tokenizer: Any, record: PrivateRecord, max_length: int, *, chat_template: bool = True
) -> list[tuple[Span, list[int]]]:
    """Each sensitive span of ``record`` and the positions of the tokens that overlap it,
    in the ids the client's data pipeline makes of it (clients.data.encode); spans cut off
    by ``max_length``, or that cannot be placed, are left out."""
    example = Example(record.prompt, record.response)
    ids, _ = encode(example, tokenizer, max_length=1 << 30, chat_template=chat_template)
    prompt_length = len(prompt_tokens(tokenizer, record.prompt, chat_template=chat_template))
    special = set(getattr(tokenizer, "all_special_ids", ()))
    spans: list[tuple[Span, list[int]]] = []
    for part, text, begin, end in (
        ("prompt", record.prompt, 0, prompt_length),
        ("response", record.response, prompt_length, len(ids)),
    ):
        first, last = begin, end
        wanted = [s for s in record.sensitive if s.part == part]
        # The segment's ordinary tokens: special ones (bos, eos) have no place in the text.
        while first < last and ids[first] in special:
            first += 1
        while last > first and ids[last - 1] in special:
            last -= 1
        if not wanted or first == last:
            continue
        segment = tokenizer.decode(ids[first:last])
        shift = segment.find(text)
        offsets = _offsets(tokenizer, segment, ids[first:last])
        if shift < 0 or offsets is None:
            continue
        for span in wanted:
            lo, hi = span.start + shift, span.end + shift
            positions = [first + i for i, (a, b) in enumerate(offsets) if a < hi and b > lo]
            if positions and positions[-1] < max_length:
                spans.append((span, positions))
    return spans


@dataclass
class Tally:
    """Hits out of a total."""

    hits: float = 0
    total: int = 0

    def add(self, hit: float, count: int = 1) -> None:
        self.hits += hit
        self.total += count

    @property
    def rate(self) -> float | None:
        return self.hits / self.total if self.total else None


@dataclass
class Score:
    """What an attack recovered over everything it was shown: tokens right of those
    claimed, sensitive values recovered whole (also per field), and the ROUGE-L sum over
    examples."""

    tokens: Tally = field(default_factory=Tally)
    fields: Tally = field(default_factory=Tally)
    rouge: Tally = field(default_factory=Tally)
    by_field: dict[str, Tally] = field(default_factory=dict)

    @property
    def token_accuracy(self) -> float:
        return self.tokens.rate or 0.0

    @property
    def field_exact_match(self) -> float | None:
        return self.fields.rate

    @property
    def rouge_l(self) -> float:
        return self.rouge.rate or 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "token_accuracy": self.token_accuracy,
            "field_exact_match": self.field_exact_match,
            "rouge_l": self.rouge_l,
            "tokens": self.tokens.total,
            "fields": self.fields.total,
            "by_field": {name: tally.rate for name, tally in sorted(self.by_field.items())},
        }


class Scorer:
    """Accumulates :class:`Score` over batches of predictions."""

    def __init__(
        self,
        tokenizer: Any,
        records: Sequence[PrivateRecord],
        max_length: int,
        *,
        chat_template: bool = True,
    ) -> None:
        from rouge_score import rouge_scorer

        self.tokenizer = tokenizer
        self.records = records
        self.positions = [
            field_positions(tokenizer, r, max_length, chat_template=chat_template) for r in records
        ]
        self.special = set(getattr(tokenizer, "all_special_ids", ()))
        self.rouge = rouge_scorer.RougeScorer(["rougeL"])
        self.score = Score()

    def reset(self) -> None:
        self.score = Score()

    def add(self, examples: Sequence[int], truth: torch.Tensor, predicted: torch.Tensor) -> None:
        """Predictions for one batch: ``truth`` and ``predicted`` are [batch, tokens] ids,
        ``predicted`` -1 where the attack makes no claim; row i is example ``examples[i]``."""
        s = self.score
        claimed = predicted >= 0
        s.tokens.add(int(((predicted == truth) & claimed).sum()), int(claimed.sum()))
        for row, index in enumerate(examples):
            p, t, c = predicted[row], truth[row], claimed[row]
            for span, positions in self.positions[index]:
                if positions[-1] >= len(c) or not all(bool(c[i]) for i in positions):
                    continue
                hit = all(int(p[i]) == int(t[i]) for i in positions)
                s.fields.add(hit)
                s.by_field.setdefault(span.field, Tally()).add(hit)
            keep = [i for i in range(len(t)) if bool(c[i]) and int(t[i]) not in self.special]
            if not keep:
                continue
            reference = self.tokenizer.decode([int(t[i]) for i in keep])
            guess = self.tokenizer.decode(
                [int(p[i]) for i in keep if int(p[i]) not in self.special]
            )
            s.rouge.add(self.rouge.score(reference, guess)["rougeL"].fmeasure)
