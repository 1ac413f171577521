"""Multi-adapter batched passes (models/multi_adapter.py): sessions that each own a LoRA
adapter on bodies sharing one frozen body run as one pass, and that pass equals running
the sessions one by one (outputs, losses, every adapter gradient, the adapters after 10
AdamW steps), with no gradient crossing from one session's rows to another's adapter."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from modelkit import SESSIONS, SHAPES, micro_batch, session_body, shared_body, tiny_model

from splitfed.models import Body, split_model
from splitfed.models.adapters import AdapterSettings, adapter_state
from splitfed.models.multi_adapter import MultiAdapterBody
from splitfed.models.optim import OptimizerSettings, build_optimizer

ATOL = 1e-5


def loss_of(output: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """A stand-in for the client's loss on h2: a fixed random projection of real tokens."""
    generator = torch.Generator().manual_seed(1000 + seed)
    target = torch.randn(output.shape[-1], generator=generator) / output.shape[-1]
    return ((output @ target) * mask).pow(2).sum() / mask.sum()


def client_side(output: torch.Tensor, mask: torch.Tensor, seed: int) -> tuple[float, torch.Tensor]:
    """What the client does with h2: its loss, and dL/dh2 (sent back to the backbone)."""
    received = output.detach().requires_grad_(True)
    loss = loss_of(received, mask, seed)
    loss.backward()
    assert received.grad is not None
    return float(loss.detach()), received.grad


class Session:
    def __init__(self, frozen: Body, index: int) -> None:
        self.index = index
        self.body = session_body(frozen, SESSIONS[index])
        params = [p for p in self.body.parameters() if p.requires_grad]
        self.optimizer, _ = build_optimizer(params, OptimizerSettings(learning_rate=1e-2))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, tokens = SHAPES[self.index]
        return micro_batch(100 * step + self.index, rows, tokens)


def sessions(count: int = len(SESSIONS)) -> list[Session]:
    frozen = shared_body()
    return [Session(frozen, index) for index in range(count)]


def max_diff(a: Any, b: Any) -> float:
    return float((a - b).detach().abs().max())


def test_batched_pass_equals_sessions_one_by_one_for_ten_steps() -> None:
    alone, batched = sessions(3), sessions(3)  # ranks 4, 4, 2; 2, 1 and 3 rows
    for a, b in zip(alone, batched, strict=True):
        for (name, x), y in zip(
            adapter_state(a.body).items(), adapter_state(b.body).values(), strict=True
        ):
            torch.testing.assert_close(x, y, atol=0, rtol=0, msg=name)
    worst = {"output": 0.0, "loss": 0.0, "grad": 0.0, "h1 grad": 0.0, "adapter": 0.0}
    for step in range(10):
        batches = [s.batch(step) for s in alone]
        # One by one, as the backbone runs each session today.
        reference = []
        for session, (hidden, mask) in zip(alone, batches, strict=True):
            h1 = hidden.clone().requires_grad_(True)
            output = session.body(h1, mask)
            loss, grad = client_side(output, mask, session.index)
            output.backward(grad)  # the client sends dL/dh2; the backbone backs it up
            reference.append((output.detach(), loss, h1.grad))
        # One batched pass over every session's rows.
        multi = MultiAdapterBody([s.body for s in batched])
        inputs = [hidden.clone().requires_grad_(True) for hidden, _ in batches]
        outputs = multi(inputs, [mask for _, mask in batches])
        sent = [
            client_side(o, m, s.index)
            for o, (_, m), s in zip(outputs, batches, batched, strict=True)
        ]
        torch.autograd.backward(outputs, [grad for _, grad in sent])  # one for all sessions
        for index, (output, loss, h1_grad) in enumerate(reference):
            worst["output"] = max(worst["output"], max_diff(outputs[index], output))
            worst["loss"] = max(worst["loss"], abs(sent[index][0] - loss))
            worst["h1 grad"] = max(worst["h1 grad"], max_diff(inputs[index].grad, h1_grad))
            expected = adapter_state(alone[index].body, grads=True)
            got = adapter_state(batched[index].body, grads=True)
            assert set(got) == set(expected) and len(got) == 16  # 2 blocks x q,k,v,o x A,B
            for name, grad in expected.items():
                worst["grad"] = max(worst["grad"], max_diff(got[name], grad))
        for session in alone + batched:
            session.optimizer.step()
            session.optimizer.zero_grad(set_to_none=True)
        for a, b in zip(alone, batched, strict=True):
            got = adapter_state(b.body)
            for name, tensor in adapter_state(a.body).items():
                worst["adapter"] = max(worst["adapter"], max_diff(got[name], tensor))
    print("max differences batched vs one by one:", worst)
    assert all(value <= ATOL for value in worst.values()), worst
    # The adapters moved and stayed distinct: the test compared something.
    first = adapter_state(batched[0].body)
    assert any(max_diff(first[n], t) > 1e-3 for n, t in adapter_state(batched[1].body).items())


