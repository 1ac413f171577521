"""Pipelined split steps: the micro-batches of a step in flight on the Train stream at
once, so the link and both sides' processors work at the same time.

The sequential step (``head -> RemoteBody -> tail -> backward`` per micro-batch) waits
for two round trips per micro-batch while neither side computes. Here the autograd is
cut at the body: ``h1 = head(...)`` keeps its graph and ``h1.detach()`` is sent without
waiting; when ``h2`` of micro-batch ``i`` arrives it becomes a leaf that requires grad,
tail + loss + backward run, and its ``.grad`` (dL/dh2) is sent without waiting; when
dL/dh1 of ``i`` arrives, ``torch.autograd.backward(h1_i, dL/dh1)`` finishes the head.
Meanwhile the head of the next micro-batch has already run and up to ``window`` forwards
await their gradient on the backbone, so the step's time approaches the largest of client
compute, backbone compute and transfer instead of their sum.

**Order on the wire.** The backbone answers a stream's requests one at a time in the
order they arrive (``services/backbone/handlers.py`` ``handle_train`` is one loop, also
with client-batch), so answers come in the order sent; each is checked against what was
expected (op, step, micro-batch). A FORWARD is sent only while fewer than ``window``
forwards await their BACKWARD; since the backbone reads in the same order, that bounds
the passes it holds for the session (its ``max_pending_passes``). With ``window`` 1 the
order on the wire is the sequential one (FORWARD i, BACKWARD i, FORWARD i+1, ...), which
client-batch needs (a merged pass waits for every member's request of that micro-batch);
the head of ``i + 1`` still runs while the backbone works on ``i``.

**Same result.** Every micro-batch goes through the same operations as in the sequential
step, and the gradients of head, tail and body accumulate in the same micro-batch order,
so losses and adapters equal the sequential step's (tested within 1e-5). Dropout in head
or tail draws its masks from the client's RNG in a different order (heads run ahead of
tails): equality holds at dropout 0 (the default); perturbation noise is keyed by
(release, micro-batch) and is the same in both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch

from splitfed.protocol.backbone import ModelInfo
from splitfed.v1 import backbone_pb2

# TrainSettings.pipeline_window's default: four micro-batches in flight put a whole step
# of the usual 4-micro-batch accumulation on the link at once (one round trip per step
# instead of two per micro-batch), hold at most four head graphs here and four pending
# passes on the backbone: a quarter of its default max_pending_passes (16), so an
# identity (default quota 32) can train eight sessions at once.
DEFAULT_WINDOW = 4
# The backbone's default max_pending_passes, assumed where its ModelInfo does not say.
BACKBONE_PENDING_PASSES = 16

FORWARD = backbone_pb2.TRAIN_OP_FORWARD
EVAL = backbone_pb2.TRAIN_OP_EVAL
BACKWARD = backbone_pb2.TRAIN_OP_BACKWARD


class PipeStream(Protocol):
    """What the schedule needs of a Train stream (:class:`~.backbone.TrainStream`)."""

    def send_forward(
        self, step: int, micro: int, hidden: torch.Tensor, mask: torch.Tensor, *, train: bool = True
    ) -> None: ...

    def send_backward(self, step: int, micro: int, grad: torch.Tensor) -> None: ...

    def receive(self) -> tuple[Any, torch.Tensor]: ...


class MicroBatch(Protocol):
    @property
    def input_ids(self) -> torch.Tensor: ...

    @property
    def attention_mask(self) -> torch.Tensor: ...


B = TypeVar("B", bound=MicroBatch)

# (input_ids, attention_mask) -> h1; (h2, attention_mask) -> logits.
Part = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (tensor, attention_mask, micro) -> the tensor to send (perturbation).
Hook = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def window_for(requested: int, info: ModelInfo) -> int:
    """The window to use against a backbone described by ``info``: ``requested``, at
    most its ``max_pending_passes`` (:data:`BACKBONE_PENDING_PASSES` where it does not
    say), and 1 with client-batch (whose merged passes need the sequential order)."""
    if requested < 1:
        raise ValueError(f"the pipeline window must be >= 1, got {requested}")
    if info.client_batch:
        return 1
    return min(requested, info.max_pending_passes or BACKBONE_PENDING_PASSES)


def _check(message: Any, op: int, step: int, micro: int) -> None:
    got = (message.op, message.step, message.micro_batch)
    if got != (op, step, micro):
        raise RuntimeError(
            f"the backbone answered (op {got[0]}, step {got[1]}, micro-batch {got[2]}) where "
            f"(op {op}, step {step}, micro-batch {micro}) was next"
        )


def pipelined_step(
    stream: PipeStream,
    step: int,
    batches: Sequence[B],
    *,
    head: Part,
    tail: Part,
    loss: Callable[[torch.Tensor, B], torch.Tensor],
    window: int,
    hidden_hook: Hook | None = None,
    grad_hook: Hook | None = None,
) -> float:
    """The forward and backward passes of ``step`` over ``batches``, up to ``window``
    forwards awaiting their gradient on the backbone; the gradients are left in the
    parameters' ``.grad`` (head, tail) and on the backbone (body), as the sequential step
    leaves them. Each micro-batch's loss is ``loss(logits, batch) / len(batches)``;
    returns their sum. ``hidden_hook`` turns h1 into what is sent (and back-propagated
    through), ``grad_hook`` dL/dh2 into what is sent (perturbation)."""
    if window < 1:
        raise ValueError(f"the pipeline window must be >= 1, got {window}")
    count = len(batches)
    expected: deque[tuple[int, int]] = deque()  # answers awaited (op, micro), in order
    heads: dict[int, torch.Tensor] = {}  # h1 with the head's graph, until dL/dh1 comes
    ahead: torch.Tensor | None = None  # h1 of micro-batch ``sent``, computed ahead
    sent = awaiting = 0  # forwards sent; of them, those whose BACKWARD is not
    total = 0.0

    def run_head(micro: int) -> torch.Tensor:
        batch = batches[micro]
        hidden = head(batch.input_ids, batch.attention_mask)
        if hidden_hook is not None:
            hidden = hidden_hook(hidden, batch.attention_mask, micro)
        return hidden

    while sent < count or expected:
        while sent < count and awaiting < window:
            hidden = ahead if ahead is not None else run_head(sent)
            ahead = None
            stream.send_forward(step, sent, hidden.detach(), batches[sent].attention_mask)
            heads[sent] = hidden
            expected.append((FORWARD, sent))
            sent, awaiting = sent + 1, awaiting + 1
        if ahead is None and sent < count:
            ahead = run_head(sent)  # while the backbone works on what was sent
        op, micro = expected.popleft()
        message, tensor = stream.receive()
        _check(message, op, step, micro)
        h1 = heads[micro]
        if op == FORWARD:
            batch = batches[micro]
            h2 = tensor.to(h1.device, h1.dtype).requires_grad_(True)
            value = loss(tail(h2, batch.attention_mask), batch) / count
            torch.autograd.backward(value)
            total += float(value.detach())
            assert h2.grad is not None
            grad = h2.grad
            if grad_hook is not None:
                grad = grad_hook(grad, batch.attention_mask, micro)
            stream.send_backward(step, micro, grad.contiguous())
            expected.append((BACKWARD, micro))
            awaiting -= 1
        else:
            del heads[micro]
            if h1.requires_grad:  # a head with nothing to train has no graph
                torch.autograd.backward(h1, tensor.to(h1.device, h1.dtype))
    return total


@torch.no_grad()
def pipelined_eval(
    stream: PipeStream,
    step: int,
    batches: Sequence[B],
    *,
    head: Part,
    tail: Part,
    loss: Callable[[torch.Tensor, B], torch.Tensor],
    window: int,
    hidden_hook: Hook | None = None,
) -> list[float]:
    """Evaluation passes (EVAL: the backbone keeps nothing) of ``batches``, up to
    ``window`` in flight; each batch's ``loss(logits, batch)``."""
    if window < 1:
        raise ValueError(f"the pipeline window must be >= 1, got {window}")
    count, sent, losses = len(batches), 0, []
    like: dict[int, tuple[torch.device, torch.dtype]] = {}  # where each h1 was
    for micro, batch in enumerate(batches):
        while sent < count and sent - micro < window:
            item = batches[sent]
            hidden = head(item.input_ids, item.attention_mask)
            if hidden_hook is not None:
                hidden = hidden_hook(hidden, item.attention_mask, sent)
            stream.send_forward(step, sent, hidden, item.attention_mask, train=False)
            like[sent] = (hidden.device, hidden.dtype)
            sent += 1
        message, h2 = stream.receive()
        _check(message, EVAL, step, micro)
        h2 = h2.to(*like.pop(micro))
        losses.append(float(loss(tail(h2, batch.attention_mask), batch)))
    return losses
