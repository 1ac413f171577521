"""Plain functions behind the Backbone servicer: requests in, responses out, Python
errors for everything wrong. The servicer only converts messages and calls these."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import torch

from splitfed.errors import DataLossError, FailedPreconditionError, InvalidArgumentError
from splitfed.logs import log_context, redact
from splitfed.models.adapters import AdapterSettings
from splitfed.models.optim import OptimizerSettings
from splitfed.security.sealing import FrameContext
from splitfed.security.session_crypto import SessionCrypto
from splitfed.services.backbone.crypto import BackboneKeys
from splitfed.services.backbone.sessions import Session
from splitfed.services.backbone.state import BackboneState
from splitfed.v1 import backbone_pb2
from splitfed.wire import (
    ChunkView,
    FrameSpec,
    IncomingFrame,
    OutgoingFrame,
    ReceiveBudget,
    TensorAssembler,
    TensorLimits,
    dtype_to_proto,
    iter_frames,
)

logger = logging.getLogger(__name__)

TRAIN_REQUEST = FrameSpec(backbone_pb2.TrainRequest)
TRAIN_RESPONSE = FrameSpec(backbone_pb2.TrainResponse)
GENERATE_REQUEST = FrameSpec(backbone_pb2.GenerateRequest)
GENERATE_RESPONSE = FrameSpec(backbone_pb2.GenerateResponse)
EXPORT_RESPONSE = FrameSpec(backbone_pb2.ExportAdapterResponse)
IMPORT_REQUEST = FrameSpec(backbone_pb2.ImportAdapterRequest)

FORWARD_TENSORS = frozenset({"h1", "attention_mask"})
GRAD_TENSORS = frozenset({"grad_h2"})

# The FrameContext op of sealed adapter transfers (encrypted sessions, docs/wire.md):
# values no TrainOp or GenerateOp takes, so an adapter chunk never passes for an
# activation. ExportAdapter: step = the response's ``step`` field; ImportAdapter: step 0.
EXPORT_OP = 0x100
IMPORT_OP = 0x101


def export_context(step: int) -> FrameContext:
    return FrameContext(op=EXPORT_OP, step=step)


IMPORT_CONTEXT = FrameContext(op=IMPORT_OP)


def tensor_limits(state: BackboneState) -> TensorLimits:
    s = state.settings
    largest = s.max_batch_size * s.max_sequence_length * state.shared.summary.hidden_size * 4
    return TensorLimits(max_tensor_bytes=largest, max_rank=3, encodings=frozenset(s.encodings))


def model_info(state: BackboneState, keys: BackboneKeys | None = None) -> backbone_pb2.ModelInfo:
    summary, s = state.shared.summary, state.settings
    return backbone_pb2.ModelInfo(
        model_id=summary.model_id,
        family=summary.family,
        num_layers=summary.num_layers,
        hidden_size=summary.hidden_size,
        vocab_size=summary.vocab_size,
        dtype=dtype_to_proto(summary.dtype),
        min_k=summary.min_k,
        min_m=summary.min_m,
        max_sequence_length=s.max_sequence_length,
        max_batch_size=s.max_batch_size,
        encodings=list(s.encodings),
        adapter_mode=s.adapter_mode,
        encryption=keys is not None and keys.available,
    )


def adapter_settings(config: backbone_pb2.AdapterConfig) -> AdapterSettings:
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


def adapter_config(settings: AdapterSettings) -> backbone_pb2.AdapterConfig:
    """The proto form of ``settings`` (what a client sends in OpenSession)."""
    if settings.kind == "prefix":
        return backbone_pb2.AdapterConfig(
            prefix=backbone_pb2.PrefixConfig(length=settings.prefix_length), seed=settings.seed
        )
    return backbone_pb2.AdapterConfig(
        lora=backbone_pb2.LoraConfig(
            r=settings.r,
            alpha=settings.alpha,
            dropout=settings.dropout,
            target_modules=settings.target_modules,
        ),
        seed=settings.seed,
    )


def optimizer_settings(config: backbone_pb2.OptimizerConfig) -> OptimizerSettings:
    defaults = OptimizerSettings()
    try:
        return OptimizerSettings(
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


def handle_open(
    state: BackboneState,
    owner: str,
    request: backbone_pb2.OpenSessionRequest,
    keys: BackboneKeys | None = None,
) -> backbone_pb2.OpenSessionResponse:
    if request.encrypted and (keys is None or not keys.available):
        raise FailedPreconditionError(
            "this backbone has no key manager ([security] keymanager), so it cannot encrypt "
            "activations; open the session without encryption or ask the operator"
        )
    session, resumed = state.open_session(
        owner,
        model_id=request.model_id,
        k=request.k or state.settings.min_k,
        m=request.m or state.settings.min_m,
        adapter=adapter_settings(request.adapter),
        optimizer=optimizer_settings(request.optimizer),
        encoding=request.encoding,
        session_id=request.session_id,
        encrypted=request.encrypted,
        federation=request.federation,
    )
    if session.encrypted and not resumed:
        assert keys is not None
        try:
            keys.register(session.session_id, owner)
        except BaseException:
            state.close_session(session.session_id, owner)
            raise
    return backbone_pb2.OpenSessionResponse(
        session_id=session.session_id,
        info=model_info(state, keys),
        step=session.step,
        resumed=resumed,
        encrypted=session.encrypted,
    )


def _send(
    tensor: torch.Tensor,
    name: str,
    spec: FrameSpec[Any],
    chunk_bytes: int,
    encoding: str,
    crypto: SessionCrypto | None = None,
    **fields: int,
) -> Iterator[OutgoingFrame]:
    frames = iter_frames(tensor, name, spec, chunk_bytes=chunk_bytes, encoding=encoding)

    def with_fields() -> Iterator[OutgoingFrame]:
        for frame in frames:
            for key, value in fields.items():
                setattr(frame.message, key, value)
            yield frame

    if crypto is None:
        return with_fields()
    context = FrameContext(
        op=fields.get("op", 0), step=fields.get("step", 0), micro_batch=fields.get("micro_batch", 0)
    )
    return crypto.seal(with_fields(), context)


class _Incoming:
    """Chunks of one receiving stream: opened (and checked) when the session is sealed,
    with ``context`` or else the one each frame declares."""

    def __init__(self, crypto: SessionCrypto | None, context: FrameContext | None = None) -> None:
        self.crypto = crypto
        self.opener = crypto.opener() if crypto is not None else None
        self.context = context

    def view(self, frame: IncomingFrame[Any]) -> ChunkView:
        if self.crypto is None or self.opener is None:
            if frame.message.chunk.HasField("seal"):
                raise InvalidArgumentError("this session is not encrypted; send plain chunks")
            return frame.chunk_view()
        if self.context is not None:
            return self.opener.open_frame(frame, self.context)
        return self.crypto.open(self.opener, frame)

    def tensor_done(self) -> None:
        if self.crypto is not None and self.opener is not None:
            self.crypto.follow(self.opener)


def handle_train(
    state: BackboneState,
    session: Session,
    frames: Iterable[IncomingFrame[backbone_pb2.TrainRequest]],
    chunk_bytes: int,
    budget: ReceiveBudget,
    crypto: SessionCrypto | None = None,
) -> Iterator[OutgoingFrame | backbone_pb2.TrainResponse]:
    """One training stream of one session: see ``Backbone.Train`` in backbone.proto."""
    sid = session.session_id
    incoming = _Incoming(crypto)
    with (
        log_context(session=redact(sid)),
        state.stream(session, training=True) as generation,
        TensorAssembler(tensor_limits(state), budget) as assembler,
    ):
        tensors: dict[str, torch.Tensor] = {}
        current: tuple[int, int, int] | None = None
        for frame in frames:
            request = frame.message
            session.touch()
            if session.generation != generation:
                raise DataLossError("a newer training stream of this session took over")
            op = request.op
            if op in (
                backbone_pb2.TRAIN_OP_FORWARD,
                backbone_pb2.TRAIN_OP_EVAL,
                backbone_pb2.TRAIN_OP_BACKWARD,
            ):
                key = (op, request.step, request.micro_batch)
                if current is not None and key != current:
                    raise InvalidArgumentError(
                        f"frames of step {request.step} arrived before step {current[1]} "
                        f"micro-batch {current[2]} was complete"
                    )
                current = key
                received = assembler.feed(incoming.view(frame))
                if received is None:
                    continue
                incoming.tensor_done()
                # The receive budget covers tensors being received; a pass that keeps its
                # input until its gradient counts it in its graph (the pending quotas).
                assembler.release_completed()
                tensors[received.name] = received.tensor
                needed = GRAD_TENSORS if op == backbone_pb2.TRAIN_OP_BACKWARD else FORWARD_TENSORS
                if not set(tensors) <= needed:
                    raise InvalidArgumentError(
                        f"unexpected tensor {received.name!r}; this operation takes "
                        f"{', '.join(sorted(needed))}"
                    )
                if set(tensors) != needed:
                    continue
                step, micro = request.step, request.micro_batch
                args = dict(tensors)
                tensors, current = {}, None
                if op == backbone_pb2.TRAIN_OP_BACKWARD:
                    out = state.run_backward(session, step, micro, args["grad_h2"])
                    yield from _send(
                        out,
                        "grad_h1",
                        TRAIN_RESPONSE,
                        chunk_bytes,
                        "raw",
                        crypto,
                        op=op,
                        step=step,
                        micro_batch=micro,
                    )
                else:
                    train = op == backbone_pb2.TRAIN_OP_FORWARD
                    out = state.run_forward(
                        session, step, micro, args["h1"], args["attention_mask"], train=train
                    )
                    yield from _send(
                        out,
                        "h2",
                        TRAIN_RESPONSE,
                        chunk_bytes,
                        session.encoding,
                        crypto,
                        op=op,
                        step=step,
                        micro_batch=micro,
                    )
            elif op == backbone_pb2.TRAIN_OP_STEP:
                step, command = request.step, request.command
                result = state.run_step(
                    session, step, command.client_grad_sq_norm, command.max_grad_norm
                )
                yield backbone_pb2.TrainResponse(
                    op=op, step=step, result=backbone_pb2.StepResult(**result)
                )
            elif op == backbone_pb2.TRAIN_OP_ZERO_GRAD:
                state.queue.run(sid, partial(state.zero_grad, session))
                yield backbone_pb2.TrainResponse(op=op, step=request.step)
            else:
                raise InvalidArgumentError(f"unknown training operation {op}")
        assembler.finish()


def handle_generate(
    state: BackboneState,
    session: Session,
    frames: Iterable[IncomingFrame[backbone_pb2.GenerateRequest]],
    chunk_bytes: int,
    budget: ReceiveBudget,
    crypto: SessionCrypto | None = None,
) -> Iterator[OutgoingFrame | backbone_pb2.GenerateResponse]:
    sid = session.session_id
    incoming = _Incoming(crypto)
    with (
        log_context(session=redact(sid)),
        state.stream(session, training=False),
        TensorAssembler(tensor_limits(state), budget) as assembler,
    ):
        tensors: dict[str, torch.Tensor] = {}
        for frame in frames:
            request = frame.message
            session.touch()
            op = request.op
            if op == backbone_pb2.GENERATE_OP_FORWARD:
                received = assembler.feed(incoming.view(frame))
                if received is None:
                    continue
                incoming.tensor_done()
                assembler.release_completed()
                tensors[received.name] = received.tensor
                if not set(tensors) <= FORWARD_TENSORS:
                    raise InvalidArgumentError(f"unexpected tensor {received.name!r}")
                if set(tensors) != FORWARD_TENSORS:
                    continue
                args, tensors = dict(tensors), {}
                out = state.queue.run(
                    sid,
                    partial(state.generate, session, args["h1"], args["attention_mask"]),
                    "generate",
                )
                length = session.cache.length if session.cache is not None else 0
                yield from _send(
                    out,
                    "h2",
                    GENERATE_RESPONSE,
                    chunk_bytes,
                    session.encoding,
                    crypto,
                    op=op,
                    cache_length=length,
                )
            elif op == backbone_pb2.GENERATE_OP_RESET:
                state.queue.run(sid, partial(state.reset_cache, session))
                yield backbone_pb2.GenerateResponse(op=op, cache_length=0)
            elif op == backbone_pb2.GENERATE_OP_TRIM:
                target = request.length
                length = state.queue.run(sid, partial(state.trim_cache, session, target))
                yield backbone_pb2.GenerateResponse(op=op, cache_length=length)
            else:
                raise InvalidArgumentError(f"unknown generation operation {op}")
        assembler.finish()


def handle_export(
    state: BackboneState, session: Session, chunk_bytes: int, crypto: SessionCrypto | None = None
) -> Iterator[OutgoingFrame]:
    """The session's adapter tensors, sealed with ``crypto`` (the owner of an encrypted
    session: :func:`export_context`)."""
    tensors = state.queue.run(session.session_id, partial(state.export_adapter, session))
    step = session.step

    def frames() -> Iterator[OutgoingFrame]:
        for name in sorted(tensors):
            for frame in iter_frames(tensors[name], name, EXPORT_RESPONSE, chunk_bytes=chunk_bytes):
                setattr(frame.message, "step", step)  # noqa: B010
                yield frame

    return frames() if crypto is None else crypto.seal(frames(), export_context(step))


def handle_import(
    state: BackboneState,
    session: Session,
    frames: Iterable[IncomingFrame[backbone_pb2.ImportAdapterRequest]],
    budget: ReceiveBudget,
    crypto: SessionCrypto | None = None,
) -> backbone_pb2.ImportAdapterResponse:
    """Replace the session's adapter tensors; with ``crypto`` (the owner of an encrypted
    session) every chunk must be sealed (:data:`IMPORT_CONTEXT`)."""
    tensors: dict[str, torch.Tensor] = {}
    incoming = _Incoming(crypto, IMPORT_CONTEXT)
    with TensorAssembler(tensor_limits(state), budget) as assembler:
        for frame in frames:
            received = assembler.feed(incoming.view(frame))
            if received is not None:
                incoming.tensor_done()
                assembler.release_completed()
                if received.name in tensors:
                    raise InvalidArgumentError(f"tensor {received.name!r} was sent twice")
                tensors[received.name] = received.tensor
        assembler.finish()
    count = state.queue.run(session.session_id, partial(state.import_adapter, session, tensors))
    logger.info(
        "[Backbone.ImportAdapter] session %s: %d tensors", redact(session.session_id), count
    )
    return backbone_pb2.ImportAdapterResponse(tensors=count)
