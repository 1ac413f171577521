"""The pipelined schedule (clients/pipeline.py) against a fake Train stream: its order on
the wire, the window bound, and that it leaves the gradients the sequential step leaves."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from splitfed.clients.pipeline import (
    BACKBONE_PENDING_PASSES,
    BACKWARD,
    EVAL,
    FORWARD,
    pipelined_eval,
    pipelined_step,
    window_for,
)
from splitfed.protocol.backbone import ModelInfo
from splitfed.v1 import backbone_pb2

VOCAB, WIDTH = 11, 6


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class FakeStream:
    """A backbone whose body is ``h2 = h1 * weight``, answering requests in the order
    sent (as the real one does); it logs every send and receive, and counts the forwards
    awaiting their BACKWARD as the backbone would when it reads each."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.requests: deque[tuple[int, int, int, torch.Tensor]] = deque()
        self.log: list[tuple[str, int]] = []
        self.pending = self.most_pending = 0

    def send_forward(
        self, step: int, micro: int, hidden: torch.Tensor, mask: torch.Tensor, *, train: bool = True
    ) -> None:
        assert not hidden.requires_grad  # only the tensor travels, never the graph
        self.log.append(("send forward", micro))
        if train:
            self.pending += 1
            self.most_pending = max(self.most_pending, self.pending)
        self.requests.append((FORWARD if train else EVAL, step, micro, hidden.clone()))

    def send_backward(self, step: int, micro: int, grad: torch.Tensor) -> None:
        self.log.append(("send backward", micro))
        self.pending -= 1
        self.requests.append((BACKWARD, step, micro, grad.clone()))

    def receive(self) -> tuple[Any, torch.Tensor]:
        op, step, micro, tensor = self.requests.popleft()
        self.log.append(("receive backward" if op == BACKWARD else "receive forward", micro))
        message = backbone_pb2.TrainResponse(op=op, step=step, micro_batch=micro)
        return message, tensor * self.weight


class Ends(torch.nn.Module):
    """A head (embedding) and a tail (linear to the vocabulary) with a fixed init."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.out = torch.nn.Linear(WIDTH, VOCAB)

    def head(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) * mask.unsqueeze(-1)

    def tail(self, h2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(h2))


def loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch.input_ids.reshape(-1))


def hidden_hook(h: torch.Tensor, mask: torch.Tensor, micro: int) -> torch.Tensor:
    return h * (1.0 + 0.1 * micro)


def grad_hook(g: torch.Tensor, mask: torch.Tensor, micro: int) -> torch.Tensor:
    return g * (2.0 - 0.1 * micro)


def batches(count: int) -> list[Batch]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (2, 4), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 3] = 0
        out.append(Batch(ids, mask))
    return out


WEIGHT = torch.linspace(0.5, 1.5, WIDTH)


class _Body(torch.autograd.Function):
    """The sequential path's body: h1 * WEIGHT; its backward perturbs dL/dh2 first, as
    the trainer's hook on h2 does."""

    @staticmethod
    def forward(ctx: Any, h1: torch.Tensor, micro: int) -> torch.Tensor:
        ctx.micro = micro
        return h1.detach() * WEIGHT

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_hook(grad, grad, ctx.micro) * WEIGHT, None


def sequential(ends: Ends, items: list[Batch]) -> float:
    total = 0.0
    for micro, batch in enumerate(items):
        h1 = hidden_hook(
            ends.head(batch.input_ids, batch.attention_mask), batch.attention_mask, micro
        )
        h2 = _Body.apply(h1, micro)
        value = loss(ends.tail(h2, batch.attention_mask), batch) / len(items)
        value.backward()
        total += float(value.detach())
    return total


def pipelined(ends: Ends, items: list[Batch], window: int) -> tuple[float, FakeStream]:
    stream = FakeStream(WEIGHT)
    total = pipelined_step(
        stream,
        7,
        items,
        head=ends.head,
        tail=ends.tail,
        loss=loss,
        window=window,
        hidden_hook=hidden_hook,
        grad_hook=grad_hook,
    )
    return total, stream


