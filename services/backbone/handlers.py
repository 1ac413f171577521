"""Plain functions behind the Backbone servicer: requests in, responses out, Python
errors for everything wrong. The servicer only converts messages and calls these."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch

from splitfed.encodings import get_encoding
from splitfed.errors import DataLossError, FailedPreconditionError, InvalidArgumentError
from splitfed.logs import log_context, redact
from splitfed.protocol.backbone import (
    EXPORT_RESPONSE,
    FORWARD_TENSORS,
    GENERATE_RESPONSE,
    GRAD_TENSORS,
    H1_TENSORS,
    IMPORT_CONTEXT,
    TRAIN_RESPONSE,
    ModelInfo,
    SessionInfo,
    SessionRequest,
    StepCommand,
    StepResult,
    export_context,
)
from splitfed.protocol.framing import FrameReceiver, gather, tensor_frames
from splitfed.security.session_crypto import SessionCrypto
from splitfed.services.backbone.crypto import BackboneKeys
from splitfed.services.backbone.sessions import Session
from splitfed.services.backbone.state import BackboneState
from splitfed.v1 import backbone_pb2
from splitfed.wire import (
    FrameSpec,
    IncomingFrame,
    OutgoingFrame,
    PackedFrame,
    ReceiveBudget,
    TensorAssembler,
    TensorLimits,
)

logger = logging.getLogger(__name__)


def tensor_limits(state: BackboneState) -> TensorLimits:
    s = state.settings
    largest = s.max_batch_size * s.max_sequence_length * state.shared.summary.hidden_size * 4
    return TensorLimits(max_tensor_bytes=largest, max_rank=3, encodings=frozenset(s.encodings))


def model_info(state: BackboneState, keys: BackboneKeys | None = None) -> ModelInfo:
    s = state.settings
    return ModelInfo(
        **asdict(state.shared.summary),
        max_sequence_length=s.max_sequence_length,
        max_batch_size=s.max_batch_size,
        encodings=tuple(s.encodings),
        adapter_mode=s.adapter_mode,
        encryption=keys is not None and keys.available,
        max_pending_passes=s.max_pending_passes,
        client_batch=s.client_batch,
    )


def handle_open(
    state: BackboneState,
    owner: str,
    request: SessionRequest,
    keys: BackboneKeys | None = None,
) -> SessionInfo:
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
        adapter=request.adapter_settings(),
        optimizer=request.optimizer_settings(),
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
    return SessionInfo(
        session_id=session.session_id,
        info=model_info(state, keys),
        step=session.step,
        resumed=resumed,
        encrypted=session.encrypted,
    )


class _Inbox:
    """The tensors arriving on a Train or Generate stream, gathered into the arguments
    of one pass."""

    def __init__(self, assembler: TensorAssembler, crypto: SessionCrypto | None) -> None:
        self.assembler = assembler
        self.receiver = FrameReceiver(crypto)
        self.tensors: dict[str, torch.Tensor] = {}

    def arguments(
        self, frame: IncomingFrame[Any], needed: frozenset[str]
    ) -> dict[str, torch.Tensor] | None:
        """The ``needed`` tensors once ``frame`` completed the last of them, else None."""
        received = self.receiver.feed(self.assembler, frame)
        if received is None:
            return None
        # The receive budget covers tensors being received; a pass that keeps its
        # input until its gradient counts it in its graph (the pending quotas).
        self.assembler.release_completed()
        return gather(self.tensors, received, needed)


@dataclass(frozen=True)
class SessionStream:
    """What one Train or Generate stream of ``session`` runs with (the servicer builds it
    for each stream): ``crypto`` seals and opens its tensors when the session is
    encrypted, ``budget`` bounds the bytes its incoming tensors may hold."""

    state: BackboneState
    session: Session
    chunk_bytes: int
    budget: ReceiveBudget
    crypto: SessionCrypto | None = None

    @contextmanager
    def receiving(self, *, training: bool) -> Iterator[tuple[int, _Inbox]]:
        """The stream held open (its generation) and the inbox of its incoming tensors."""
        with (
            log_context(session=redact(self.session.session_id)),
            self.state.stream(self.session, training=training) as generation,
            TensorAssembler(tensor_limits(self.state), self.budget) as assembler,
        ):
            yield generation, _Inbox(assembler, self.crypto)
            assembler.finish()

    def frames(
        self,
        tensors: Mapping[str, torch.Tensor],
        spec: FrameSpec[Any],
        *,
        encoding: str = "raw",
        **fields: int,
    ) -> Iterator[OutgoingFrame | PackedFrame]:
        """The response frames of ``tensors``, each message with ``fields`` set, sealed
        when the session is encrypted (:func:`tensor_frames`)."""
        return tensor_frames(
            tensors,
            spec,
            chunk_bytes=self.chunk_bytes,
            encoding=encoding,
            crypto=self.crypto,
            context=None,  # the one op, step and micro_batch of ``fields`` name
            **fields,
        )

    def output_frames(
        self, h2: torch.Tensor, spec: FrameSpec[Any], *, encoding: str = "", **fields: int
    ) -> Iterator[OutgoingFrame | PackedFrame]:
        """The frames of a forward pass's output, in ``encoding`` (empty: the session's)."""
        return self.frames({"h2": h2}, spec, encoding=encoding or self.session.encoding, **fields)

    def reply_encoding(self, requested: str, default: str) -> str:
        """The encoding a request asked for its reply in (``reply_encoding``), checked
        against the backbone's accepted encodings; ``default`` when it asked for none."""
        if not requested:
            return default
        accepted = self.state.settings.encodings
        if requested not in accepted:
            raise InvalidArgumentError(
                f"reply encoding {requested[:64]!r} is not accepted; use one of "
                f"{', '.join(accepted)}"
            )
        if not get_encoding(requested).supports(self.state.shared.dtype):
            raise InvalidArgumentError(
                f"reply encoding {requested!r} does not apply to {self.state.shared.dtype}"
            )
        return requested


