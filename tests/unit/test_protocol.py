"""The contract package: every dataclass survives to_proto -> from_proto unchanged, the
framed channel's two sides agree, and importing a client registers no service metric."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from prometheus_client import REGISTRY

from splitfed.errors import InvalidArgumentError
from splitfed.models.adapters import AdapterSettings
from splitfed.models.optim import OptimizerSettings
from splitfed.protocol.aggregator import Peer, Phase, RoundPlan
from splitfed.protocol.backbone import (
    TRAIN_REQUEST,
    ModelInfo,
    SessionInfo,
    SessionRequest,
    StepCommand,
    StepResult,
    adapter_from_proto,
    adapter_to_proto,
    optimizer_from_proto,
    optimizer_to_proto,
)
from splitfed.protocol.framing import FrameReceiver, gather, tensor_frames
from splitfed.protocol.keys import SessionKeyGrant
from splitfed.v1 import aggregator_pb2, backbone_pb2
from splitfed.wire import IncomingFrame, TensorAssembler, TensorLimits

LORA = AdapterSettings(
    kind="lora", r=8, alpha=16.0, dropout=0.5, target_modules=("q_proj",), seed=7
)
PREFIX = AdapterSettings(kind="prefix", prefix_length=4, seed=9)
OPTIMIZER = OptimizerSettings(
    learning_rate=0.5,
    weight_decay=0.25,
    beta1=0.5,
    beta2=0.75,
    eps=0.125,
    schedule="cosine",
    warmup_steps=2,
    total_steps=10,
)


@pytest.mark.parametrize("settings", [LORA, PREFIX, AdapterSettings()])
def test_adapter_settings_round_trip(settings: AdapterSettings) -> None:
    assert adapter_from_proto(adapter_to_proto(settings)) == settings


def test_adapter_defaults_and_errors() -> None:
    assert adapter_from_proto(backbone_pb2.AdapterConfig()) == AdapterSettings()
    bad = backbone_pb2.AdapterConfig(prefix=backbone_pb2.PrefixConfig(length=5000))
    with pytest.raises(InvalidArgumentError, match="adapter: prefix_length"):
        adapter_from_proto(bad)


@pytest.mark.parametrize("settings", [OPTIMIZER, OptimizerSettings()])
def test_optimizer_settings_round_trip(settings: OptimizerSettings) -> None:
    assert optimizer_from_proto(optimizer_to_proto(settings)) == settings


def test_optimizer_defaults_and_errors() -> None:
    assert optimizer_from_proto(backbone_pb2.OptimizerConfig()) == OptimizerSettings()
    with pytest.raises(InvalidArgumentError, match="optimizer: learning_rate"):
        optimizer_from_proto(backbone_pb2.OptimizerConfig(learning_rate=float("nan")))


def test_session_request_round_trip() -> None:
    request = SessionRequest(
        model_id="m",
        k=2,
        m=3,
        adapter=PREFIX,
        optimizer=OPTIMIZER,
        encoding="bf16",
        session_id="s",
        encrypted=True,
        federation="fed",
    )
    assert SessionRequest.from_proto(request.to_proto()) == request
    # Unset settings travel as unset fields and come back as the defaults.
    bare = SessionRequest(session_id="s").to_proto()
    assert not bare.HasField("adapter") and not bare.HasField("optimizer")
    resolved = SessionRequest.from_proto(bare)
    assert resolved.adapter == AdapterSettings() == SessionRequest().adapter_settings()
    assert resolved.optimizer == OptimizerSettings() == SessionRequest().optimizer_settings()


INFO = ModelInfo(
    model_id="tiny",
    family="llama",
    num_layers=6,
    hidden_size=64,
    vocab_size=100,
    dtype=torch.bfloat16,
    min_k=1,
    min_m=1,
    max_sequence_length=512,
    max_batch_size=8,
    encodings=("raw", "bf16"),
    adapter_mode="session",
    encryption=True,
)


@pytest.mark.parametrize("info", [INFO, ModelInfo()])
def test_model_info_round_trip(info: ModelInfo) -> None:
    assert ModelInfo.from_proto(info.to_proto()) == info


def test_session_info_and_step_messages_round_trip() -> None:
    session = SessionInfo("s", 4, True, INFO, encrypted=True)
    assert SessionInfo.from_proto(session.to_proto()) == session
    command = StepCommand(2.5, 1.0)
    assert StepCommand.from_proto(command.to_proto()) == command
    result = StepResult(0.5, 0.25, already_applied=True)
    assert StepResult.from_proto(result.to_proto()) == result


def test_session_key_grant_round_trip_hides_the_secret() -> None:
    grant = SessionKeyGrant("s", 3, b"k" * 32, b"n" * 4)
    assert SessionKeyGrant.from_proto(grant.to_proto()) == grant
    assert "kkk" not in repr(grant)


PLAN = RoundPlan(
    federation="fed",
    round=3,
    attempt=1,
    phase=Phase.UPLOAD,
    global_version=2,
    selected=True,
    uploaded=False,
    local_steps=5,
    deadline=12.5,
    adapter_seed=9,
    secure_aggregation=True,
    peers=(Peer("a", b"ka"), Peer("b", b"kb")),
    secagg_scale=0.5,
    dropped=("c",),
    rounds=10,
    message="m",
    schema_digest="d",
    dp_clip_norm=0.5,
    dp_noise_multiplier=1.25,
    dp_client_noise_std=0.375,
    dp_epsilon=float("inf"),
    dp_delta=1e-5,
)


@pytest.mark.parametrize("plan", [PLAN, RoundPlan(federation="fed")])
def test_round_plan_round_trip(plan: RoundPlan) -> None:
    assert RoundPlan.from_proto(plan.to_proto()) == plan


def test_round_phases_are_the_wire_values() -> None:
    assert PLAN.to_proto().phase == aggregator_pb2.ROUND_PHASE_UPLOAD
    assert {p.value for p in Phase} == set(aggregator_pb2.RoundPhase.values())
    assert PLAN.key() == (3, 1, aggregator_pb2.ROUND_PHASE_UPLOAD, 2)


def _incoming(frames: list) -> list[IncomingFrame]:  # type: ignore[type-arg]
    return [TRAIN_REQUEST.parse(TRAIN_REQUEST.serialize(f)) for f in frames]


def test_framed_tensors_arrive_with_their_fields() -> None:
    tensors = {"h1": torch.randn(2, 3, 4), "attention_mask": torch.ones(2, 3, dtype=torch.int8)}
    frames = list(
        tensor_frames(
            tensors, TRAIN_REQUEST, chunk_bytes=16, op=backbone_pb2.TRAIN_OP_FORWARD, step=5
        )
    )
    assert all(
        f.message.step == 5 and f.message.op == backbone_pb2.TRAIN_OP_FORWARD for f in frames
    )
    receiver = FrameReceiver(None)
    pending: dict[str, torch.Tensor] = {}
    complete = None
    with TensorAssembler(TensorLimits(max_tensor_bytes=1 << 20, max_rank=3)) as assembler:
        for frame in _incoming(frames):
            received = receiver.feed(assembler, frame)
            if received is not None:
                complete = gather(pending, received, frozenset(tensors))
    assert complete is not None and not pending
    for name, tensor in tensors.items():
        torch.testing.assert_close(complete[name], tensor)


def test_gather_refuses_a_tensor_the_operation_does_not_take() -> None:
    frames = _incoming(list(tensor_frames({"x": torch.zeros(1)}, TRAIN_REQUEST, chunk_bytes=64)))
    with TensorAssembler(TensorLimits(max_tensor_bytes=64, max_rank=3)) as assembler:
        received = FrameReceiver(None).feed(assembler, frames[0])
    assert received is not None
    with pytest.raises(
        InvalidArgumentError, match="unexpected tensor 'x'; this operation takes h1"
    ):
        gather({}, received, frozenset({"h1"}))


def test_importing_the_backbone_client_registers_no_service_metric(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client process exports no backbone gauges: importing the client (afresh, with
    the registry recording instead of registering) creates no ``backbone`` metric and
    imports no service."""
    saved = {
        name: module
        for name, module in sys.modules.items()
        if name == "splitfed"
        or (name.startswith("splitfed.") and not name.startswith("splitfed.v1"))
    }
    registered: list[str] = []

    def record(collector: Any) -> None:
        registered.extend(metric.name for metric in collector.describe())

    monkeypatch.setattr(REGISTRY, "register", record)
    for name in saved:
        del sys.modules[name]
    try:
        import splitfed.clients.backbone  # noqa: F401

        imported = [name for name in sys.modules if name.startswith("splitfed.")]
    finally:
        for name in [n for n in sys.modules if n == "splitfed" or n.startswith("splitfed.")]:
            if not name.startswith("splitfed.v1"):
                del sys.modules[name]
        sys.modules.update(saved)
    assert any(name.startswith("splitfed_wire") for name in registered)  # the recorder works
    assert not [name for name in registered if "backbone" in name]
    assert not [name for name in imported if name.startswith("splitfed.services")]
