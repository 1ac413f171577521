"""The contract of splitfed.v1.Backbone (protos/splitfed/v1/backbone.proto): the
service, its call metadata, the frame specs of its streams, the sealing contexts of
adapter transfers, and the messages callers build, as dataclasses with ``to_proto`` /
``from_proto``. The adapter and optimizer settings are the models' own dataclasses;
their wire form is converted here."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitfed.errors import InvalidArgumentError
from splitfed.models.adapters import AdapterSettings
from splitfed.models.optim import OptimizerSettings
from splitfed.protocol.messages import from_message, to_message
from splitfed.security.sealing import FrameContext
from splitfed.v1 import backbone_pb2
from splitfed.wire import FrameSpec, dtype_from_proto, dtype_to_proto

SERVICE = backbone_pb2.DESCRIPTOR.services_by_name["Backbone"]
SERVICE_NAME = SERVICE.full_name
# The session a Train, Generate or ImportAdapter call is for.
SESSION_METADATA = "x-splitfed-session"
# An aggregator's ImportAdapter: the federation it acts for, the member owning the session.
FEDERATION_METADATA = "x-splitfed-federation"
OWNER_METADATA = "x-splitfed-owner"

TRAIN_REQUEST = FrameSpec(backbone_pb2.TrainRequest)
TRAIN_RESPONSE = FrameSpec(backbone_pb2.TrainResponse)
GENERATE_REQUEST = FrameSpec(backbone_pb2.GenerateRequest)
GENERATE_RESPONSE = FrameSpec(backbone_pb2.GenerateResponse)
EXPORT_RESPONSE = FrameSpec(backbone_pb2.ExportAdapterResponse)
IMPORT_REQUEST = FrameSpec(backbone_pb2.ImportAdapterRequest)
FRAME_SPECS = (
    TRAIN_REQUEST,
    TRAIN_RESPONSE,
    GENERATE_REQUEST,
    GENERATE_RESPONSE,
    EXPORT_RESPONSE,
    IMPORT_REQUEST,
)

# The tensors a forward pass (training, evaluation, generation) and a backward pass send.
FORWARD_TENSORS = frozenset({"h1", "attention_mask"})
# A generation forward with ``extend_mask`` (the stream's last mask, extended by ones).
H1_TENSORS = frozenset({"h1"})
GRAD_TENSORS = frozenset({"grad_h2"})

# The FrameContext op of sealed adapter transfers (encrypted sessions, docs/wire.md):
# values no TrainOp or GenerateOp takes, so an adapter chunk never passes for an
# activation. ExportAdapter: step = the response's ``step`` field; ImportAdapter: step 0.
EXPORT_OP = 0x100
IMPORT_OP = 0x101


def export_context(step: int) -> FrameContext:
    return FrameContext(op=EXPORT_OP, step=step)


IMPORT_CONTEXT = FrameContext(op=IMPORT_OP)


def adapter_to_proto(settings: AdapterSettings) -> backbone_pb2.AdapterConfig:
    """The wire form of ``settings`` (what a client sends in OpenSession)."""
    if settings.kind == "prefix":
        return backbone_pb2.AdapterConfig(
            prefix=backbone_pb2.PrefixConfig(length=settings.prefix_length), seed=settings.seed
        )
    return backbone_pb2.AdapterConfig(
        lora=to_message(settings, backbone_pb2.LoraConfig),
        seed=settings.seed,
    )


def adapter_from_proto(config: backbone_pb2.AdapterConfig) -> AdapterSettings:
    """The settings ``config`` asks for; unset fields take the defaults (no kind: LoRA)."""
    kind = config.WhichOneof("kind")
    try:
        if kind == "prefix":
            return AdapterSettings(
                kind="prefix", prefix_length=config.prefix.length, seed=config.seed
            )
        lora = config.lora if kind == "lora" else backbone_pb2.LoraConfig()
        return AdapterSettings(
            kind="lora",
            r=lora.r or 16,
            alpha=lora.alpha or 32.0,
            dropout=lora.dropout,
            target_modules=tuple(lora.target_modules),
            seed=config.seed,
        )
    except ValueError as exc:
        raise InvalidArgumentError(f"adapter: {exc}") from None


def optimizer_to_proto(settings: OptimizerSettings) -> backbone_pb2.OptimizerConfig:
    return to_message(settings, backbone_pb2.OptimizerConfig)


def optimizer_from_proto(config: backbone_pb2.OptimizerConfig) -> OptimizerSettings:
    """The settings ``config`` asks for; unset (zero) fields take the defaults."""
    defaults = OptimizerSettings()
    try:
        settings = OptimizerSettings(
            learning_rate=config.learning_rate or defaults.learning_rate,
            weight_decay=config.weight_decay,
            beta1=config.beta1 or defaults.beta1,
            beta2=config.beta2 or defaults.beta2,
            eps=config.eps or defaults.eps,
            schedule=config.schedule or defaults.schedule,
            warmup_steps=config.warmup_steps,
            total_steps=config.total_steps,
        )
    except ValueError as exc:
        raise InvalidArgumentError(f"optimizer: {exc}") from None
    if settings.open_length:  # the client sets it before it opens a session
        raise InvalidArgumentError(
            f"optimizer: schedule {settings.schedule!r} needs total_steps > warmup_steps"
        )
    return settings


@dataclass(frozen=True)
class SessionRequest:
    """OpenSession: a new session (``session_id`` empty) or the resumption of one.
    ``k`` / ``m`` 0: the backbone's minimum; ``adapter`` / ``optimizer`` None: the
    defaults; ``encoding`` empty: raw activations."""

    model_id: str = ""
    k: int = 0
    m: int = 0
    adapter: AdapterSettings | None = None
    optimizer: OptimizerSettings | None = None
    encoding: str = ""
    session_id: str = ""
    encrypted: bool = False
    federation: str = ""

    def to_proto(self) -> backbone_pb2.OpenSessionRequest:
        return to_message(
            self,
            backbone_pb2.OpenSessionRequest,
            adapter=adapter_to_proto(self.adapter) if self.adapter is not None else None,
            optimizer=optimizer_to_proto(self.optimizer) if self.optimizer is not None else None,
        )

    @classmethod
    def from_proto(cls, message: backbone_pb2.OpenSessionRequest) -> SessionRequest:
        """The request with its adapter and optimizer settings resolved (defaults filled
        in); ``InvalidArgumentError`` for settings no session can take."""
        return from_message(
            cls,
            message,
            adapter=adapter_from_proto(message.adapter),
            optimizer=optimizer_from_proto(message.optimizer),
        )

    def adapter_settings(self) -> AdapterSettings:
        return self.adapter if self.adapter is not None else AdapterSettings()

    def optimizer_settings(self) -> OptimizerSettings:
        return self.optimizer if self.optimizer is not None else OptimizerSettings()


@dataclass(frozen=True)
class ModelInfo:
    """What a backbone serves (GetModelInfo, OpenSession). ``dtype`` None: not stated."""

    model_id: str = ""
    family: str = ""
    num_layers: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    dtype: torch.dtype | None = None
    min_k: int = 0
    min_m: int = 0
    max_sequence_length: int = 0
    max_batch_size: int = 0
    encodings: tuple[str, ...] = ()
    adapter_mode: str = ""
    encryption: bool = False
    # Training forwards of one session that may await their gradient (0: not stated);
    # client-batch: passes merged across sessions (a pipelining client sends in order).
    max_pending_passes: int = 0
    client_batch: bool = False
    # How the body's projections are stored ("none", "int8", "nf4"; "" not stated).
    quantization: str = ""

    def to_proto(self) -> backbone_pb2.ModelInfo:
        return to_message(
            self,
            backbone_pb2.ModelInfo,
            dtype=dtype_to_proto(self.dtype) if self.dtype is not None else None,
        )

    @classmethod
    def from_proto(cls, message: backbone_pb2.ModelInfo) -> ModelInfo:
        return from_message(
            cls,
            message,
            dtype=dtype_from_proto(message.dtype) if message.dtype else None,
        )


@dataclass(frozen=True)
class SessionInfo:
    """OpenSession's answer: the session, the step it is at, whether it was resumed."""

    session_id: str
    step: int
    resumed: bool
    info: ModelInfo = field(default_factory=ModelInfo)
    encrypted: bool = False

    def to_proto(self) -> backbone_pb2.OpenSessionResponse:
        return to_message(self, backbone_pb2.OpenSessionResponse, info=self.info.to_proto())

    @classmethod
    def from_proto(cls, message: backbone_pb2.OpenSessionResponse) -> SessionInfo:
        return from_message(cls, message, info=ModelInfo.from_proto(message.info))


@dataclass(frozen=True)
class StepCommand:
    """Train's STEP: the client's squared gradient norm and the global clipping norm."""

    client_grad_sq_norm: float
    max_grad_norm: float

    def to_proto(self) -> backbone_pb2.StepCommand:
        return to_message(self, backbone_pb2.StepCommand)

    @classmethod
    def from_proto(cls, message: backbone_pb2.StepCommand) -> StepCommand:
        return from_message(cls, message)


@dataclass(frozen=True)
class StepResult:
    """The backbone's side of an optimizer step."""

    backbone_grad_sq_norm: float = 0.0
    learning_rate: float = 0.0
    already_applied: bool = False

    def to_proto(self) -> backbone_pb2.StepResult:
        return to_message(self, backbone_pb2.StepResult)

    @classmethod
    def from_proto(cls, message: backbone_pb2.StepResult) -> StepResult:
        return from_message(cls, message)