def _elapsed_us(started: float) -> int:
    return int((time.perf_counter() - started) * 1e6)


def handle_train(
    stream: SessionStream, frames: Iterable[IncomingFrame[backbone_pb2.TrainRequest]]
) -> Iterator[OutgoingFrame | PackedFrame | backbone_pb2.TrainResponse]:
    """One training stream of one session: see ``Backbone.Train`` in backbone.proto."""
    state, session = stream.state, stream.session
    with stream.receiving(training=True) as (generation, inbox):
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
                needed = GRAD_TENSORS if op == backbone_pb2.TRAIN_OP_BACKWARD else FORWARD_TENSORS
                args = inbox.arguments(frame, needed)
                if args is None:
                    continue
                step, micro = request.step, request.micro_batch
                current = None
                started = time.perf_counter()
                if op == backbone_pb2.TRAIN_OP_BACKWARD:
                    encoding = stream.reply_encoding(request.reply_encoding, "raw")
                    out = state.run_backward(session, step, micro, args["grad_h2"])
                    yield from stream.frames(
                        {"grad_h1": out},
                        TRAIN_RESPONSE,
                        encoding=encoding,
                        op=op,
                        step=step,
                        micro_batch=micro,
                        compute_us=_elapsed_us(started),
                    )
                else:
                    encoding = stream.reply_encoding(request.reply_encoding, session.encoding)
                    train = op == backbone_pb2.TRAIN_OP_FORWARD
                    out = state.run_forward(
                        session, step, micro, args["h1"], args["attention_mask"], train=train
                    )
                    yield from stream.output_frames(
                        out,
                        TRAIN_RESPONSE,
                        encoding=encoding,
                        op=op,
                        step=step,
                        micro_batch=micro,
                        compute_us=_elapsed_us(started),
                    )
            elif op == backbone_pb2.TRAIN_OP_STEP:
                step, command = request.step, StepCommand.from_proto(request.command)
                result = state.run_step(
                    session, step, command.client_grad_sq_norm, command.max_grad_norm
                )
                yield backbone_pb2.TrainResponse(
                    op=op, step=step, result=StepResult(**result).to_proto()
                )
            elif op == backbone_pb2.TRAIN_OP_ZERO_GRAD:
                state.queue.run_for(session, partial(state.zero_grad, session))
                yield backbone_pb2.TrainResponse(op=op, step=request.step)
            else:
                raise InvalidArgumentError(f"unknown training operation {op}")


