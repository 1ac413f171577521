"""Client-batch over real mTLS, backbone in its own process: four clients' concurrent
steps run as one merged pass and one optimizer step whose gradient is the one of their
concatenated batch run centrally; each client gets back its own results; a client that
goes away makes the others redo the step, and the trainer does so by itself. In
per-client mode, three sessions' concurrent steps run as multi-adapter passes and each
trains exactly as it would alone."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from backbone_kit import Deployment, deployment

from splitfed.clients.backbone import BackboneClient, StreamLostError, TrainStream
from splitfed.clients.trainer import SplitTrainer, TrainSettings
from splitfed.models.adapters import AdapterSettings, adapter_state, load_adapter_state
from splitfed.models.loading import load_part
from splitfed.models.optim import (
    OptimizerSettings,
    build_optimizer,
    clip_factor,
    grad_sq_norm,
    scale_grads,
)
from splitfed.models.parts import SplitPart
from splitfed.models.tiny import BUNDLED_DATASET
from splitfed.protocol.backbone import SessionRequest
from splitfed.services.backbone.adapters_io import SHARED_ADAPTER
from splitfed.v1 import backbone_pb2

LORA = AdapterSettings(kind="lora", r=4, alpha=8, seed=3)
# AdamW's first step moves each tensor by lr * g / (|g| + eps): with lr = eps = 1000 that
# is g itself to within |g| / 1000, so the adapter after one step shows the gradient.
LINEAR = OptimizerSettings(learning_rate=1000.0, eps=1000.0)
HIDDEN = 64
ATOL = 1e-5
# Sequence lengths of the four clients (two rows each): the merged pass pads to 12.
LENGTHS = (6, 12, 9, 4)


def open_session(
    client: BackboneClient, optimizer: OptimizerSettings = LINEAR, adapter: AdapterSettings = LORA
) -> str:
    o = optimizer
    request = SessionRequest(
        k=1,
        m=1,
        adapter=adapter,
        optimizer=OptimizerSettings(learning_rate=o.learning_rate, eps=o.eps),
    )
    return client.open_session(request).session_id


@dataclass
class Inputs:
    hidden: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor


def client_inputs(index: int) -> Inputs:
    """Two rows of ``LENGTHS[index]`` tokens; client 2's second row is left-padded."""
    gen = torch.Generator().manual_seed(index)
    tokens = LENGTHS[index]
    hidden = torch.randn(2, tokens, HIDDEN, generator=gen)
    mask = torch.ones(2, tokens, dtype=torch.int8)
    if index == 2:
        mask[1, :3] = 0
    return Inputs(hidden, mask, torch.randn(2, tokens, HIDDEN, generator=gen))


