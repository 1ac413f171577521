"""Backbone quotas inside the process (no gRPC): forward passes awaiting their gradient
(count and graph memory, until the graph is freed), per-identity sessions, pending passes,
KV-cache bytes; the graph-memory estimate against what autograd really saves; finite
adapter imports; the shared adapter addressed by an admin; the settings that bound them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from backbone_kit import tiny_checkpoint
from modelkit import TINY_FAMILIES, tiny_model

from splitfed.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    LimitExceededError,
    PermissionDeniedError,
)
from splitfed.models import split_model
from splitfed.models.adapters import AdapterSettings
from splitfed.models.optim import OptimizerSettings
from splitfed.services.backbone.sessions import Session
from splitfed.services.backbone.settings import BackboneSettings
from splitfed.services.backbone.state import BackboneState

LORA = AdapterSettings(kind="lora", r=4, alpha=8, seed=3)
OPTIMIZER = OptimizerSettings(learning_rate=1e-2)
HIDDEN = 64


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("quotas") / "model")


@pytest.fixture
def make_state(model_path: Path) -> Iterator[Callable[..., BackboneState]]:
    states: list[BackboneState] = []

    def make(**overrides: Any) -> BackboneState:
        states.append(BackboneState(BackboneSettings(model_path=model_path, **overrides)))
        return states[-1]

    yield make
    for state in states:
        state.close()


def open_session(state: BackboneState, owner: str) -> Session:
    return state.open_session(
        owner, model_id="", k=1, m=1, adapter=LORA, optimizer=OPTIMIZER, encoding="raw"
    )[0]


def inputs(seed: int, rows: int = 1, tokens: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, tokens, HIDDEN, generator=gen), torch.ones(
        rows, tokens, dtype=torch.long
    )


def forward(state: BackboneState, session: Session, micro: int, **shape: int) -> torch.Tensor:
    hidden, mask = inputs(micro, **shape)
    return state.run_forward(session, session.step + 1, micro, hidden, mask, train=True)


def backward(state: BackboneState, session: Session, micro: int, h2: torch.Tensor) -> None:
    state.run_backward(session, session.step + 1, micro, torch.full_like(h2, 0.01))


# --- forward passes awaiting their gradient (issue 15, item 5) ----------------------


def test_a_session_cannot_keep_hundreds_of_graphs_awaiting_their_gradient(
    make_state: Callable[..., BackboneState],
) -> None:
    """Forwards of micro-batches 0..199 and never a backward: refused at the per-session
    cap; the passes already held still take their gradients and the step applies."""
    state = make_state()
    session = open_session(state, "client/greedy")
    outputs: list[torch.Tensor] = []

    def forwards() -> None:
        for micro in range(200):
            outputs.append(forward(state, session, micro))

    with state.stream(session, training=True):
        with pytest.raises(LimitExceededError, match="await their gradient"):
            forwards()
        assert len(outputs) == state.settings.max_pending_passes < 200
        for micro, h2 in enumerate(outputs):
            backward(state, session, micro, h2)
        result = state.run_step(session, 1, 0.0, 0.0)
    assert session.step == 1 and not result["already_applied"]


def test_pending_graph_memory_is_accounted_until_each_graph_is_freed(
    make_state: Callable[..., BackboneState],
) -> None:
    state = make_state()
    session = open_session(state, "client/a")
    assert state.usage("client/a").pending_bytes == 0
    with state.stream(session, training=True):
        h2 = forward(state, session, 0, rows=2, tokens=8)
        one = state.usage("client/a").pending_bytes
        # At least h1, h2 and one saved activation per block.
        assert one > 3 * h2.numel() * h2.element_size()
        forward(state, session, 1, rows=2, tokens=8)
        assert state.usage("client/a") == dataclasses.replace(
            state.usage("client/a"), sessions=1, pending_passes=2, pending_bytes=2 * one
        )
        backward(state, session, 0, h2)
        assert state.usage("client/a").pending_bytes == one
        state.queue.run(session.session_id, lambda: state.zero_grad(session))
        assert state.usage("client/a").pending_bytes == 0
        forward(state, session, 0, rows=2, tokens=8)
        assert state.usage().pending_bytes == one
    # A stream that ends mid-step frees its graphs; so does closing the session.
    assert state.usage().pending_bytes == 0
    with state.stream(session, training=True):
        forward(state, session, 0, rows=2, tokens=8)
    state.close_session(session.session_id, "client/a")
    assert state.usage() == dataclasses.replace(
        state.usage(), sessions=0, pending_passes=0, pending_bytes=0
    )


def test_graph_memory_budgets_refuse_a_pass_that_does_not_fit(
    make_state: Callable[..., BackboneState],
) -> None:
    probe = make_state()
    session = open_session(probe, "client/probe")
    with probe.stream(session, training=True):
        forward(probe, session, 0, rows=2, tokens=8)
        one = probe.usage().pending_bytes
    state = make_state(
        max_pending_bytes=int(2.5 * one), max_pending_bytes_per_identity=int(1.5 * one)
    )
    a, b, c = (open_session(state, f"client/{x}") for x in "abc")
    with (
        state.stream(a, training=True),
        state.stream(b, training=True),
        state.stream(c, training=True),
    ):
        h2 = forward(state, a, 0, rows=2, tokens=8)
        with pytest.raises(LimitExceededError, match="per identity"):
            forward(state, a, 1, rows=2, tokens=8)
        forward(state, b, 0, rows=2, tokens=8)
        with pytest.raises(LimitExceededError, match="all sessions"):
            forward(state, c, 0, rows=2, tokens=8)
        # Nothing lost: a's pass still takes its gradient, and then c fits.
        backward(state, a, 0, h2)
        state.run_step(a, 1, 0.0, 0.0)
        forward(state, c, 0, rows=2, tokens=8)
        # One pass larger than a whole budget is refused before it runs.
        with pytest.raises(LimitExceededError, match="smaller micro-batches"):
            forward(state, b, 1, rows=2, tokens=64)
    assert state.usage().pending_bytes == 0


def test_pending_passes_are_capped_per_identity(make_state: Callable[..., BackboneState]) -> None:
    state = make_state(max_pending_passes=2, max_pending_passes_per_identity=3)
    first, second = open_session(state, "client/a"), open_session(state, "client/a")
    other = open_session(state, "client/b")
    with (
        state.stream(first, training=True),
        state.stream(second, training=True),
        state.stream(other, training=True),
    ):
        forward(state, first, 0)
        forward(state, first, 1)
        forward(state, second, 0)
        with pytest.raises(LimitExceededError, match="per identity"):
            forward(state, second, 1)
        forward(state, other, 0)
        forward(state, other, 1)


def test_client_batch_caps_the_passes_a_session_keeps_awaiting_gradients(
    make_state: Callable[..., BackboneState],
) -> None:
    state = make_state(
        adapter_mode="shared", client_batch=True, batch_window_ms=0.0, max_pending_passes=2
    )
    session = open_session(state, "client/a")
    with state.stream(session, training=True):
        outputs = [forward(state, session, 0), forward(state, session, 1)]
        assert state.usage("client/a").pending_passes == 2
        assert state.usage("client/a").pending_bytes > 0
        with pytest.raises(LimitExceededError, match="await their gradient"):
            forward(state, session, 2)
        for micro, h2 in enumerate(outputs):
            backward(state, session, micro, h2)
        state.run_step(session, 1, 0.0, 0.0)
    assert session.step == 1 and state.usage().pending_bytes == 0


# --- per-identity quotas (issue 15, item 6) -----------------------------------------


def test_one_identity_cannot_take_every_session(make_state: Callable[..., BackboneState]) -> None:
    state = make_state()
    opened: list[Session] = []

    def open_all() -> None:
        for _ in range(state.settings.max_sessions):
            opened.append(open_session(state, "client/greedy"))

    with pytest.raises(LimitExceededError, match="per identity"):
        open_all()
    assert len(opened) < state.settings.max_sessions
    open_session(state, "client/honest")  # the others are still served


def test_kv_cache_bytes_are_capped_per_identity(make_state: Callable[..., BackboneState]) -> None:
    probe = make_state()
    session = open_session(probe, "client/probe")
    hidden, mask = inputs(0, rows=1, tokens=16)
    probe.generate(session, hidden, mask)
    cache = session.cache_bytes
    state = make_state(max_cache_bytes=4 * cache, max_cache_bytes_per_identity=int(1.5 * cache))
    first, second = open_session(state, "client/a"), open_session(state, "client/a")
    state.generate(first, hidden, mask)
    with pytest.raises(LimitExceededError, match="per identity"):
        state.generate(second, hidden, mask)
    state.generate(open_session(state, "client/b"), hidden, mask)
    state.reset_cache(first)
    state.generate(second, hidden, mask)


def test_quota_settings_are_validated(model_path: Path) -> None:
    for field, value in (
        ("max_sessions_per_identity", -1),
        ("max_sessions_per_identity", 65),
        ("max_streams_per_identity", 33),
        ("max_cache_bytes_per_identity", (4 << 30) + 1),
        ("max_pending_passes", 0),
        ("max_pending_passes_per_identity", 8),
        ("max_pending_bytes_per_identity", (4 << 30) + 1),
    ):
        with pytest.raises(ValueError, match=field):
            BackboneSettings(model_path=model_path, **{field: value})


# --- the graph-memory estimate ------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize(
    "adapter",
    [
        AdapterSettings(kind="lora", r=4, alpha=8, dropout=0.1, seed=1),
        AdapterSettings(kind="prefix", prefix_length=5, seed=1),
    ],
    ids=["lora", "prefix"],
)
def test_graph_estimate_covers_what_autograd_saves(family: str, adapter: AdapterSettings) -> None:
    """The estimate (fitted from three small probe passes) is at least what the graph
    of a real pass holds, and not far above it."""
    from splitfed.services.backbone.quotas import GraphCost, measure_graph

    model = tiny_model(family)
    body = split_model(model, 1, 1).body
    adapter.apply(body)
    body.train()
    cost = GraphCost.calibrate(body, model.config.hidden_size)
    gen = torch.Generator().manual_seed(0)
    for rows, tokens in ((3, 100), (2, 37), (1, 9)):
        hidden = torch.randn(rows, tokens, model.config.hidden_size, generator=gen)
        mask = torch.ones(rows, tokens, dtype=torch.long)
        mask[-1, :2] = 0
        _, held = measure_graph(body, hidden.requires_grad_(True), mask)
        estimate = cost.estimate(rows, tokens)
        assert held <= estimate <= 1.25 * held, (rows, tokens, held, estimate)


# --- adapter imports (issue 15, item 7) ---------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_an_adapter_import_that_is_not_finite_is_refused_and_changes_nothing(
    make_state: Callable[..., BackboneState], bad: float
) -> None:
    state = make_state()
    session = open_session(state, "client/a")
    before = state.export_adapter(session)
    poisoned = {name: t.clone() for name, t in before.items()}
    name = sorted(poisoned)[0]
    poisoned[name].view(-1)[0] = bad
    with pytest.raises(InvalidArgumentError, match="not finite"):
        state.import_adapter(session, poisoned)
    after = state.export_adapter(session)
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_the_shared_adapter_is_addressed_by_admins_and_refused_to_clients(
    make_state: Callable[..., BackboneState],
) -> None:
    per_client = make_state()
    with pytest.raises(FailedPreconditionError, match="per-client"):
        per_client.shared_adapter()
    state = make_state(adapter_mode="shared")
    with pytest.raises(FailedPreconditionError, match="no session has opened"):
        state.shared_adapter()
    session = open_session(state, "client/a")
    with pytest.raises(PermissionDeniedError, match="only an admin or an aggregator"):
        state.check_adapter_access(session, "client", importing=True)
    with pytest.raises(PermissionDeniedError, match="export_shared_adapter"):
        state.check_adapter_access(session, "client", importing=False)
    state.check_adapter_access(session, "aggregator", importing=True)
    shared = state.shared_adapter()
    tensors = {n: torch.full_like(t, 0.5) for n, t in state.export_adapter(shared).items()}
    assert state.import_adapter(shared, tensors) == len(tensors)
    exported = state.export_adapter(session)
    assert all(torch.equal(exported[n], tensors[n]) for n in tensors)
    # Not while a session is in the middle of a step on it.
    with state.stream(session, training=True):
        forward(state, session, 0)
        with pytest.raises(FailedPreconditionError, match="in the middle of a step"):
            state.import_adapter(shared, tensors)
    opened = make_state(adapter_mode="shared", export_shared_adapter=True)
    opened.check_adapter_access(open_session(opened, "client/a"), "client", importing=False)


# --- workers, streams and the diagnostics section -----------------------------------


def _backbone_config(model_path: Path, **sections: dict[str, Any]) -> Any:
    from splitfed.cli.configs import BackboneConfig

    return BackboneConfig.from_mapping({"backbone": {"model_path": str(model_path)}, **sections})


def test_stream_caps_stay_below_the_server_worker_count(model_path: Path) -> None:
    from splitfed.services.backbone.settings import server_workers

    config = _backbone_config(model_path)
    needed = config.backbone.max_streams + config.diagnostics.max_streams
    # Unset, the worker count is derived, with room for unary calls and health checks.
    assert server_workers(config) > needed
    with pytest.raises(ValueError, match=r"\[server\] max_workers"):
        _backbone_config(model_path, server={"max_workers": 16})
    small = _backbone_config(
        model_path,
        backbone={"model_path": str(model_path), "max_streams": 4, "max_streams_per_identity": 2},
        server={"max_workers": 16},
    )
    assert server_workers(small) == 16


def test_diagnostics_on_services_are_sized_for_a_link_check(model_path: Path) -> None:
    from splitfed.services.diagnostics.settings import DiagnosticsSettings

    defaults = _backbone_config(model_path).diagnostics
    assert defaults.max_tensor_bytes == 64 << 20
    assert defaults.max_buffered_bytes <= 4 * defaults.max_tensor_bytes
    assert defaults.max_streams_per_identity < defaults.max_streams <= 4
    custom = _backbone_config(model_path, diagnostics={"max_tensor_bytes": 1 << 20})
    assert custom.diagnostics.limits().max_tensor_bytes == 1 << 20
    with pytest.raises(ValueError, match="max_buffered_bytes"):
        DiagnosticsSettings(max_tensor_bytes=2 << 20, max_buffered_bytes=1 << 20)
    with pytest.raises(ValueError, match="max_streams_per_identity"):
        DiagnosticsSettings(max_streams=1, max_streams_per_identity=2)


def test_a_generation_step_of_another_batch_than_its_cache_is_refused(
    make_state: Callable[..., BackboneState],
) -> None:
    """Found by the fuzzer (make fuzz): a decode step with more rows than the prefill that
    filled the session's KV cache ended in INTERNAL (torch.cat in the cache)."""
    state = make_state()
    session = open_session(state, "client/a")
    hidden, mask = inputs(1, rows=3, tokens=2)
    state.generate(session, hidden, mask)
    step, _ = inputs(2, rows=4, tokens=1)
    with pytest.raises(InvalidArgumentError, match="holds 3 rows"):
        state.generate(session, step, torch.ones(4, 3, dtype=torch.long))
    state.reset_cache(session)  # a new generation may have another batch
    assert state.generate(session, step, torch.ones(4, 1, dtype=torch.long)).shape[0] == 4
