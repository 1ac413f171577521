"""Client-batch inside the backbone (no gRPC): the window, merged passes split back, one
step per merged batch, members that go away; and right padding leaves real tokens alone."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from backbone_kit import tiny_checkpoint
from helpers import wait_until
from modelkit import TINY_FAMILIES, padded_batch, tiny_model

from splitfed.errors import AbortedError, FailedPreconditionError
from splitfed.models import split_model
from splitfed.models.adapters import AdapterSettings, load_adapter_state
from splitfed.models.loading import load_part
from splitfed.models.optim import OptimizerSettings, grad_sq_norm
from splitfed.models.parts import SplitPart
from splitfed.services.backbone.sessions import Session
from splitfed.services.backbone.settings import BackboneSettings
from splitfed.services.backbone.state import BackboneState

LORA = AdapterSettings(kind="lora", r=4, alpha=8, seed=3)
OPTIMIZER = OptimizerSettings(learning_rate=1e-2)
HIDDEN = 64
FOREVER_MS = 600_000.0  # a window no test waits out: rounds close when everyone joined
ATOL = 1e-5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("client-batch") / "model")


@pytest.fixture
def make_state(model_path: Path) -> Iterator[Callable[..., BackboneState]]:
    states: list[BackboneState] = []

    def make(**overrides: Any) -> BackboneState:
        values: dict[str, Any] = {
            "adapter_mode": "shared",
            "batch_window_ms": FOREVER_MS,
            **overrides,
        }
        settings = BackboneSettings(model_path=model_path, client_batch=True, **values)
        states.append(BackboneState(settings))
        return states[-1]

    yield make
    for state in states:
        state.close()


def open_sessions(state: BackboneState, count: int) -> list[Session]:
    return [
        state.open_session(
            f"client/c{i}", model_id="", k=1, m=1, adapter=LORA, optimizer=OPTIMIZER, encoding="raw"
        )[0]
        for i in range(count)
    ]


def random_adapter(state: BackboneState, session: Session, seed: int = 0) -> dict[str, Any]:
    """Give the shared adapter random values (LoRA B starts at zero, which would leave
    A without a gradient) and return them."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.randn(t.shape, generator=gen) * 0.2
        for name, t in state.export_adapter(session).items()
    }
    state.import_adapter(session, tensors)
    return tensors


def reference_body(model_path: Path, adapter: dict[str, Any]) -> SplitPart:
    body = load_part(model_path, "body", 1, 1)
    LORA.apply(body)
    load_adapter_state(body, adapter)
    return body.train()


def inputs(seed: int, rows: int, tokens: int, left_pad: int = 0) -> tuple[Any, Any]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, tokens, HIDDEN, generator=gen)
    mask = torch.ones(rows, tokens, dtype=torch.int8)
    if left_pad:
        mask[-1, :left_pad] = 0
    return hidden, mask


def grad_for(h2: torch.Tensor, seed: int) -> torch.Tensor:
    """A dL/dh2 of the size a loss gives (a mean over thousands of outputs)."""
    return torch.randn(h2.shape, generator=torch.Generator().manual_seed(1000 + seed)) * 0.01


@dataclass
class Outcome:
    h2: torch.Tensor
    grad_h2: torch.Tensor
    grad_h1: torch.Tensor
    result: dict[str, Any]


def train_step(
    state: BackboneState,
    session: Session,
    seed: int,
    shape: tuple[int, int, int],
    *,
    started: threading.Barrier | None = None,
    client_sq: float = 0.0,
) -> Outcome:
    """One client's step on its own training stream: forward, backward, STEP."""
    hidden, mask = inputs(seed, *shape)
    with state.stream(session, training=True):
        if started is not None:
            started.wait(timeout=30)
        step = session.step + 1
        h2 = state.run_forward(session, step, 0, hidden, mask, train=True)
        grad = grad_for(h2, seed)
        grad_h1 = state.run_backward(session, step, 0, grad)
        result = state.run_step(session, step, client_sq, 0.0)
    return Outcome(h2, grad, grad_h1, result)


def results(futures: list[Future[Outcome]]) -> list[Outcome]:
    return [future.result(timeout=120) for future in futures]