@pytest.mark.parametrize("window", [1, 2, 3, 5, 8])
def test_the_pipelined_step_leaves_the_sequential_steps_loss_and_gradients(window: int) -> None:
    items = batches(5)
    reference = Ends()
    expected = sequential(reference, items)
    ends = Ends()
    total, stream = pipelined(ends, items, window)
    assert total == pytest.approx(expected, abs=1e-6)
    for (name, got), want in zip(ends.named_parameters(), reference.parameters(), strict=True):
        assert got.grad is not None and want.grad is not None, name
        torch.testing.assert_close(got.grad, want.grad, atol=1e-6, rtol=0)
    assert not stream.requests and stream.pending == 0  # every answer was taken


def test_forwards_of_later_micro_batches_go_out_before_the_first_answer_is_used() -> None:
    _, stream = pipelined(Ends(), batches(5), window=3)
    log = stream.log
    first_answer = log.index(("receive forward", 0))
    assert ("send forward", 1) in log[:first_answer]
    assert ("send forward", 2) in log[:first_answer]
    assert ("send forward", 3) not in log[:first_answer]  # the window is full
    assert stream.most_pending == 3  # the window bound held, and was used


@pytest.mark.parametrize("window", [1, 2, 4])
def test_the_window_bounds_the_forwards_awaiting_their_gradient(window: int) -> None:
    _, stream = pipelined(Ends(), batches(6), window)
    assert stream.most_pending == window


def test_window_one_sends_in_the_sequential_order_but_does_not_wait_for_dh1() -> None:
    _, stream = pipelined(Ends(), batches(3), window=1)
    sends = [entry for entry in stream.log if entry[0].startswith("send")]
    assert sends == [
        ("send forward", 0),
        ("send backward", 0),
        ("send forward", 1),
        ("send backward", 1),
        ("send forward", 2),
        ("send backward", 2),
    ]
    # micro-batch 1 goes out before dL/dh1 of micro-batch 0 is taken
    assert stream.log.index(("send forward", 1)) < stream.log.index(("receive backward", 0))


def test_an_answer_out_of_order_is_refused() -> None:
    class Swapped(FakeStream):
        def receive(self) -> tuple[Any, torch.Tensor]:
            if len(self.requests) >= 2:
                self.requests.rotate(-1)
            return super().receive()

    with pytest.raises(RuntimeError, match="micro-batch 0\\) was next"):
        pipelined_step(
            Swapped(WEIGHT), 1, batches(3), head=Ends().head, tail=Ends().tail, loss=loss, window=3
        )


def test_pipelined_evaluation_equals_one_pass_after_the_other() -> None:
    items, ends = batches(5), Ends()
    with torch.no_grad():
        expected = [
            float(
                loss(
                    ends.tail(ends.head(b.input_ids, b.attention_mask) * WEIGHT, b.attention_mask),
                    b,
                )
            )
            for b in items
        ]
    stream = FakeStream(WEIGHT)
    got = pipelined_eval(stream, 3, items, head=ends.head, tail=ends.tail, loss=loss, window=2)
    assert got == pytest.approx(expected, abs=1e-6)
    assert stream.log[:3] == [("send forward", 0), ("send forward", 1), ("receive forward", 0)]


def test_the_window_stays_within_what_the_backbone_admits() -> None:
    assert window_for(4, ModelInfo(max_pending_passes=16)) == 4
    assert window_for(32, ModelInfo(max_pending_passes=6)) == 6
    assert window_for(32, ModelInfo()) == BACKBONE_PENDING_PASSES  # an older backbone
    assert window_for(4, ModelInfo(max_pending_passes=16, client_batch=True)) == 1
    with pytest.raises(ValueError, match=">= 1"):
        window_for(0, ModelInfo())
