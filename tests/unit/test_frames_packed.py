"""Packed frames: a tensor that fits one chunk goes out as the exact bytes protobuf would
write for its frame message, built without the message; everything else (and every
sealed frame) goes the message way and parses as the generated stubs parse it."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitfed import wire
from splitfed.encodings import get_encoding
from splitfed.protocol import aggregator, backbone, diagnostics
from splitfed.protocol.framing import FrameReceiver, tensor_frames
from splitfed.security.sealing import TO_BACKBONE, DataKey, FrameContext
from splitfed.security.session_crypto import SessionCrypto
from splitfed.v1 import backbone_pb2
from splitfed.wire import (
    SUPPORTED_DTYPES,
    FrameSpec,
    OutgoingFrame,
    PackedFrame,
    TensorAssembler,
    TensorLimits,
    iter_frames,
    pack_frame,
)

SPECS: list[FrameSpec[Any]] = [
    *backbone.FRAME_SPECS,
    backbone.EXPORT_RESPONSE,
    backbone.IMPORT_REQUEST,
    aggregator.UPLOAD_REQUEST,
    aggregator.DOWNLOAD_RESPONSE,
    diagnostics.REQUEST_FRAMES,
    diagnostics.RESPONSE_FRAMES,
]
BIG = 1 << 20
_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_ENUM: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
}


def _scalar_fields(spec: FrameSpec[Any]) -> dict[str, st.SearchStrategy[Any]]:
    """The message's plain scalar fields (as the test reads the descriptor) and values."""
    out: dict[str, st.SearchStrategy[Any]] = {}
    for f in spec.message_type.DESCRIPTOR.fields:
        if f.is_repeated or f.has_presence:
            continue
        if f.type == FieldDescriptor.TYPE_BOOL:
            out[f.name] = st.booleans()
        elif f.type in _RANGES:
            low, high = _RANGES[f.type]
            out[f.name] = st.sampled_from([0, 1, high, low]) | st.integers(low, high)
    return out


def _expected(
    spec: FrameSpec[Any], tensor: torch.Tensor, name: str, encoding: str, fields: dict[str, Any]
) -> Message:
    """The frame message built with the generated stubs, as the message path builds it."""
    (frame,) = iter_frames(tensor, name, spec, chunk_bytes=BIG, encoding=encoding)
    message = spec.message_type(**fields)
    chunk = getattr(message, spec.chunk_field)
    chunk.CopyFrom(getattr(frame.message, spec.chunk_field))
    chunk.data = frame.data.tobytes()
    return message


@st.composite
def cases(draw: st.DrawFn) -> tuple[FrameSpec[Any], torch.Tensor, str, str, dict[str, Any]]:
    spec = draw(st.sampled_from(SPECS))
    dtype = draw(st.sampled_from(sorted(SUPPORTED_DTYPES, key=str)))
    shape = tuple(draw(st.lists(st.integers(1, 5), max_size=3)))
    encodings = [e for e in ("raw", "bf16", "int8") if get_encoding(e).supports(dtype)]
    encoding = draw(st.sampled_from(encodings))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        tensor = torch.randn(shape, generator=generator).to(dtype)
    elif dtype == torch.bool:
        tensor = torch.randint(0, 2, shape, generator=generator).bool()
    else:
        tensor = torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape).to(dtype)
    if tensor.dim() >= 2 and draw(st.booleans()):
        tensor = tensor.transpose(0, 1)  # not contiguous: its bytes are row-major anyway
    if dtype.is_floating_point and draw(st.booleans()):
        tensor = tensor.requires_grad_()
    name = draw(st.text(max_size=12))
    scalars = _scalar_fields(spec)
    chosen = draw(st.lists(st.sampled_from(sorted(scalars)), unique=True)) if scalars else []
    fields = {n: draw(scalars[n]) for n in chosen}
    return spec, tensor, name, encoding, fields


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_a_packed_frame_is_byte_for_byte_what_protobuf_writes(
    case: tuple[FrameSpec[Any], torch.Tensor, str, str, dict[str, Any]],
) -> None:
    spec, tensor, name, encoding, fields = case
    expected = _expected(spec, tensor, name, encoding, fields)
    packed = pack_frame(tensor, name, spec, chunk_bytes=BIG, encoding=encoding, fields=fields)
    assert packed is not None  # every case here is one chunk with bytes
    assert packed.wire == expected.SerializeToString()
    assert spec.serialize(packed) is packed.wire
    # Twice (the second time from the remembered layout): the same bytes.
    again = pack_frame(tensor, name, spec, chunk_bytes=BIG, encoding=encoding, fields=fields)
    assert again is not None and again.wire == packed.wire
    # Read back by FrameSpec (either parse path) as the stubs read it.
    without_data = spec.message_type()
    without_data.CopyFrom(expected)
    getattr(without_data, spec.chunk_field).ClearField("data")
    assert packed.message == without_data
    assert packed.data.tobytes() == getattr(expected, spec.chunk_field).data