def one_pass_equals_each_alone(
    group: list[Body], batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[dict[str, torch.Tensor]]:
    """One multi-adapter forward and backward of ``group`` against each body alone:
    every output and every adapter gradient within ATOL; each body's gradients alone."""
    multi = MultiAdapterBody(group)
    outputs = multi([h for h, _ in batches], [m for _, m in batches])
    sent = [
        client_side(o, m, i) for i, (o, (_, m)) in enumerate(zip(outputs, batches, strict=True))
    ]
    torch.autograd.backward(outputs, [grad for _, grad in sent])
    batched = [adapter_state(body, grads=True) for body in group]
    for body in group:
        body.zero_grad(set_to_none=True)
    grads = []
    for index, (body, (hidden, mask)) in enumerate(zip(group, batches, strict=True)):
        output = body(hidden, mask)
        torch.testing.assert_close(outputs[index], output, atol=ATOL, rtol=0)
        output.backward(client_side(output, mask, index)[1])
        alone = adapter_state(body, grads=True)
        assert set(alone) == set(batched[index])
        for name, grad in alone.items():
            torch.testing.assert_close(batched[index][name], grad, atol=ATOL, rtol=0, msg=name)
        grads.append(alone)
    return grads


def test_equal_micro_batches_and_ranks_take_the_grouped_matmul_and_agree() -> None:
    frozen = shared_body()
    group = [session_body(frozen, SESSIONS[i]) for i in (0, 1, 3)]  # all r=4
    batches = [micro_batch(50 + i, 2, 6) for i in range(3)]
    one_pass_equals_each_alone(group, batches)


def test_rows_of_one_session_give_no_gradient_to_another_sessions_adapter() -> None:
    group = sessions(3)
    batches = [s.batch(0) for s in group]
    multi = MultiAdapterBody([s.body for s in group])
    outputs = multi([h for h, _ in batches], [m for _, m in batches])
    # Only session 1's rows carry a loss.
    loss_of(outputs[1], batches[1][1], 1).backward()
    for index, session in enumerate(group):
        grads = [p.grad for p in session.body.parameters() if p.requires_grad]
        if index == 1:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None or not g.any() for g in grads)
    frozen = [p for p in group[0].body.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_eval_pass_without_grad_equals_each_session_alone() -> None:
    group = sessions()
    for session in group:
        session.body.eval()
    batches = [s.batch(7) for s in group]
    multi = MultiAdapterBody([s.body for s in group]).eval()
    with torch.no_grad():
        outputs = multi([h for h, _ in batches], [m for _, m in batches])
        for session, output, (hidden, mask) in zip(group, outputs, batches, strict=True):
            assert output.shape == hidden.shape and not output.requires_grad
            torch.testing.assert_close(output, session.body(hidden, mask), atol=ATOL, rtol=0)


def test_p_tuning_v2_sessions_batch_with_a_prefix_per_row() -> None:
    frozen = shared_body()
    lengths = (3, 5, 2)  # shorter prefixes are left-padded with masked slots
    group = [
        session_body(frozen, AdapterSettings(kind="prefix", prefix_length=n, seed=20 + i))
        for i, n in enumerate(lengths)
    ]
    batches = [micro_batch(70 + i, *SHAPES[i]) for i in range(3)]
    grads = one_pass_equals_each_alone(group, batches)
    assert all(len(alone) == 4 for alone in grads)  # 2 blocks x keys, values


def test_bodies_that_do_not_share_the_frozen_weights_or_split_are_refused() -> None:
    frozen = shared_body()
    one = session_body(frozen, SESSIONS[0])
    other = session_body(shared_body(), SESSIONS[1])
    with pytest.raises(ValueError, match="share"):
        MultiAdapterBody([one, other])
    wider = split_model(tiny_model("llama", layers=5), 1, 1).body
    wider.requires_grad_(False)
    with pytest.raises(ValueError, match="blocks"):
        MultiAdapterBody([one, session_body(wider, SESSIONS[1])])
    prefixed = session_body(frozen, AdapterSettings(kind="prefix", prefix_length=2, seed=5))
    with pytest.raises(ValueError, match="different adapter kinds"):
        MultiAdapterBody([one, prefixed])
    with pytest.raises(ValueError, match="at least one"):
        MultiAdapterBody([])


def test_inputs_must_match_the_sessions() -> None:
    group = sessions(2)
    multi = MultiAdapterBody([s.body for s in group])
    hidden, mask = group[0].batch(0)
    with pytest.raises(ValueError, match="2 sessions"):
        multi([hidden], [mask])
    with pytest.raises(ValueError, match="mask"):
        multi([hidden, hidden], [mask, mask[:, :-1]])
