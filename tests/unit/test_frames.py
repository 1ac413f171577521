"""FrameSpec: zero-copy frames are plain protobuf on the wire, both ways."""

from __future__ import annotations

from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from hypothesis import given, settings
from hypothesis import strategies as st

from splitfed import wire
from splitfed.v1 import diagnostics_pb2
from splitfed.wire import FrameSpec, OutgoingFrame, iter_frames, iter_tensors


def _test_frame_type() -> type[Message]:
    """A stream message with fields around its chunk, as later services will have."""
    pool = descriptor_pool.Default()
    name = "splitfed/test/frame.proto"
    try:
        pool.FindFileByName(name)
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto(
            name=name, package="splitfed.test", dependency=["splitfed/v1/tensor.proto"]
        )
        frame = proto.message_type.add(name="TestFrame")
        fields = [
            ("session", 1, descriptor_pb2.FieldDescriptorProto.TYPE_STRING, None),
            (
                "chunk",
                2,
                descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                ".splitfed.v1.TensorChunk",
            ),
            ("step", 3, descriptor_pb2.FieldDescriptorProto.TYPE_UINT64, None),
            ("weights", 4, descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT, None),
        ]
        for field_name, number, kind, type_name in fields:
            field = frame.field.add(name=field_name, number=number, type=kind)
            field.label = (
                descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
                if field_name == "weights"
                else descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
            )
            if type_name:
                field.type_name = type_name
        pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("splitfed.test.TestFrame"))


Frame = _test_frame_type()
SPEC: FrameSpec[Any] = FrameSpec(Frame)


@pytest.fixture
def slow_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    calls: list[bytes] = []
    original = FrameSpec._parse_slow

    def counting(self: FrameSpec[Any], raw: bytes) -> Any:
        calls.append(raw)
        return original(self, raw)

    monkeypatch.setattr(FrameSpec, "_parse_slow", counting)
    return calls


frames = st.fixed_dictionaries(
    {
        "session": st.text(max_size=20),
        "step": st.integers(0, 2**64 - 1),
        "weights": st.lists(st.floats(width=32, allow_nan=False), max_size=5),
        "seq": st.integers(0, 2**32 - 1),
        "name": st.none() | st.text(max_size=10),
        "data": st.binary(max_size=300),
    }
)


def build(f: dict[str, Any]) -> tuple[Message, OutgoingFrame]:
    full = Frame(session=f["session"], step=f["step"], weights=f["weights"])
    full.chunk.seq = f["seq"]
    if f["name"] is not None:
        full.chunk.header.name = f["name"]
    full.chunk.data = f["data"]
    message, chunk = SPEC.new()
    message.CopyFrom(full)
    chunk.ClearField("data")
    return full, OutgoingFrame(message, np.frombuffer(f["data"], dtype=np.uint8))


@settings(max_examples=300, deadline=None)
@given(f=frames)
def test_frames_are_protobuf_both_ways(f: dict[str, Any]) -> None:
    full, outgoing = build(f)
    # Outbound: any protobuf parser reads what FrameSpec writes.
    assert Frame.FromString(SPEC.serialize(outgoing)) == full
    # Inbound: FrameSpec reads what protobuf writes, on its fast path (here for messages
    # of any size), payload uncopied; and on protobuf's path (small messages) alike.
    expected = Frame()
    expected.CopyFrom(full)
    expected.chunk.ClearField("data")
    slow_calls: list[bytes] = []
    original = FrameSpec._parse_slow
    with (
        mock.patch.object(
            FrameSpec,
            "_parse_slow",
            lambda self, raw: slow_calls.append(raw) or original(self, raw),
        ),
        mock.patch.object(wire, "_VIEW_MIN_BYTES", 0),
    ):
        parsed = SPEC.parse(full.SerializeToString())
    assert bytes(parsed.data) == f["data"]
    assert parsed.message == expected
    assert slow_calls == [] or f["data"] == b""
    small = SPEC.parse(full.SerializeToString())
    assert (small.message, bytes(small.data)) == (expected, f["data"])


def test_repeated_chunk_fields_merge_like_protobuf(slow_calls: list[bytes]) -> None:
    first = Frame(session="a")
    first.chunk.seq = 7
    second = Frame(step=3)
    second.chunk.data = b"payload"
    raw = first.SerializeToString() + second.SerializeToString()  # protobuf merges these
    parsed = SPEC.parse(raw)
    assert (parsed.message.session, parsed.message.step, parsed.message.chunk.seq) == ("a", 3, 7)
    assert bytes(parsed.data) == b"payload"
    assert slow_calls == [raw]


def test_plain_messages_pass_through() -> None:
    message = Frame(session="x")
    assert SPEC.serialize(message) == message.SerializeToString()


@pytest.mark.parametrize("raw", [b"\x12\x05abc", b"\xff\xff\xff", b"\x12"])
def test_malformed_bytes_fail_as_protobuf_fails(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        SPEC.parse(raw)


def test_spec_needs_a_tensor_chunk_field() -> None:
    with pytest.raises(ValueError, match="has no TensorChunk field 'chunk'"):
        FrameSpec(diagnostics_pb2.WhoAmIResponse)


def test_tensor_round_trip_through_frames_keeps_the_payload_uncopied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wire, "_VIEW_MIN_BYTES", 0)  # views from the first byte on
    spec = FrameSpec(diagnostics_pb2.EchoTensorsRequest)
    tensor = torch.randn(1000)
    wires = [spec.serialize(f) for f in iter_frames(tensor, "h1", spec, chunk_bytes=1024)]
    incoming = [spec.parse(raw) for raw in wires]
    assert all(
        isinstance(f.data, memoryview) and f.data.obj is raw
        for f, raw in zip(incoming, wires, strict=True)
    )
    (received,) = list(iter_tensors(f.chunk_view() for f in incoming))
    assert torch.equal(received.tensor, tensor)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A well-formed frame's bytes, then cut, flipped, spliced or repeated: what a
    hostile or broken peer may send."""
    full, _ = build(draw(frames))
    raw = bytearray(full.SerializeToString())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw)))
        kind = draw(st.sampled_from(["flip", "cut", "insert", "repeat", "truncate"]))
        if kind == "flip" and at < len(raw):
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del raw[at : at + draw(st.integers(1, 8))]
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "repeat":
            raw += raw[at:]
        else:
            del raw[at:]
    return bytes(raw)


@settings(max_examples=1000, deadline=None)
@given(raw=mutated(), view_min=st.sampled_from([0, 1 << 16]))
def test_any_bytes_parse_as_the_stubs_parse_them_or_are_refused(raw: bytes, view_min: int) -> None:
    """Both parse paths (viewing the payload, here for messages of any size, and
    protobuf's) give what the generated parser gives, or fail where it fails."""
    try:
        reference = Frame.FromString(raw)
    except DecodeError:
        with mock.patch.object(wire, "_VIEW_MIN_BYTES", view_min), pytest.raises(DecodeError):
            SPEC.parse(raw)
        return
    with mock.patch.object(wire, "_VIEW_MIN_BYTES", view_min):
        parsed = SPEC.parse(raw)
    data = reference.chunk.data if reference.HasField("chunk") else b""
    if reference.HasField("chunk"):
        reference.chunk.ClearField("data")
    assert parsed.message == reference
    assert bytes(parsed.data) == data