# --- padding -------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_right_padding_to_a_merged_batch_leaves_every_real_token_alone(family: str) -> None:
    """What a merged pass does: rows of two batches of different lengths (one already
    left-padded), right-padded with zero hidden states and mask 0 to a common length and
    concatenated, give each real token the output it gets in its own batch."""
    model = tiny_model(family)
    width = model.config.hidden_size
    _, body, _ = split_model(copy.deepcopy(model), 1, 1)
    gen = torch.Generator().manual_seed(0)
    _, left_mask = padded_batch(batch=2, tokens=5, side="left")
    first = (torch.randn(2, 5, width, generator=gen), left_mask.to(torch.int8))
    second = (torch.randn(1, 9, width, generator=gen), torch.ones(1, 9, dtype=torch.int8))
    with torch.no_grad():
        alone = [body(hidden, mask) for hidden, mask in (first, second)]
        hidden = torch.cat([torch.cat([first[0], first[0].new_zeros(2, 4, width)], 1), second[0]])
        mask = torch.cat([torch.cat([first[1], first[1].new_zeros(2, 4)], 1), second[1]])
        merged = body(hidden, mask)
    real = first[1].bool()
    torch.testing.assert_close(merged[:2, :5][real], alone[0][real], atol=ATOL, rtol=0)
    torch.testing.assert_close(merged[2:], alone[1], atol=ATOL, rtol=0)


# --- settings ------------------------------------------------------------------------


def test_client_batch_settings_are_checked(model_path: Path) -> None:
    # Both adapter modes batch (per-client: multi-adapter passes).
    assert BackboneSettings(model_path=model_path, client_batch=True).client_batch
    for field, value in (
        ("batch_window_ms", -1.0),
        ("max_merged_sessions", 0),
        ("batch_timeout_s", 0.0),
    ):
        with pytest.raises(ValueError, match=field):
            BackboneSettings(model_path=model_path, adapter_mode="shared", **{field: value})


# --- merging -------------------------------------------------------------------------


def test_concurrent_steps_run_as_one_merged_pass_and_one_optimizer_step(
    make_state: Callable[..., BackboneState], model_path: Path, pool: ThreadPoolExecutor
) -> None:
    state = make_state()
    sessions = open_sessions(state, 3)
    adapter = random_adapter(state, sessions[0])
    shapes = [(2, 5, HIDDEN), (1, 9, HIDDEN), (2, 7, HIDDEN)]
    client_sq = [0.1, 0.2, 0.4]
    started = threading.Barrier(3)
    outcomes = results(
        [
            pool.submit(train_step, state, s, i, shapes[i], started=started, client_sq=client_sq[i])
            for i, s in enumerate(sessions)
        ]
    )
    assert state.batcher is not None
    assert list(state.batcher.pass_sizes) == [3] and state.batcher.rounds_applied == 1

    # Each session gets what it would get alone (padding stripped), forward and back.
    reference = reference_body(model_path, adapter)
    for index, outcome in enumerate(outcomes):
        hidden, mask = inputs(index, *shapes[index])
        hidden.requires_grad_(True)
        output = reference(hidden, mask)
        torch.testing.assert_close(outcome.h2, output.detach(), atol=ATOL, rtol=0)
        torch.autograd.backward(output, outcome.grad_h2)
        assert hidden.grad is not None
        torch.testing.assert_close(outcome.grad_h1, hidden.grad, atol=ATOL, rtol=0)

    # One step for all: the gradient of the mean of the members' losses, clipped by the
    # norm over the backbone and every client; each is told all but its own part.
    reference.zero_grad(set_to_none=True)
    losses = []
    for index, outcome in enumerate(outcomes):
        hidden, mask = inputs(index, *shapes[index])
        losses.append((reference(hidden, mask) * outcome.grad_h2).sum())
    (sum(losses) / len(losses)).backward()
    backbone_sq = grad_sq_norm(p for p in reference.parameters() if p.requires_grad)
    for index, outcome in enumerate(outcomes):
        others = sum(client_sq) - client_sq[index]
        assert outcome.result["backbone_grad_sq_norm"] == pytest.approx(
            backbone_sq + others, rel=1e-5
        )
        assert outcome.result["already_applied"] is False
        assert outcome.result["learning_rate"] == pytest.approx(OPTIMIZER.learning_rate)
    assert [s.step for s in sessions] == [1, 1, 1]

    # A repeated STEP is answered from the store and applies nothing.
    before = state.export_adapter(sessions[0])
    replay = state.run_step(sessions[1], 1, client_sq[1], 0.0)
    assert replay == {**outcomes[1].result, "already_applied": True}
    after = state.export_adapter(sessions[0])
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not all(torch.equal(before[n], adapter[n]) for n in before)  # it did step once


def test_a_single_client_is_not_kept_waiting_by_the_window(
    make_state: Callable[..., BackboneState], pool: ThreadPoolExecutor
) -> None:
    state = make_state()
    (session,) = open_sessions(state, 1)
    for _ in range(3):
        pool.submit(train_step, state, session, 0, (2, 6, HIDDEN)).result(timeout=60)
    assert state.batcher is not None
    assert list(state.batcher.pass_sizes) == [1, 1, 1] and session.step == 3


