"""Generated tokens to text as they arrive: an incremental detokenizer per sequence and
the text deltas of a generation's steps (what ``generate_stream`` yields).

A token is not always text by itself: a byte-level tokenizer splits a multi-byte
character over several tokens, and a tokenizer may write a space or join pieces
depending on what follows. So a sequence's text is decoded whole (skipping special
tokens, as a finished generation is) and only what is settled is given out: never a
trailing replacement character (an incomplete character) and never a change to text
already given out. The deltas of a sequence joined equal the decoded sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from splitfed.models.generation import GenerationStep

# What a decoder writes for bytes that are not (yet) a whole character.
REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """The text of one generated sequence, token by token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""  # given out so far

    def _decoded(self) -> str:
        return str(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def add(self, token: int) -> str:
        """Take ``token``; the text it settles (often "", e.g. half a character)."""
        self.tokens.append(int(token))
        decoded = self._decoded()
        if decoded.endswith(REPLACEMENT) or not decoded.startswith(self.text):
            return ""  # wait for the bytes or pieces that settle it
        return self._give(decoded)

    def finish(self) -> str:
        """The text not given out yet, once the sequence is complete (an incomplete
        character at the end is given out as the tokenizer decodes it)."""
        decoded = self._decoded()
        if not decoded.startswith(self.text):
            # The tokenizer rewrote earlier text (rare: it cannot be taken back).
            return ""
        return self._give(decoded)

    def _give(self, decoded: str) -> str:
        delta = decoded[len(self.text) :]
        self.text = decoded
        return delta


@dataclass(frozen=True)
class TextDelta:
    """New text of prompt ``index``; ``finished``: its completion ends here (the last
    delta of each prompt has it, its text possibly empty)."""

    index: int
    text: str
    finished: bool = False


def text_deltas(steps: Iterable[GenerationStep], tokenizer: Any, rows: int) -> Iterator[TextDelta]:
    """The text deltas of a generation of ``rows`` sequences, step by step: at each step
    one delta per sequence that has new text or ends; every sequence ends with one
    ``finished`` delta (at its stop token, or after the last step)."""
    decoders = [IncrementalDecoder(tokenizer) for _ in range(rows)]
    done = [False] * rows
    for step in steps:
        tokens, finished = step.tokens.tolist(), step.finished.tolist()
        for index in range(rows):
            if done[index]:
                continue
            text = decoders[index].add(tokens[index])
            if finished[index]:
                done[index] = True
                yield TextDelta(index, text + decoders[index].finish(), finished=True)
            elif text:
                yield TextDelta(index, text)
    for index in range(rows):
        if not done[index]:
            yield TextDelta(index, decoders[index].finish(), finished=True)