def test_packed_frames_carry_a_tensor_across() -> None:
    tensor = torch.randn(1, 3, 8)
    (frame,) = tensor_frames(
        {"h1": tensor}, backbone.GENERATE_REQUEST, chunk_bytes=BIG, op=1, extend_mask=True
    )
    assert isinstance(frame, PackedFrame)
    incoming = backbone.GENERATE_REQUEST.parse(backbone.GENERATE_REQUEST.serialize(frame))
    assert (incoming.message.op, incoming.message.extend_mask) == (1, True)
    with TensorAssembler(TensorLimits(max_rank=3)) as assembler:
        received = FrameReceiver(None).feed(assembler, incoming)
    assert received is not None and torch.equal(received.tensor, tensor)


@pytest.mark.parametrize(
    ("tensor", "fields", "chunk_bytes"),
    [
        (torch.zeros(300), {"op": 1}, 1024),  # more than one chunk
        (torch.zeros(0, 4), {"op": 1}, BIG),  # no bytes: a header-only chunk
        (torch.zeros(4), {"nope": 1}, BIG),  # not a field of the message
        (torch.zeros(4), {"command": 1}, BIG),  # a message field
        (torch.zeros(4), {"op": True}, BIG),  # a bool for an enum (protobuf refuses it)
        (torch.zeros(4), {"step": 1.0}, BIG),  # a float for an integer
        (torch.zeros(4), {"step": -1}, BIG),  # out of uint64's range
        (torch.zeros(4), {"micro_batch": 1 << 32}, BIG),  # out of uint32's range
        (torch.zeros(4, dtype=torch.complex64), {}, BIG),  # not a wire dtype
        (torch.zeros(4), {}, 0),  # a chunk size iter_frames refuses
    ],
)
def test_what_does_not_pack_takes_the_message_path(
    tensor: torch.Tensor, fields: dict[str, Any], chunk_bytes: int
) -> None:
    spec = backbone.TRAIN_REQUEST
    assert pack_frame(tensor, "h1", spec, chunk_bytes=chunk_bytes, fields=fields) is None


def test_the_message_path_refuses_what_protobuf_refuses() -> None:
    frames = tensor_frames({"h1": torch.zeros(4)}, backbone.TRAIN_REQUEST, chunk_bytes=BIG, step=-1)
    with pytest.raises(ValueError, match="out of range"):
        list(frames)


def test_a_bool_field_takes_ints_the_message_way() -> None:
    (frame,) = tensor_frames(
        {"h1": torch.ones(2)}, backbone.GENERATE_REQUEST, chunk_bytes=BIG, extend_mask=1
    )
    assert isinstance(frame, OutgoingFrame)
    assert frame.message.extend_mask is True


