"""Framed tensor channels, both directions and both sides: tensors out as frames
(stamped with the message's fields, sealed when the session is encrypted), frames in as
chunks for a :class:`~splitfed.wire.TensorAssembler` (opened and checked when sealed).
The backbone's servicer and its client use the same code."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from splitfed.errors import InvalidArgumentError
from splitfed.security.sealing import FrameContext
from splitfed.security.session_crypto import SessionCrypto
from splitfed.wire import (
    ChunkView,
    FrameSpec,
    IncomingFrame,
    OutgoingFrame,
    PackedFrame,
    ReceivedTensor,
    TensorAssembler,
    iter_frames,
    pack_frame,
)


def tensor_frames(
    tensors: Mapping[str, torch.Tensor],
    spec: FrameSpec[Any],
    *,
    chunk_bytes: int,
    encoding: str = "raw",
    crypto: SessionCrypto | None = None,
    context: FrameContext | None = None,
    **fields: int,
) -> Iterator[OutgoingFrame | PackedFrame]:
    """The frames of ``tensors`` (in name order), each message with ``fields`` set; with
    ``crypto``, sealed under ``context`` (default: the one ``op``, ``step`` and
    ``micro_batch`` of ``fields`` name). Without ``crypto``, a tensor that fits one chunk
    is one :class:`~splitfed.wire.PackedFrame`, written straight to its wire bytes."""
    if crypto is None:
        return _packed(tensors, spec, chunk_bytes, encoding, fields)
    if context is None:
        context = FrameContext(
            op=int(fields.get("op", 0)),
            step=int(fields.get("step", 0)),
            micro_batch=int(fields.get("micro_batch", 0)),
        )
    return crypto.seal(_stamped(tensors, spec, chunk_bytes, encoding, fields), context)


def _stamped(
    tensors: Mapping[str, torch.Tensor],
    spec: FrameSpec[Any],
    chunk_bytes: int,
    encoding: str,
    fields: Mapping[str, int],
) -> Iterator[OutgoingFrame]:
    for name in sorted(tensors):
        for frame in iter_frames(
            tensors[name], name, spec, chunk_bytes=chunk_bytes, encoding=encoding
        ):
            for key, value in fields.items():
                setattr(frame.message, key, value)
            yield frame


def _packed(
    tensors: Mapping[str, torch.Tensor],
    spec: FrameSpec[Any],
    chunk_bytes: int,
    encoding: str,
    fields: Mapping[str, int],
) -> Iterator[OutgoingFrame | PackedFrame]:
    """:func:`_stamped`, with each tensor that :func:`pack_frame` packs as one frame."""
    for name in sorted(tensors):
        tensor = tensors[name]
        packed = pack_frame(
            tensor, name, spec, chunk_bytes=chunk_bytes, encoding=encoding, fields=fields
        )
        if packed is None:
            yield from _stamped({name: tensor}, spec, chunk_bytes, encoding, fields)
        else:
            yield packed


ContextOf = Callable[[IncomingFrame[Any]], FrameContext]


class FrameReceiver:
    """Chunks of one receiving stream: opened (and checked) with ``crypto`` when the
    session is sealed, under ``context`` (a fixed one, one computed from each frame, or
    by default the one each frame declares); a sealed chunk without ``crypto`` is refused
    with ``sealed_error``. ``follow``: answer under the newest key the peer used once a
    tensor is complete (the streams of a session; not a one-off transfer)."""

    def __init__(
        self,
        crypto: SessionCrypto | None,
        *,
        context: FrameContext | ContextOf | None = None,
        follow: bool = True,
        sealed_error: str = "this session is not encrypted; send plain chunks",
    ) -> None:
        self.crypto = crypto
        self.opener = crypto.opener() if crypto is not None else None
        self.context = context
        self.follow = follow
        self.sealed_error = sealed_error

    def view(self, frame: IncomingFrame[Any]) -> ChunkView:
        if self.opener is None:
            chunk = getattr(frame.message, frame.chunk_field)
            if chunk.HasField("seal"):
                raise InvalidArgumentError(self.sealed_error)
            return ChunkView(chunk, frame.data)
        assert self.crypto is not None
        if self.context is None:
            return self.crypto.open(self.opener, frame)
        context = self.context if isinstance(self.context, FrameContext) else self.context(frame)
        return self.opener.open_frame(frame, context)

    def feed(self, assembler: TensorAssembler, frame: IncomingFrame[Any]) -> ReceivedTensor | None:
        """Feed ``frame``'s chunk to ``assembler``; the tensor it completes, if any."""
        received = assembler.feed(self.view(frame))
        if received is not None and self.follow and self.crypto is not None:
            assert self.opener is not None
            self.crypto.follow(self.opener)
        return received


def gather(
    tensors: dict[str, torch.Tensor], received: ReceivedTensor, needed: frozenset[str]
) -> dict[str, torch.Tensor] | None:
    """Add ``received`` to the tensors of one operation, which takes the ``needed``
    ones: all of them (and ``tensors`` emptied) once complete, else None."""
    tensors[received.name] = received.tensor
    if not set(tensors) <= needed:
        raise InvalidArgumentError(
            f"unexpected tensor {received.name!r}; this operation takes {', '.join(sorted(needed))}"
        )
    if set(tensors) != needed:
        return None
    complete = dict(tensors)
    tensors.clear()
    return complete