def handle_generate(
    stream: SessionStream, frames: Iterable[IncomingFrame[backbone_pb2.GenerateRequest]]
) -> Iterator[OutgoingFrame | PackedFrame | backbone_pb2.GenerateResponse]:
    state, session = stream.state, stream.session
    # The attention mask of this stream's last FORWARD (trimmed with the cache): what a
    # FORWARD with ``extend_mask`` extends by ones instead of sending it again.
    last_mask: torch.Tensor | None = None
    with stream.receiving(training=False) as (_, inbox):
        for frame in frames:
            request = frame.message
            session.touch()
            op = request.op
            if op == backbone_pb2.GENERATE_OP_FORWARD:
                extend = request.extend_mask
                args = inbox.arguments(frame, H1_TENSORS if extend else FORWARD_TENSORS)
                if args is None:
                    continue
                started = time.perf_counter()
                encoding = stream.reply_encoding(request.reply_encoding, session.encoding)
                hidden = args["h1"]
                mask = extended_mask(last_mask, hidden) if extend else args["attention_mask"]
                out = state.generate(session, hidden, mask)
                last_mask = mask
                length = session.cache.length if session.cache is not None else 0
                yield from stream.output_frames(
                    out,
                    GENERATE_RESPONSE,
                    encoding=encoding,
                    op=op,
                    cache_length=length,
                    compute_us=_elapsed_us(started),
                )
            elif op == backbone_pb2.GENERATE_OP_RESET:
                state.queue.run_for(session, partial(state.reset_cache, session))
                last_mask = None
                yield backbone_pb2.GenerateResponse(op=op, cache_length=0)
            elif op == backbone_pb2.GENERATE_OP_TRIM:
                target = request.length
                length = state.queue.run_for(session, partial(state.trim_cache, session, target))
                if last_mask is not None:
                    last_mask = last_mask[:, :length]
                yield backbone_pb2.GenerateResponse(op=op, cache_length=length)
            else:
                raise InvalidArgumentError(f"unknown generation operation {op}")


def extended_mask(last: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """A FORWARD with ``extend_mask``: the stream's last mask extended by ones for the
    new positions of ``hidden``."""
    if last is None:
        raise InvalidArgumentError(
            "extend_mask needs an earlier forward on this stream (since its last reset) "
            "whose attention mask it extends; send the attention_mask"
        )
    if hidden.dim() != 3 or hidden.shape[0] != last.shape[0]:
        raise InvalidArgumentError(
            f"extend_mask: h1 has shape {list(hidden.shape)}, the mask it extends "
            f"{last.shape[0]} rows; every step of a generation has the rows of its prompt"
        )
    return torch.cat([last, last.new_ones((last.shape[0], hidden.shape[1]))], dim=1)


def handle_export(
    state: BackboneState, session: Session, chunk_bytes: int, crypto: SessionCrypto | None = None
) -> Iterator[OutgoingFrame | PackedFrame]:
    """The session's adapter tensors, sealed with ``crypto`` (the owner of an encrypted
    session: :func:`export_context`)."""
    tensors = state.queue.run_for(session, partial(state.export_adapter, session))
    step = session.step
    return tensor_frames(
        tensors,
        EXPORT_RESPONSE,
        chunk_bytes=chunk_bytes,
        crypto=crypto,
        context=export_context(step),
        step=step,
    )


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
    receiver = FrameReceiver(crypto, context=IMPORT_CONTEXT)
    with TensorAssembler(tensor_limits(state), budget) as assembler:
        for frame in frames:
            received = receiver.feed(assembler, frame)
            if received is not None:
                assembler.release_completed()
                if received.name in tensors:
                    raise InvalidArgumentError(f"tensor {received.name!r} was sent twice")
                tensors[received.name] = received.tensor
        assembler.finish()
    count = state.queue.run_for(session, partial(state.import_adapter, session, tensors))
    logger.info(
        "[Backbone.ImportAdapter] session %s: %d tensors", redact(session.session_id), count
    )
    return backbone_pb2.ImportAdapterResponse(tensors=count)