def test_a_zero_checksum_takes_the_message_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """protobuf leaves a zero fixed32 out; the message path writes exactly that."""
    monkeypatch.setattr(wire.google_crc32c, "value", lambda data: 0)
    tensor = torch.ones(3)
    assert pack_frame(tensor, "h1", backbone.TRAIN_REQUEST, chunk_bytes=BIG) is None
    (frame,) = tensor_frames({"h1": tensor}, backbone.TRAIN_REQUEST, chunk_bytes=BIG, op=1)
    assert isinstance(frame, OutgoingFrame)
    assert not frame.message.chunk.header.crc32c


def test_layouts_are_remembered_up_to_a_bound() -> None:
    spec = FrameSpec(backbone_pb2.TrainRequest)
    tensor = torch.ones(2)
    for step in range(1, wire._LAYOUTS_KEPT + 5):
        packed = pack_frame(tensor, "h1", spec, chunk_bytes=BIG, fields={"step": step})
        assert packed is not None and packed.message.step == step
    assert 0 < len(spec._packings) <= wire._LAYOUTS_KEPT


_prefixes = itertools.count(1)


def _crypto(outgoing: str) -> SessionCrypto:
    prefix = next(_prefixes).to_bytes(4, "big")  # a fresh one each time, as the key manager
    key = DataKey(1, hashlib.sha256(b"packed frames").digest(), prefix)
    return SessionCrypto("session-p", outgoing, lambda key_id: key, initial=key)


@pytest.mark.parametrize("chunk_bytes", [BIG, 16])
@pytest.mark.parametrize("spec", [backbone.TRAIN_REQUEST, backbone.GENERATE_REQUEST])
def test_sealed_frames_take_the_message_path_and_parse_as_the_stubs_do(
    spec: FrameSpec[Any], chunk_bytes: int
) -> None:
    tensor = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3))
    frames = list(
        tensor_frames(
            {"h1": tensor},
            spec,
            chunk_bytes=chunk_bytes,
            crypto=_crypto(TO_BACKBONE),
            context=FrameContext(op=1, step=0, micro_batch=0),
            op=1,
        )
    )
    assert frames and all(isinstance(f, OutgoingFrame) for f in frames)
    for frame in frames:
        assert isinstance(frame, OutgoingFrame)
        expected = spec.message_type()
        expected.CopyFrom(frame.message)
        getattr(expected, spec.chunk_field).data = np.asarray(frame.data).tobytes()
        assert getattr(expected, spec.chunk_field).HasField("seal")
        assert spec.message_type.FromString(spec.serialize(frame)) == expected


class _Responses:
    """A fake call's responses: wire bytes parsed as the client parses them, or an
    exception raised where one stands."""

    def __init__(self, items: list[bytes | Exception]) -> None:
        self.items = items

    def __iter__(self) -> _Responses:
        return self

    def __next__(self) -> Any:
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return backbone.GENERATE_RESPONSE.parse(item)

    def cancel(self) -> None:
        pass


def test_a_client_stream_starts_afresh_after_a_receive_failed() -> None:
    """The stream keeps one assembler; a tensor cut short by an error is dropped, not
    continued by the next receive."""
    from splitfed.clients.backbone import _Stream

    spec = backbone.GENERATE_RESPONSE
    cut_short = [
        spec.serialize(f) for f in tensor_frames({"h2": torch.ones(64)}, spec, chunk_bytes=64, op=1)
    ]
    whole = torch.arange(4, dtype=torch.float32)
    (next_one,) = [
        spec.serialize(f) for f in tensor_frames({"h2": whole}, spec, chunk_bytes=BIG, op=1)
    ]
    responses = _Responses([cut_short[0], RuntimeError("connection reset"), next_one])
    stream = _Stream(lambda requests, **kw: responses, "session", BIG, None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="connection reset"):
        stream.receive_tensor()
    message, tensor = stream.receive_tensor()
    assert message.op == 1 and torch.equal(tensor, whole)
