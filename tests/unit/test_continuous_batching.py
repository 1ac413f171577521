"""Continuous batching of generation in the backbone (services/backbone/decoding.py):
steps of sessions waiting together run as one pass, each session gets what its body
gives alone on its own cache, a long prompt runs in chunks between other sessions'
decode steps, and one session's refusal or departure touches no other session."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from backbone_kit import tiny_checkpoint

from splitfed.errors import AbortedError, LimitExceededError
from splitfed.models.adapters import AdapterSettings, adapter_state
from splitfed.models.optim import OptimizerSettings
from splitfed.models.parts import PartCache
from splitfed.services.backbone.sessions import Session
from splitfed.services.backbone.settings import BackboneSettings
from splitfed.services.backbone.state import BackboneState

HIDDEN = 64
ATOL = 1e-5
# fp32: merged passes sum in another order (padding, batched matmuls); values reach ~10.
RTOL = 1e-4
OPTIMIZER = OptimizerSettings(learning_rate=1e-2)
# Three LoRA sessions (distinct ranks and values) and a P-Tuning v2 one (its own pass).
ADAPTERS = (
    AdapterSettings(kind="lora", r=4, alpha=8, seed=1),
    AdapterSettings(kind="lora", r=2, alpha=8, seed=2),
    AdapterSettings(kind="lora", r=4, alpha=16, seed=3),
    AdapterSettings(kind="prefix", prefix_length=3, seed=4),
)
# Each session's prompt: (rows, tokens).
PROMPTS = ((2, 6), (1, 9), (2, 4), (1, 5))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("continuous") / "model")


@pytest.fixture
def make_state(model_path: Path) -> Iterator[Callable[..., BackboneState]]:
    states: list[BackboneState] = []

    def make(**overrides: Any) -> BackboneState:
        settings = BackboneSettings(model_path=model_path, adapter_mode="per-client", **overrides)
        states.append(BackboneState(settings))
        return states[-1]

    yield make
    for state in states:
        state.close()


def open_session(state: BackboneState, index: int) -> Session:
    adapter = ADAPTERS[index]
    session = state.open_session(
        f"client/{index}",
        model_id="",
        k=1,
        m=1,
        adapter=adapter,
        optimizer=OPTIMIZER,
        encoding="raw",
    )[0]
    generator = torch.Generator().manual_seed(100 + index)
    with torch.no_grad():  # LoRA B starts at zero: random values make each adapter count
        for tensor in adapter_state(session.body).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return session


class Steps:
    """One session's generation steps (h1 and the mask its client extends) and what its
    own body gives for them alone, on a cache of its own."""

    def __init__(self, session: Session, rows: int, tokens: int, seed: int) -> None:
        self.session, self.seed = session, seed
        self.reference: PartCache = session.body.new_cache()
        self.mask = torch.ones(rows, 0, dtype=torch.long)
        self.rows, self.first = rows, tokens

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.first if self.mask.shape[1] == 0 else 1
        self.seed += 1
        generator = torch.Generator().manual_seed(self.seed)
        hidden = torch.randn(self.rows, tokens, HIDDEN, generator=generator)
        new = torch.ones(self.rows, tokens, dtype=torch.long)
        if self.mask.shape[1] == 0 and self.rows > 1:
            new[1, :2] = 0  # a left-padded row in the prompt
        self.mask = torch.cat([self.mask, new], -1)
        return hidden, self.mask

    def alone(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            output: torch.Tensor = self.session.body(hidden, mask, self.reference)
        return output


def waiting(state: BackboneState) -> int:
    assert state.decoder is not None
    return state.decoder.waiting


def timed(call: Callable[..., torch.Tensor], *args: Any) -> tuple[torch.Tensor, float]:
    return call(*args), time.monotonic()


def evaluation(state: BackboneState) -> Callable[..., torch.Tensor]:
    def forward(session: Session, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return state.run_forward(session, 1, 0, hidden, mask, train=False)

    return forward


def submit_together(
    state: BackboneState,
    pool: ThreadPoolExecutor,
    steps: list[tuple[Session, Any, Any]],
    *,
    evaluate: bool = False,
) -> list[Future[tuple[torch.Tensor, float]]]:
    """Submit ``steps`` (generation steps, or with ``evaluate`` EVAL forwards) while the
    compute queue is busy, so the next pass finds them all waiting (as concurrent
    streams' steps arrive during a pass); each future gives h2 and when it came back."""
    release = threading.Event()
    state.queue.submit("busy", release.wait)
    call = evaluation(state) if evaluate else state.generate
    futures = [pool.submit(timed, call, *step) for step in steps]
    deadline = time.monotonic() + 30
    while waiting(state) < len(steps) and time.monotonic() < deadline:
        time.sleep(0.005)
    release.set()
    return futures


def test_waiting_steps_run_as_one_pass_and_equal_each_session_alone(
    make_state: Callable[..., BackboneState], pool: ThreadPoolExecutor
) -> None:
    state = make_state()
    assert state.decoder is not None
    sequences = [
        Steps(open_session(state, i), *PROMPTS[i], seed=10 * i) for i in range(len(ADAPTERS))
    ]
    for step in range(4):  # the prompts, then three decode steps
        present = sequences if step != 2 else sequences[1:]  # session 0 sits one out
        inputs = [s.next() for s in present]
        futures = submit_together(
            state, pool, [(s.session, h, m) for s, (h, m) in zip(present, inputs, strict=True)]
        )
        for sequence, future, (hidden, mask) in zip(present, futures, inputs, strict=True):
            output, _ = future.result(timeout=60)
            torch.testing.assert_close(output, sequence.alone(hidden, mask), atol=ATOL, rtol=RTOL)
            assert sequence.session.cache is not None
            assert sequence.session.cache.length == mask.shape[1]
            assert sequence.session.cache_bytes == sequence.reference.nbytes()
    # The LoRA sessions ran together (3; 2 while session 0 sat out), the prefix one apart.
    assert list(state.decoder.pass_sizes) == [3, 1, 3, 1, 2, 1, 3, 1]


def test_a_long_prompt_runs_in_chunks_between_other_sessions_decode_steps(
    make_state: Callable[..., BackboneState], pool: ThreadPoolExecutor
) -> None:
    state = make_state(max_pass_tokens=4)
    assert state.decoder is not None
    decoding = Steps(open_session(state, 0), 2, 2, seed=1)
    long = Steps(open_session(state, 1), 2, 9, seed=2)
    hidden, mask = decoding.next()  # its prompt: 2 rows x 2 tokens, one pass
    torch.testing.assert_close(
        state.generate(decoding.session, hidden, mask), decoding.alone(hidden, mask)
    )
    prompt = long.next()
    step = decoding.next()
    # The prompt is older; its first chunk runs first, then the decode step, then the rest.
    futures = submit_together(state, pool, [(long.session, *prompt), (decoding.session, *step)])
    (h2_long, long_done), (h2_step, step_done) = (f.result(timeout=60) for f in futures)
    torch.testing.assert_close(h2_long, long.alone(*prompt), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(h2_step, decoding.alone(*step), atol=ATOL, rtol=RTOL)
    assert step_done < long_done  # the decode step did not wait for the whole prompt
    # 2 rows x 2 positions per pass: the prompt in five chunks (2, 2, 2, 2, 1).
    assert max(state.decoder.pass_tokens) <= 4
    assert list(state.decoder.pass_sizes)[-6:] == [1] * 6


def test_a_refused_step_fails_alone_and_a_closed_sessions_step_is_aborted(
    make_state: Callable[..., BackboneState], pool: ThreadPoolExecutor
) -> None:
    probe = make_state()
    session = open_session(probe, 0)
    probe.generate(session, *Steps(session, 1, 16, seed=0).next())
    one_cache = session.cache_bytes
    state = make_state(
        max_cache_bytes_per_identity=int(1.5 * one_cache), max_cache_bytes=8 * one_cache
    )
    big = open_session(state, 0)
    state.generate(big, *Steps(big, 1, 16, seed=0).next())
    second = state.open_session(
        "client/0", model_id="", k=1, m=1, adapter=ADAPTERS[0], optimizer=OPTIMIZER, encoding="raw"
    )[0]
    other = Steps(open_session(state, 1), 1, 5, seed=3)
    step = other.next()
    futures = submit_together(
        state, pool, [(second, *Steps(second, 1, 16, seed=5).next()), (other.session, *step)]
    )
    with pytest.raises(LimitExceededError, match="per identity"):
        futures[0].result(timeout=60)
    torch.testing.assert_close(
        futures[1].result(timeout=60)[0], other.alone(*step), atol=ATOL, rtol=0
    )
    assert second.cache_bytes == 0
    # A session that closes while its step waits: the step ends with ABORTED.
    release = threading.Event()
    state.queue.submit("busy", release.wait)
    waiting_step = pool.submit(state.generate, other.session, *other.next())
    while waiting(state) < 1:
        time.sleep(0.005)
    state.close_session(other.session.session_id, other.session.owner)
    release.set()
    with pytest.raises(AbortedError, match="closed"):
        waiting_step.result(timeout=60)


def test_evaluation_forwards_merge_and_leave_the_generation_caches_alone(
    make_state: Callable[..., BackboneState], pool: ThreadPoolExecutor
) -> None:
    state = make_state()
    assert state.decoder is not None
    sessions = [open_session(state, i) for i in range(len(ADAPTERS))]
    inputs = [Steps(s, *PROMPTS[i], seed=50 + i).next() for i, s in enumerate(sessions)]
    futures = submit_together(
        state, pool, [(s, h, m) for s, (h, m) in zip(sessions, inputs, strict=True)], evaluate=True
    )
    for session, future, (hidden, mask) in zip(sessions, futures, inputs, strict=True):
        with torch.no_grad():
            alone = session.body(hidden, mask)
        torch.testing.assert_close(future.result(timeout=60)[0], alone, atol=ATOL, rtol=RTOL)
        assert session.cache is None and session.cache_bytes == 0
    assert list(state.decoder.pass_sizes) == [3, 1]


def test_adapters_the_grouped_op_lacks_run_apart_and_still_answer(
    make_state: Callable[..., BackboneState],
    pool: ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(bodies: object) -> None:
        raise ValueError("fan-in-fan-out does not batch")

    monkeypatch.setattr("splitfed.services.backbone.decoding.MultiAdapterBody", refuse)
    state = make_state()
    assert state.decoder is not None
    steps = [Steps(open_session(state, i), *PROMPTS[i], seed=60 + i) for i in range(3)]
    inputs = [s.next() for s in steps]
    futures = submit_together(
        state, pool, [(s.session, h, m) for s, (h, m) in zip(steps, inputs, strict=True)]
    )
    for sequence, future, (hidden, mask) in zip(steps, futures, inputs, strict=True):
        output, _ = future.result(timeout=60)
        torch.testing.assert_close(output, sequence.alone(hidden, mask), atol=ATOL, rtol=RTOL)
    assert list(state.decoder.pass_sizes) == [1, 1, 1]