def sample_losses(h2: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One loss per row: over its real tokens, a linear and a quadratic term of h2."""
    per_token = (h2 * weights).sum(-1) + 0.05 * h2.pow(2).sum(-1)
    real = mask.to(h2.dtype)
    return (per_token * real).sum(-1) / real.sum(-1)


def reference_body(model_path: Path, adapter: dict[str, torch.Tensor]) -> SplitPart:
    body = load_part(model_path, "body", 1, 1)
    LORA.apply(body)
    load_adapter_state(body, adapter)
    return body.train()


@dataclass
class ClientRun:
    h2: torch.Tensor
    grad_h2: torch.Tensor
    grad_h1: torch.Tensor
    result: backbone_pb2.StepResult
    replay: backbone_pb2.StepResult


def run_client(
    dep: Deployment, index: int, session: str, ready: threading.Barrier, client_sq: float
) -> ClientRun:
    channel, client = dep.connect(f"hospital-{index}")
    with channel:
        data = client_inputs(index)
        stream = TrainStream(client, session, "raw")
        # An eval forward: the backbone has this stream open before anyone trains.
        stream.forward(1, 0, data.hidden, data.mask, train=False)
        ready.wait(timeout=60)
        h2 = stream.forward(1, 0, data.hidden, data.mask)
        leaf = h2.clone().requires_grad_(True)
        sample_losses(leaf, data.mask, data.weights).mean().backward()
        assert leaf.grad is not None
        grad_h1 = stream.backward(1, 0, leaf.grad)
        result = stream.step(1, client_sq, 0.0)
        replay = stream.step(1, client_sq, 0.0)  # as a client that missed the reply
        stream.close()
    return ClientRun(h2, leaf.grad, grad_h1, result, replay)


@pytest.fixture
def backbone(tmp_path: Path) -> Iterator[Deployment]:
    # A window nobody waits out: the round closes when every open stream has joined.
    dep = deployment(tmp_path, adapter_mode="shared", client_batch=True, batch_window_ms=6e5)
    dep.start()
    yield dep
    dep.stop()


def test_four_clients_in_one_merged_pass_match_their_concatenated_batch_run_centrally(
    backbone: Deployment,
) -> None:
    channel, owner = backbone.connect("hospital-0")
    admin_channel, admin = backbone.connect("operator", role="admin")
    with channel, admin_channel:
        first = open_session(owner)
        # Random adapter values, so that every adapter tensor gets a gradient (only an
        # admin may replace the shared adapter).
        gen = torch.Generator().manual_seed(42)
        initial = {
            name: torch.randn(t.shape, generator=gen) * 0.2
            for name, t in admin.export_adapter(SHARED_ADAPTER).items()
        }
        admin.import_adapter(SHARED_ADAPTER, initial)
    sessions = [first]
    for index in range(1, 4):
        channel, client = backbone.connect(f"hospital-{index}")
        with channel:
            sessions.append(open_session(client))

    client_sq = [0.5, 1.0, 1.5, 2.0]
    ready = threading.Barrier(4)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [
            pool.submit(run_client, backbone, i, sessions[i], ready, client_sq[i]) for i in range(4)
        ]
        runs = [future.result(timeout=120) for future in futures]
    channel, admin = backbone.connect("operator", role="admin")
    with channel:
        served = admin.export_adapter(SHARED_ADAPTER)

    # Centrally: the four batches concatenated (right-padded to the longest), the mean
    # loss over all eight samples (the mean of the clients' losses: equal batch sizes).
    body = reference_body(backbone.model_path, initial)
    params = [p for p in body.parameters() if p.requires_grad]
    data = [client_inputs(i) for i in range(4)]
    length = max(LENGTHS)

    def padded(tensor: torch.Tensor) -> torch.Tensor:
        extra = (tensor.shape[0], length - tensor.shape[1], *tensor.shape[2:])
        return torch.cat([tensor, tensor.new_zeros(extra)], dim=1)

    hidden = torch.cat([padded(d.hidden) for d in data])
    mask = torch.cat([padded(d.mask) for d in data])
    weights = torch.cat([padded(d.weights) for d in data])
    sample_losses(body(hidden, mask), mask, weights).mean().backward()
    central_sq = grad_sq_norm(params)
    optimizer, _ = build_optimizer(params, LINEAR)
    optimizer.step()
    expected = adapter_state(body)
    assert served.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(served[name], tensor, atol=ATOL, rtol=0, msg=name)
    assert any(not torch.equal(served[n], initial[n]) for n in initial)

    # Every client: its own h2 and dL/dh1, as if it had been alone.
    alone = reference_body(backbone.model_path, initial)
    for index, run in enumerate(runs):
        d = data[index]
        h1 = d.hidden.clone().requires_grad_(True)
        h2 = alone(h1, d.mask)
        torch.testing.assert_close(run.h2, h2.detach(), atol=ATOL, rtol=0)
        h2.backward(run.grad_h2)
        assert h1.grad is not None
        torch.testing.assert_close(run.grad_h1, h1.grad, atol=ATOL, rtol=0)
        # One step for all; each is told the squared norm of everything but its own part.
        others = sum(client_sq) - client_sq[index]
        assert run.result.backbone_grad_sq_norm == pytest.approx(central_sq + others, rel=1e-5)
        assert not run.result.already_applied
        assert run.result.learning_rate == pytest.approx(LINEAR.learning_rate)
        assert run.replay.already_applied
        assert run.replay.backbone_grad_sq_norm == run.result.backbone_grad_sq_norm


def test_a_client_that_goes_away_makes_the_others_redo_the_step(backbone: Deployment) -> None:
    optimizer = OptimizerSettings(learning_rate=1e-2)
    a_channel, a = backbone.connect("hospital-a")
    b_channel, b = backbone.connect("bank-b")
    with a_channel, b_channel:
        sessions = [open_session(a, optimizer), open_session(b, optimizer)]
        streams = [TrainStream(a, sessions[0], "raw"), TrainStream(b, sessions[1], "raw")]
        data = [client_inputs(0), client_inputs(1)]
        for stream, d in zip(streams, data, strict=True):
            stream.forward(1, 0, d.hidden, d.mask, train=False)
        with ThreadPoolExecutor(max_workers=2) as pool:
            h2 = list(
                pool.map(lambda i: streams[i].forward(1, 0, data[i].hidden, data[i].mask), range(2))
            )
        streams[1].close()  # b goes away between its forward and its backward
        with pytest.raises(StreamLostError, match="ABORTED"):
            streams[0].backward(1, 0, torch.full_like(h2[0], 0.01))
        streams[0].close()
        # a redoes the step on a new stream; it goes through without b.
        again = TrainStream(a, sessions[0], "raw")
        out = again.forward(1, 0, data[0].hidden, data[0].mask)
        again.backward(1, 0, torch.full_like(out, 0.01))
        result = again.step(1, 0.0, 1.0)
        again.close()
        assert not result.already_applied and result.backbone_grad_sq_norm > 0


def test_trainers_with_accumulation_train_together(tmp_path: Path) -> None:
    """Two SplitTrainers (two micro-batches per step) on one client-batch backbone, one
    sequential and one pipelined (its window 1 there: the sequential order on the wire,
    which merged passes need): they finish, and both sessions see the one adapter they
    trained (which this deployment lets clients read: export_shared_adapter)."""
    dep = deployment(
        tmp_path,
        adapter_mode="shared",
        client_batch=True,
        batch_window_ms=200.0,
        export_shared_adapter=True,
    )
    dep.start()
    try:
        optimizer = OptimizerSettings(learning_rate=5e-3)

        def train(identity: str) -> tuple[list[float], str]:
            channel, client = dep.connect(identity)
            with channel:
                settings = TrainSettings(
                    data=BUNDLED_DATASET,
                    model_path=dep.model_path,
                    max_steps=3,
                    batch_size=2,
                    accumulation=2,
                    max_length=32,
                    pipeline_window=0 if identity == "hospital-a" else 4,
                )
                trainer = SplitTrainer(client, settings, LORA, optimizer)
                reports = trainer.run()
                trainer.close()
                assert trainer.window == (0 if identity == "hospital-a" else 1)
                assert trainer.session is not None
                return [r.loss for r in reports], trainer.session.session_id

        identities = ["hospital-a", "bank-b"]
        with ThreadPoolExecutor(max_workers=2) as pool:
            outcomes = list(pool.map(train, identities))
        adapters = []
        for identity, (_, session) in zip(identities, outcomes, strict=True):
            channel, client = dep.connect(identity)
            with channel:
                adapters.append(client.export_adapter(session))
    finally:
        dep.stop()
    for losses, _ in outcomes:
        assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])


# Per-client mode: AdamW with an eps well above float noise, so that a gradient element
# near zero cannot turn rounding differences into a full step.
PER_CLIENT_OPTIMIZER = OptimizerSettings(learning_rate=1e-2, eps=1e-3)
PER_CLIENT_STEPS = 4
MAX_NORM = 0.05  # every step clips, each session by its own norm


def step_inputs(index: int, step: int) -> Inputs:
    """Session ``index``'s micro-batch of ``step``: two rows of ``LENGTHS[index]`` tokens."""
    gen = torch.Generator().manual_seed(100 * index + step)
    tokens = LENGTHS[index]
    hidden = torch.randn(2, tokens, HIDDEN, generator=gen)
    mask = torch.ones(2, tokens, dtype=torch.int8)
    if index == 2:
        mask[1, :3] = 0
    return Inputs(hidden, mask, torch.randn(2, tokens, HIDDEN, generator=gen))


def forward_passes(address: str) -> float:
    """The backbone's forward jobs so far (its /metrics)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    name = 'splitfed_backbone_compute_seconds_count{operation="forward"}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_per_client_sessions_in_multi_adapter_passes_train_as_they_would_alone(
    tmp_path: Path,
) -> None:
    dep = deployment(
        tmp_path,
        adapter_mode="per-client",
        client_batch=True,
        batch_window_ms=6e5,
        server={"metrics_port": 0},
    )
    dep.start()
    clients = 3
    client_sq = [0.0001, 0.0004, 0.0009]
    try:
        metrics = dep.metrics
        sessions, initial = [], []
        for index in range(clients):
            channel, client = dep.connect(f"hospital-{index}")
            with channel:
                adapter = AdapterSettings(kind="lora", r=2 + index, alpha=8, seed=index)
                session = open_session(client, PER_CLIENT_OPTIMIZER, adapter)
                # Random values: LoRA B starts at zero, which leaves A without a gradient.
                gen = torch.Generator().manual_seed(10 + index)
                tensors = {
                    name: torch.randn(t.shape, generator=gen) * 0.2
                    for name, t in client.export_adapter(session).items()
                }
                client.import_adapter(session, tensors)
                sessions.append(session)
                initial.append((adapter, tensors))
        ready = threading.Barrier(clients)

        def train(index: int) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
            channel, client = dep.connect(f"hospital-{index}")
            losses, norms = [], []
            with channel:
                stream = TrainStream(client, sessions[index], "raw")
                first = step_inputs(index, 1)
                stream.forward(1, 0, first.hidden, first.mask, train=False)  # stream open
                ready.wait(timeout=60)
                for step in range(1, PER_CLIENT_STEPS + 1):
                    data = step_inputs(index, step)
                    leaf = stream.forward(step, 0, data.hidden, data.mask).requires_grad_(True)
                    loss = sample_losses(leaf, data.mask, data.weights).mean()
                    loss.backward()
                    assert leaf.grad is not None
                    stream.backward(step, 0, leaf.grad)
                    result = stream.step(step, client_sq[index], MAX_NORM)
                    losses.append(float(loss.detach()))
                    norms.append(result.backbone_grad_sq_norm)
                stream.close()
                return losses, norms, client.export_adapter(sessions[index])

        with ThreadPoolExecutor(max_workers=clients) as pool:
            runs = list(pool.map(train, range(clients)))
        # One forward job per step for all three (the eval forwards that opened the
        # streams run as continuous-batching passes, not forward jobs).
        assert forward_passes(metrics) == PER_CLIENT_STEPS
    finally:
        dep.stop()

    # Each session alone, one after the other: its own clipping and AdamW.
    for index, (losses, norms, served) in enumerate(runs):
        adapter, tensors = initial[index]
        body = load_part(dep.model_path, "body", 1, 1)
        adapter.apply(body)
        load_adapter_state(body, tensors)
        body.train()
        params = [p for p in body.parameters() if p.requires_grad]
        optimizer, scheduler = build_optimizer(params, PER_CLIENT_OPTIMIZER)
        for step in range(1, PER_CLIENT_STEPS + 1):
            data = step_inputs(index, step)
            loss = sample_losses(body(data.hidden, data.mask), data.mask, data.weights).mean()
            loss.backward()
            backbone_sq = grad_sq_norm(params)
            scale_grads(params, clip_factor(backbone_sq + client_sq[index], MAX_NORM))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # Losses of some 100: float32 rounding of a merged pass is ~1e-7 of that.
            assert losses[step - 1] == pytest.approx(float(loss.detach()), rel=ATOL)
            assert norms[step - 1] == pytest.approx(backbone_sq, rel=1e-4)
        expected = adapter_state(body)
        assert served.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(served[name], tensor, atol=ATOL, rtol=0, msg=name)
            assert not torch.equal(served[name], tensors[name]), name