def test_the_window_closes_a_round_without_a_session_that_sends_nothing(
    make_state: Callable[..., BackboneState], pool: ThreadPoolExecutor
) -> None:
    state = make_state(batch_window_ms=50.0)
    active, idle = open_sessions(state, 2)
    first_done = threading.Event()

    def idle_client() -> Outcome:
        with state.stream(idle, training=True):
            first_done.wait(timeout=60)
        return train_step(state, idle, 1, (1, 4, HIDDEN))

    waiting = pool.submit(idle_client)
    assert active.step == 0
    pool.submit(train_step, state, active, 0, (1, 4, HIDDEN)).result(timeout=60)
    first_done.set()
    waiting.result(timeout=60)
    assert state.batcher is not None
    assert list(state.batcher.pass_sizes) == [1, 1]
    assert (active.step, idle.step) == (1, 1)


def test_a_round_does_not_wait_for_a_session_that_is_idle(
    make_state: Callable[..., BackboneState],
    pool: ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A session whose stream is open but whose last step came back longer ago than the
    window (and its client's usual turnaround) is not waited for: a lone active client
    steps at once, even with an hour's window."""
    clock = [time.monotonic()]
    monkeypatch.setattr("splitfed.services.backbone.batching.time.monotonic", lambda: clock[0])
    state = make_state(batch_window_ms=3_600_000, adapter_mode="per-client")
    active, idle = open_sessions(state, 2)
    started = threading.Barrier(2)
    results(
        [
            pool.submit(train_step, state, s, i, (1, 5, HIDDEN), started=started)
            for i, s in enumerate((active, idle))
        ]
    )
    assert state.batcher is not None and list(state.batcher.pass_sizes) == [2]
    with state.stream(idle, training=True):  # idle keeps a stream open
        clock[0] += 7200.0  # two hours later, only "active" steps
        train_step(state, active, 2, (1, 5, HIDDEN))
    assert list(state.batcher.pass_sizes) == [2, 1]
    assert (active.step, idle.step) == (2, 1)


def test_max_merged_sessions_splits_the_clients_into_rounds(
    make_state: Callable[..., BackboneState], pool: ThreadPoolExecutor
) -> None:
    state = make_state(max_merged_sessions=2)
    sessions = open_sessions(state, 3)
    started = threading.Barrier(3)
    results(
        [
            pool.submit(train_step, state, s, i, (1, 5, HIDDEN), started=started)
            for i, s in enumerate(sessions)
        ]
    )
    assert state.batcher is not None
    assert list(state.batcher.pass_sizes) == [2, 1] and state.batcher.rounds_applied == 2
    assert [s.step for s in sessions] == [1, 1, 1]


def test_per_client_rounds_run_without_waiting_for_each_other(
    make_state: Callable[..., BackboneState], pool: ThreadPoolExecutor
) -> None:
    """Per-client mode: while one session's round waits for its gradient, another
    session's round runs its whole step (in shared mode it would wait: one round at a
    time, each at the adapter the previous one left)."""
    state = make_state(adapter_mode="per-client")
    held, other = open_sessions(state, 2)
    hidden, mask = inputs(0, 1, 5)
    with state.stream(held, training=True):
        h2 = state.run_forward(held, 1, 0, hidden, mask, train=True)
        pool.submit(train_step, state, other, 1, (1, 6, HIDDEN)).result(timeout=30)
        assert (held.step, other.step) == (0, 1)
        state.run_backward(held, 1, 0, grad_for(h2, 0))
        state.run_step(held, 1, 0.0, 0.0)
    assert state.batcher is not None
    assert list(state.batcher.pass_sizes) == [1, 1] and state.batcher.rounds_applied == 2
    assert (held.step, other.step) == (1, 1)


def test_a_session_that_leaves_before_the_round_starts_just_leaves(
    make_state: Callable[..., BackboneState], pool: ThreadPoolExecutor
) -> None:
    state = make_state()
    stays, leaves = open_sessions(state, 2)
    opened = threading.Event()
    go = threading.Event()

    def leaving() -> None:
        with state.stream(leaves, training=True):
            opened.set()
            go.wait(timeout=60)

    left = pool.submit(leaving)
    assert opened.wait(timeout=60)
    # The round waits for the other open stream ...
    staying = pool.submit(train_step, state, stays, 0, (1, 4, HIDDEN))
    assert state.batcher is not None
    assert wait_until(lambda: state.batcher is not None and state.batcher.queued_sessions == 1)
    assert not staying.done()
    # ... until it closes without sending anything.
    go.set()
    left.result(timeout=60)
    assert staying.result(timeout=60).result["already_applied"] is False
    assert list(state.batcher.pass_sizes) == [1] and stays.step == 1


# --- members that go away ------------------------------------------------------------


def merged_forward(
    state: BackboneState, sessions: list[Session], pool: ThreadPoolExecutor
) -> tuple[list[torch.Tensor], list[threading.Event], list[Future[None]]]:
    """Open a training stream per session and run one merged forward of step 1; each
    stream stays open until its event is set."""
    started = threading.Barrier(len(sessions))
    forwarded = threading.Barrier(len(sessions) + 1)
    outputs: dict[int, torch.Tensor] = {}
    events = [threading.Event() for _ in sessions]

    def client(index: int) -> None:
        session = sessions[index]
        with state.stream(session, training=True):
            started.wait(timeout=30)
            hidden, mask = inputs(index, 1, 4)
            outputs[index] = state.run_forward(session, 1, 0, hidden, mask, train=True)
            forwarded.wait(timeout=30)
            events[index].wait(timeout=60)

    futures = [pool.submit(client, i) for i in range(len(sessions))]
    forwarded.wait(timeout=60)
    return [outputs[i] for i in range(len(sessions))], events, futures


def test_a_member_whose_stream_ends_aborts_the_round_and_nothing_is_applied(
    make_state: Callable[..., BackboneState], pool: ThreadPoolExecutor
) -> None:
    state = make_state()
    stays, leaves = open_sessions(state, 2)
    adapter = random_adapter(state, stays)
    outputs, events, futures = merged_forward(state, [stays, leaves], pool)
    events[1].set()  # its stream ends without a backward
    futures[1].result(timeout=60)
    with pytest.raises(AbortedError, match="ended its training stream"):
        state.run_backward(stays, 1, 0, torch.ones_like(outputs[0]))
    events[0].set()
    futures[0].result(timeout=60)
    assert (stays.step, leaves.step) == (0, 0)
    now = state.export_adapter(stays)
    assert all(torch.equal(now[n], adapter[n]) for n in adapter)
    # A new stream starts the step over, and it goes through (alone now).
    outcome = pool.submit(train_step, state, stays, 0, (1, 4, HIDDEN)).result(timeout=60)
    assert outcome.result["already_applied"] is False and stays.step == 1


def test_a_round_that_waits_too_long_for_a_member_is_given_up(
    make_state: Callable[..., BackboneState], pool: ThreadPoolExecutor
) -> None:
    state = make_state(batch_timeout_s=0.3)
    prompt, silent = open_sessions(state, 2)
    outputs, events, futures = merged_forward(state, [prompt, silent], pool)
    with pytest.raises(AbortedError, match=r"sent nothing for 0\.3 s"):
        state.run_backward(prompt, 1, 0, torch.ones_like(outputs[0]))
    # The silent one hears of it at its next frame.
    with pytest.raises(AbortedError, match="redo the step"):
        state.run_backward(silent, 1, 0, torch.ones_like(outputs[1]))
    for event in events:
        event.set()
    for future in futures:
        future.result(timeout=60)
    assert (prompt.step, silent.step) == (0, 0)
    started = threading.Barrier(2)
    results(
        [
            pool.submit(train_step, state, s, i, (1, 4, HIDDEN), started=started)
            for i, s in enumerate([prompt, silent])
        ]
    )
    assert (prompt.step, silent.step) == (1, 1)


def test_without_client_batch_shared_mode_refuses_a_second_concurrent_step(
    model_path: Path,
) -> None:
    """Two sessions on one shared adapter without client-batch: the second session's
    step is refused with a clear error while the first is mid-step (its STEP would
    corrupt the other's graph and gradients), and goes through once the first stepped
    or its stream ended."""
    state = BackboneState(BackboneSettings(model_path=model_path, adapter_mode="shared"))
    try:
        first, second = open_sessions(state, 2)
        random_adapter(state, first)
        hidden, mask = inputs(1, 2, 5)
        with state.stream(first, training=True):
            h2 = state.run_forward(first, 1, 0, hidden, mask, train=True)
            with (
                state.stream(second, training=True),
                pytest.raises(FailedPreconditionError, match="turn client_batch on"),
            ):
                state.run_forward(second, 1, 0, hidden, mask, train=True)
            state.run_backward(first, 1, 0, grad_for(h2, 1))
            state.run_step(first, 1, 0.0, 1.0)
        train_step(state, second, 2, (2, 5, HIDDEN))  # first is done: allowed
        assert second.step == 1
        # A stream that ends mid-step lets go of the adapter.
        with state.stream(first, training=True):
            state.run_forward(first, 2, 0, hidden, mask, train=True)
        train_step(state, second, 3, (2, 5, HIDDEN))
        assert second.step == 2
    finally:
        state.close()
