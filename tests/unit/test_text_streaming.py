"""Streamed text (clients/streaming.py): deltas never split a character, never take text
back, and joined equal the decoded sequence; and the replaying body stage rebuilds the
backbone's cache from exactly what it sent (clients/backbone.py RemoteBodyStage)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from splitfed.clients.backbone import RemoteBodyStage, StreamLostError
from splitfed.clients.streaming import REPLACEMENT, IncrementalDecoder, text_deltas
from splitfed.models.generation import GenerationStep
from splitfed.models.tiny import train_tokenizer

TEXTS = ["Add 1 and 2.", "héllo wörld, 日本語 and emoji 🎉🎉 done", "  spaced   out  "]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_tokenizer(["Add 1 and 2. The capital of a country.", "hello world"])


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_the_decoded_text_and_never_split_a_character(
    tokenizer: Any, text: str
) -> None:
    ids = [tokenizer.eos_token_id, *tokenizer.encode(text), tokenizer.eos_token_id]
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.add(token) for token in ids]
    deltas.append(decoder.finish())
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any(REPLACEMENT in delta for delta in deltas)
    # A multi-byte character spans several byte-level tokens: some steps add nothing.
    if any(ord(c) > 127 for c in text):
        assert "" in deltas[1:-2]


def test_an_incomplete_character_at_the_end_is_given_out_by_finish(tokenizer: Any) -> None:
    ids = tokenizer.encode("a🎉")[:-1]  # the emoji cut short
    decoder = IncrementalDecoder(tokenizer)
    assert "".join(decoder.add(t) for t in ids) == "a"
    assert decoder.finish() == tokenizer.decode(ids)[1:]


def test_text_deltas_follow_each_sequence_until_it_finishes(tokenizer: Any) -> None:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    first, second = tokenizer.encode("hello world"), tokenizer.encode("日本")
    length = max(len(first), len(second)) + 2
    filler = tokenizer.encode("x")[0]
    # The first stops (then pads, as SplitGenerator does); the second runs to the end.
    rows = [first + [eos] + [pad] * (length - len(first) - 1)]
    rows.append(second + [filler] * (length - len(second)))
    done = [False, False]
    steps = []
    for t in range(length):
        tokens = torch.tensor([rows[0][t], rows[1][t]])
        done[0] = done[0] or rows[0][t] == eos
        steps.append(GenerationStep(tokens, torch.tensor(done)))
    deltas = list(text_deltas(steps, tokenizer, 2))
    texts = ["", ""]
    for delta in deltas:
        texts[delta.index] += delta.text
    assert texts == ["hello world", tokenizer.decode(rows[1])]
    # One finished delta each: the first at its stop token, the second after the last step.
    finished = [d for d in deltas if d.finished]
    assert [d.index for d in finished] == [0, 1]
    assert deltas.index(finished[0]) < len(deltas) - 1
    assert not any(d.index == 0 for d in deltas[deltas.index(finished[0]) + 1 :])


class FakeStream:
    """A Generate stream that records what reaches the backbone and loses itself once."""

    def __init__(self, log: list[tuple[str, Any]], lose_at: int | None = None) -> None:
        self.log, self.lose_at, self.forwards = log, lose_at, 0

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        if self.forwards == self.lose_at:
            raise StreamLostError("lost")
        self.log.append(("forward", (hidden, mask)))
        return hidden * 2

    def reset(self) -> None:
        self.log.append(("reset", None))


def test_a_lost_stream_is_rebuilt_from_what_was_sent() -> None:
    log: list[tuple[str, Any]] = []
    first = FakeStream(log, lose_at=3)
    fresh = FakeStream(log)
    stage = RemoteBodyStage(first, lambda: fresh)  # type: ignore[arg-type]
    stage.reset()
    prompt, mask = torch.randn(2, 4, 8), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    steps = [(prompt, mask)]
    for n in range(1, 4):
        steps.append((torch.randn(2, 1, 8), torch.cat([mask, torch.ones(2, n)], 1).long()))
    outputs = [stage.step(h, m) for h, m in steps]
    for (hidden, _), output in zip(steps, outputs, strict=True):
        assert torch.equal(output, hidden * 2)
    assert stage.recoveries == 1 and stage.stream is fresh
    kinds = [kind for kind, _ in log]
    # First stream: reset, prompt, token 1; lost at token 2; then on the fresh stream:
    # reset, the prompt as sent, token 1 (the tokens so far, one forward), token 2 again.
    assert kinds[:7] == ["reset", "forward", "forward", "reset", "forward", "forward", "forward"]
    (_, (h, m)), (_, (ht, mt)), (_, (h2, _)) = log[4], log[5], log[6]
    assert h.data_ptr() == prompt.data_ptr() and m is mask  # kept, not copied
    assert torch.equal(ht, steps[1][0]) and torch.equal(mt, steps[1][1])
    assert h2.data_ptr() == steps[2][0].data_ptr()
    assert [kind for kind, _ in log[7:]] == ["forward"]  # token 3: as usual


def test_without_a_way_to_reconnect_a_lost_stream_is_the_callers() -> None:
    stage = RemoteBodyStage(FakeStream([], lose_at=1))  # type: ignore[arg-type]
    with pytest.raises(StreamLostError):
        stage.step(torch.zeros(1, 2, 8), torch.ones(1, 2))
