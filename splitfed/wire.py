"""The codec: the one module that turns tensors into protobuf messages and back.

* :func:`to_proto` / :func:`from_proto` convert a whole tensor to one ``Tensor`` message.
* :func:`iter_chunks` splits a tensor into ``TensorChunk`` messages, header first;
  :func:`iter_frames` writes the same chunks in place into a stream's own messages;
  :func:`pack_frame` writes a tensor that fits one chunk straight to the wire bytes of
  its stream message (a :class:`PackedFrame`), exactly as protobuf would serialise it.
* :class:`TensorAssembler` rebuilds tensors from chunks, checking every declared size
  against :class:`TensorLimits` *before* it allocates, and verifying order, byte counts
  and the CRC-32C checksum. :func:`iter_tensors` wraps it for a whole stream.

Payload bytes are row-major and little-endian (see :mod:`splitfed.encodings`). No pickle,
and no dtype conversion: tensors are viewed as bytes directly (through NumPy views for
the dtypes NumPy has, which costs fewer torch calls per frame; bfloat16 through torch).

Copies: sending copies each chunk once out of the tensor (gRPC needs ``bytes``);
receiving copies each chunk once into a buffer allocated for the whole payload, and the
decoded tensor is a view of that buffer for ``raw`` payloads. The checksum reads the
payload once on each side. See docs/wire.md ("Frames", "Copies").

Why one module (over 500 lines): the sending half (:func:`iter_frames`, which writes
chunk fields in place into a stream's messages) and the receiving half
(:class:`FrameSpec`'s zero-copy parse, :class:`TensorAssembler`) are the two sides of one
byte format, with one set of limits; kept together, a change to the format is one diff
with its round-trip tests beside it (STYLE.md 1, "one codec owns the bytes").
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import google_crc32c
import numpy as np
import torch
from google.protobuf.message import Message

from splitfed import metrics
from splitfed.encodings import Encoding, as_bytes, get_encoding, numel_of
from splitfed.errors import DataLossError, InvalidArgumentError, LimitExceededError
from splitfed.lifecycle import Closing
from splitfed.v1 import tensor_pb2

logger = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10
DEFAULT_MAX_TENSOR_BYTES = 2 * GiB
# Chosen from bench/transport.py (docs/benchmarks.md).
DEFAULT_CHUNK_BYTES = 4 * MiB

_DTYPE_TO_PROTO: dict[torch.dtype, int] = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.float64: tensor_pb2.DTYPE_FLOAT64,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.int32: tensor_pb2.DTYPE_INT32,
    torch.int16: tensor_pb2.DTYPE_INT16,
    torch.int8: tensor_pb2.DTYPE_INT8,
    torch.uint8: tensor_pb2.DTYPE_UINT8,
    torch.bool: tensor_pb2.DTYPE_BOOL,
}
_PROTO_TO_DTYPE: dict[int, torch.dtype] = {v: k for k, v in _DTYPE_TO_PROTO.items()}
# The codec's counters, labelled once: ``labels()`` takes a lock and a lookup per call,
# which a decode step's one small frame would pay four times per round trip.
_SENT_BYTES = metrics.WIRE_BYTES.labels(direction="sent")
_SENT_CHUNKS = metrics.WIRE_CHUNKS.labels(direction="sent")
_RECEIVED_BYTES = metrics.WIRE_BYTES.labels(direction="received")
_RECEIVED_CHUNKS = metrics.WIRE_CHUNKS.labels(direction="received")
SUPPORTED_DTYPES: frozenset[torch.dtype] = frozenset(_DTYPE_TO_PROTO)
# The wire dtypes NumPy has (not bfloat16): a raw payload of one of these goes between
# tensor and bytes through NumPy views, with one torch call instead of five to eight.
# On a stream's hot path each torch call costs microseconds, more than NumPy's
# (docs/benchmarks.md "Frame round trip"). Little-endian hosts only (the wire's order).
_NUMPY_DTYPES: dict[torch.dtype, np.dtype[Any]] = (
    {
        torch.float32: np.dtype(np.float32),
        torch.float16: np.dtype(np.float16),
        torch.float64: np.dtype(np.float64),
        torch.int64: np.dtype(np.int64),
        torch.int32: np.dtype(np.int32),
        torch.int16: np.dtype(np.int16),
        torch.int8: np.dtype(np.int8),
        torch.uint8: np.dtype(np.uint8),
        torch.bool: np.dtype(np.bool_),
    }
    if sys.byteorder == "little"
    else {}
)
M = TypeVar("M", bound=Message)


def dtype_to_proto(dtype: torch.dtype) -> tensor_pb2.Dtype.ValueType:
    try:
        return tensor_pb2.Dtype.ValueType(_DTYPE_TO_PROTO[dtype])
    except KeyError:
        raise ValueError(
            f"dtype {dtype} cannot go on the wire; supported: "
            + ", ".join(sorted(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES))
        ) from None


def dtype_from_proto(value: int) -> torch.dtype:
    try:
        return _PROTO_TO_DTYPE[value]
    except KeyError:
        raise InvalidArgumentError(f"unknown or unspecified dtype {value}") from None


class Declared(NamedTuple):
    """A tensor header that passed the limits."""

    dtype: torch.dtype
    encoding: Encoding
    # Exact payload length on the wire.
    nbytes: int
    # Bytes of the decoded tensor where decoding allocates it anew (0 for raw: a view).
    decoded_nbytes: int


# How many passed headers a TensorLimits remembers (then it starts over).
_PASSED_KEPT = 256


@dataclass(frozen=True)
class TensorLimits:
    """What a receiver accepts. Checked against declared sizes before any allocation."""

    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    max_rank: int = 8
    max_name_chars: int = 256
    dtypes: frozenset[torch.dtype] = field(default=SUPPORTED_DTYPES)
    encodings: frozenset[str] | None = None  # None: every registered encoding
    # Headers that passed, by (name, dtype, shape, encoding): a stream repeats the same
    # few (every decode step's h1), and the check is a pure function of them.
    _passed: dict[tuple[str, int, tuple[int, ...], str], Declared] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.max_tensor_bytes <= 0:
            raise ValueError(f"max_tensor_bytes must be positive, got {self.max_tensor_bytes}")
        if not 0 <= self.max_rank <= 64:
            raise ValueError(f"max_rank must be between 0 and 64, got {self.max_rank}")
        if self.max_name_chars < 0:
            raise ValueError(f"max_name_chars must be >= 0, got {self.max_name_chars}")
        unknown = self.dtypes - SUPPORTED_DTYPES
        if unknown:
            raise ValueError(f"dtypes {sorted(map(str, unknown))} are not supported on the wire")
        if self.encodings is not None:
            for name in self.encodings:
                get_encoding(name)

    def check(
        self, name: str, dtype_value: int, shape: Sequence[int], encoding_name: str
    ) -> Declared:
        """Validate a declared tensor: what it is, and the bytes it needs on both sides."""
        key = (name, dtype_value, tuple(shape), encoding_name)
        declared = self._passed.get(key)
        if declared is None:
            declared = self._check(name, dtype_value, key[2], encoding_name)
            if len(self._passed) >= _PASSED_KEPT:
                self._passed.clear()
            self._passed[key] = declared
        return declared

    def _check(
        self, name: str, dtype_value: int, shape: Sequence[int], encoding_name: str
    ) -> Declared:
        where = f"tensor {name[: self.max_name_chars]!r}"
        if len(name) > self.max_name_chars:
            raise InvalidArgumentError(
                f"tensor name is {len(name)} characters long; the limit is {self.max_name_chars}"
            )
        dtype = dtype_from_proto(dtype_value)
        if dtype not in self.dtypes:
            raise InvalidArgumentError(f"{where}: dtype {dtype} is not accepted here")
        if len(shape) > self.max_rank:
            raise InvalidArgumentError(
                f"{where}: rank {len(shape)} exceeds the limit of {self.max_rank}"
            )
        if any(d < 0 for d in shape):
            raise InvalidArgumentError(f"{where}: negative dimension in shape {list(shape)}")
        if self.encodings is not None and (encoding_name or "raw") not in self.encodings:
            raise InvalidArgumentError(
                f"{where}: wire encoding {encoding_name!r} is not accepted here"
            )
        encoding = get_encoding(encoding_name)
        if not encoding.supports(dtype):
            raise InvalidArgumentError(
                f"{where}: wire encoding {encoding.name!r} does not apply to dtype {dtype}"
            )
        # Python integers: no overflow, however large the declared dimensions. The decoded
        # size counts too (an int8 payload decodes to 2-8x its bytes), and so does the
        # product of the non-zero dimensions: an empty tensor with huge dimensions would
        # still overflow torch's stride computation.
        nbytes = encoding.encoded_nbytes(dtype, shape)
        span = math.prod(max(d, 1) for d in shape) * dtype.itemsize
        if max(nbytes, span) > self.max_tensor_bytes:
            raise LimitExceededError(
                f"{where}: shape {list(shape)} of {dtype} needs {max(nbytes, span)} bytes; "
                f"the limit is {self.max_tensor_bytes} bytes per tensor"
            )
        decoded = 0 if encoding.name == "raw" else numel_of(shape) * dtype.itemsize
        return Declared(dtype, encoding, nbytes, decoded)


DEFAULT_LIMITS = TensorLimits()


class ReceiveBudget:
    """Bytes that the tensors received on many streams may hold together.

    A receiver reserves what a tensor needs (its payload buffer, plus the decoded tensor
    where decoding allocates one) before allocating anything, and keeps the reservation
    while the tensor is in use: until the consumer of :func:`iter_tensors` asks for the
    next tensor, or the stream ends. Clients that declare large tensors and then stall,
    or stop reading replies, cannot make a server allocate without bound.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return self._held

    def reserve(self, nbytes: int, what: str) -> None:
        with self._lock:
            if self._held + nbytes > self.max_bytes:
                raise LimitExceededError(
                    f"{what}: receive buffers already hold {self._held} of {self.max_bytes} "
                    f"bytes; {nbytes} more do not fit, try again later"
                )
            self._held += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes


# --- whole tensors ---------------------------------------------------------------------


def to_proto(tensor: torch.Tensor, encoding: str = "raw") -> tensor_pb2.Tensor:
    """One ``Tensor`` message holding ``tensor`` in the given wire encoding."""
    enc = get_encoding(encoding)
    if not enc.supports(tensor.dtype):
        raise ValueError(f"wire encoding {enc.name!r} does not apply to dtype {tensor.dtype}")
    payload = enc.encode(tensor)
    return tensor_pb2.Tensor(
        dtype=dtype_to_proto(tensor.dtype),
        shape=tensor.shape,
        data=_payload_bytes(payload),
        encoding=enc.name,
    )


def from_proto(message: tensor_pb2.Tensor, limits: TensorLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """The tensor in a ``Tensor`` message, validated against ``limits``."""
    dtype, encoding, nbytes, _ = limits.check("", message.dtype, message.shape, message.encoding)
    data = message.data
    if len(data) != nbytes:
        raise InvalidArgumentError(
            f"tensor payload has {len(data)} bytes; dtype {dtype} and shape {list(message.shape)} "
            f"in encoding {encoding.name!r} need {nbytes}"
        )
    payload = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if nbytes
        else torch.empty(0, dtype=torch.uint8)
    )
    return _decode(encoding, payload, dtype, list(message.shape), "tensor")


def _payload_bytes(payload: torch.Tensor) -> bytes:
    if payload.numel() == 0:
        return b""
    return payload.numpy().tobytes()


# --- chunked streams -------------------------------------------------------------------


Payload = np.ndarray[Any, np.dtype[np.uint8]]


def _prepare(
    tensor: torch.Tensor, name: str, chunk_bytes: int, encoding: str
) -> tuple[tensor_pb2.TensorHeader, Payload]:
    """Check arguments, encode the tensor, and build its header (with the checksum)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    enc = get_encoding(encoding)
    if not enc.supports(tensor.dtype):
        raise ValueError(f"wire encoding {enc.name!r} does not apply to dtype {tensor.dtype}")
    header = tensor_pb2.TensorHeader(
        name=name, dtype=dtype_to_proto(tensor.dtype), shape=tensor.shape, encoding=enc.name
    )
    # A NumPy uint8 view of the encoded payload (no copy): google_crc32c reads it
    # directly, and chunks are slices of it.
    payload = enc.encode(tensor.detach().cpu()).numpy()
    header.total_bytes = payload.size
    header.crc32c = google_crc32c.value(payload) if payload.size else 0
    return header, payload


def _pieces(payload: Payload, chunk_bytes: int) -> Iterator[tuple[int, Payload]]:
    for seq, start in enumerate(range(0, max(payload.size, 1), chunk_bytes)):
        piece = payload[start : start + chunk_bytes]
        yield seq, piece
        _SENT_BYTES.inc(piece.size)
        _SENT_CHUNKS.inc()


def iter_chunks(
    tensor: torch.Tensor,
    name: str,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    encoding: str = "raw",
) -> Iterator[tensor_pb2.TensorChunk]:
    """Split ``tensor`` into ``TensorChunk`` messages of at most ``chunk_bytes`` payload
    bytes, header first; an empty tensor is one header-only chunk.

    Arguments are checked, and the tensor encoded and check-summed, when this is called,
    not when the first chunk is taken. Streams should send :func:`iter_frames` instead,
    which saves two copies of every chunk.
    """
    header, payload = _prepare(tensor, name, chunk_bytes, encoding)

    def chunks() -> Iterator[tensor_pb2.TensorChunk]:
        for seq, piece in _pieces(payload, chunk_bytes):
            chunk = tensor_pb2.TensorChunk(seq=seq, data=piece.tobytes())
            if seq == 0:
                chunk.header.CopyFrom(header)
            yield chunk

    return chunks()


def iter_frames(
    tensor: torch.Tensor,
    name: str,
    spec: FrameSpec[M],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    encoding: str = "raw",
) -> Iterator[OutgoingFrame]:
    """The chunks of ``tensor`` as frames of a stream whose messages are ``spec``'s type.

    Each frame holds the stream message (its chunk's ``seq`` and, first, ``header`` set)
    and a view of the chunk's payload; ``spec.serialize`` turns it into wire bytes with
    a single copy of the payload. Arguments are checked when this is called.
    """
    header, payload = _prepare(tensor, name, chunk_bytes, encoding)

    def frames() -> Iterator[OutgoingFrame]:
        for seq, piece in _pieces(payload, chunk_bytes):
            message, chunk = spec.new()
            chunk.seq = seq
            if seq == 0:
                chunk.header.CopyFrom(header)
            yield OutgoingFrame(message, piece)

    return frames()


# --- frames: stream messages that carry a TensorChunk, serialised without extra copies ---
#
# protobuf's Python API copies a bytes field when it is set, again when the message is
# serialised, and twice more when it is parsed and read. For stream messages that carry a
# TensorChunk, FrameSpec writes and reads the chunk's payload itself, in plain protobuf
# wire format that any implementation reads and writes: a frame is serialised as the
# message's other fields, then the chunk field with the payload as its last field (one
# copy of the payload); a received frame is parsed as the message minus the payload
# (small) plus a zero-copy view of the payload. Frames of another shape (a field repeated,
# say) fall back to protobuf's own parser, with the same result.

_LEN = 2
_DATA_FIELD = tensor_pb2.TensorChunk.DESCRIPTOR.fields_by_name["data"].number
_DATA_KEY = (_DATA_FIELD << 3) | _LEN


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_DATA_KEY_BYTES = _encode_varint(_DATA_KEY)


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    """A varint at ``pos``; raises IndexError or ValueError on malformed input."""
    result = shift = 0
    while True:
        byte = raw[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise ValueError("varint too long")


def _skip_field(raw: bytes, key: int, pos: int) -> int:
    """The position after the value of a field whose key ended at ``pos``."""
    wire_type = key & 7
    if wire_type == 0:
        return _read_varint(raw, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == 5:
        return pos + 4
    if wire_type == _LEN:
        length, start = _read_varint(raw, pos)
        return start + length
    raise ValueError(f"wire type {wire_type} is not expected in a frame")


def _single_len_field(raw: bytes, start: int, end: int, key: int) -> tuple[int, int, int] | None:
    """Where the one occurrence of LEN field ``key`` lies in ``raw[start:end]``:
    (key start, value start, value end); ``None`` if absent. Raises ValueError if it
    occurs more than once or the bytes are not well-formed."""
    found: tuple[int, int, int] | None = None
    pos = start
    while pos < end:
        key_start = pos
        field_key, pos = _read_varint(raw, pos)
        if field_key == key:
            if found is not None:
                raise ValueError("field occurs more than once")
            length, value_start = _read_varint(raw, pos)
            pos = value_start + length
            found = (key_start, value_start, pos)
        else:
            pos = _skip_field(raw, field_key, pos)
    if pos != end:
        raise ValueError("truncated field")
    return found


class OutgoingFrame(NamedTuple):
    """A stream message to send, and the payload of its chunk (a view, not yet copied).

    Serialising a frame consumes it: :meth:`FrameSpec.serialize` moves the chunk out of
    ``message``.
    """

    message: Message
    data: Payload


class IncomingFrame(NamedTuple, Generic[M]):
    """A received stream message (its chunk without payload) and the chunk's payload."""

    message: M
    data: memoryview
    chunk_field: str = "chunk"

    def chunk_view(self) -> ChunkView:
        """The chunk, with its payload, for :class:`TensorAssembler`."""
        return ChunkView(getattr(self.message, self.chunk_field), self.data)


class ChunkView(NamedTuple):
    """A chunk whose payload is held apart from the message (see :class:`IncomingFrame`)."""

    chunk: tensor_pb2.TensorChunk
    data: memoryview | bytes


# The TensorChunk and TensorHeader fields a packed frame writes, as wire keys.
def _key_of(message: Any, name: str, wire_type: int) -> bytes:
    return _encode_varint((message.DESCRIPTOR.fields_by_name[name].number << 3) | wire_type)


_VARINT = 0
_FIXED32 = 5
_HEADER_KEY = _key_of(tensor_pb2.TensorChunk, "header", _LEN)
_NAME_KEY = _key_of(tensor_pb2.TensorHeader, "name", _LEN)
_DTYPE_KEY = _key_of(tensor_pb2.TensorHeader, "dtype", _VARINT)
_SHAPE_KEY = _key_of(tensor_pb2.TensorHeader, "shape", _LEN)  # packed (proto3)
_TOTAL_KEY = _key_of(tensor_pb2.TensorHeader, "total_bytes", _VARINT)
_CRC_KEY = _key_of(tensor_pb2.TensorHeader, "crc32c", _FIXED32)
_ENCODING_KEY = _key_of(tensor_pb2.TensorHeader, "encoding", _LEN)
# Scalar field types a packed frame writes (as varints), with the values each accepts.
_FD = tensor_pb2.TensorChunk.DESCRIPTOR.fields_by_name["seq"]
_VARINT_RANGES: dict[int, tuple[int, int]] = {
    _FD.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    _FD.TYPE_ENUM: (-(1 << 31), (1 << 31) - 1),
    _FD.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    _FD.TYPE_UINT32: (0, (1 << 32) - 1),
    _FD.TYPE_UINT64: (0, (1 << 64) - 1),
    _FD.TYPE_BOOL: (0, 1),
}
_BOOL = _FD.TYPE_BOOL
# Layouts a FrameSpec remembers (then it starts over), as TensorLimits does headers.
_LAYOUTS_KEPT = 256


class _Scalar(NamedTuple):
    """A stream message's scalar field that a packed frame can write."""

    number: int
    key: bytes
    low: int
    high: int
    boolean: bool


class _Packing(NamedTuple):
    """How a kind of tensor goes out as a packed frame: its encoding, its payload's
    length, and the frame's bytes around the checksum and the payload (``head`` ends
    with the checksum's key, ``mid`` runs from after the checksum to the payload's first
    byte, ``tail`` holds the stream message's fields numbered after the chunk)."""

    encoding: Encoding
    nbytes: int
    head: bytes
    mid: bytes
    tail: bytes
    # Raw, of a dtype NumPy has: the payload is a NumPy view of the tensor.
    numpy: bool


class PackedFrame(NamedTuple):
    """A frame written straight to its wire bytes (:func:`pack_frame`), the bytes
    :meth:`FrameSpec.serialize` sends as they are. ``message`` and ``data`` parse them
    again, for inspection (tests); the stream path never reads them."""

    wire: bytes
    spec: FrameSpec[Any]

    @property
    def message(self) -> Message:
        """The stream message, its chunk without payload (as in :class:`OutgoingFrame`)."""
        message: Message = self.spec.parse(self.wire).message
        return message

    @property
    def data(self) -> Payload:
        """The chunk's payload."""
        return np.frombuffer(self.spec.parse(self.wire).data, dtype=np.uint8)


@dataclass(frozen=True)
class FrameSpec(Generic[M]):
    """How the stream messages of type ``message_type`` carry a ``TensorChunk``."""

    message_type: type[M]
    chunk_field: str = "chunk"
    # The chunk field's key, as a number and as wire bytes (set in __post_init__).
    _chunk_key: int = field(init=False, repr=False, compare=False)
    _chunk_key_bytes: bytes = field(init=False, repr=False, compare=False)
    # The message's scalar fields a packed frame may set, by name; the chunk's number.
    _scalars: dict[str, _Scalar] = field(init=False, repr=False, compare=False)
    _chunk_number: int = field(init=False, repr=False, compare=False)
    # How tensors go out as packed frames, by (fields, name, dtype, shape, encoding,
    # chunk size): see packing().
    _packings: dict[tuple[Any, ...], _Packing | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        field_descriptor = self.message_type.DESCRIPTOR.fields_by_name.get(self.chunk_field)
        if (
            field_descriptor is None
            or field_descriptor.message_type is not tensor_pb2.TensorChunk.DESCRIPTOR
        ):
            raise ValueError(
                f"{self.message_type.__name__} has no TensorChunk field {self.chunk_field!r}"
            )
        key = int((field_descriptor.number << 3) | _LEN)
        object.__setattr__(self, "_chunk_key", key)
        object.__setattr__(self, "_chunk_key_bytes", _encode_varint(key))
        object.__setattr__(self, "_chunk_number", field_descriptor.number)
        # Singular scalars without presence (proto3's plain fields, not `optional` and
        # not in a oneof): protobuf writes them as varints, and not at all when zero.
        scalars = {
            f.name: _Scalar(
                f.number, _encode_varint(f.number << 3), *_VARINT_RANGES[f.type], f.type == _BOOL
            )
            for f in self.message_type.DESCRIPTOR.fields
            if f.type in _VARINT_RANGES and not f.is_repeated and not f.has_presence
        }
        object.__setattr__(self, "_scalars", scalars)

    def new(self) -> tuple[M, tensor_pb2.TensorChunk]:
        message = self.message_type()
        return message, getattr(message, self.chunk_field)

    def serialize(self, frame: PackedFrame | OutgoingFrame | M) -> bytes:
        """Wire bytes of a frame (one copy of its payload) or of a plain message."""
        if type(frame) is PackedFrame:
            return frame.wire
        if not isinstance(frame, OutgoingFrame):
            return frame.SerializeToString()  # type: ignore[union-attr]
        if frame.data.size == 0:
            return frame.message.SerializeToString()
        # The chunk field once, as [chunk without data][data field]; the rest of the
        # message before it. One occurrence keeps the receiver on its fast path.
        chunk = getattr(frame.message, self.chunk_field).SerializeToString()
        frame.message.ClearField(self.chunk_field)
        rest = frame.message.SerializeToString()
        data_key = _DATA_KEY_BYTES + _encode_varint(frame.data.size)
        chunk_len = len(chunk) + len(data_key) + frame.data.size
        outer = self._chunk_key_bytes + _encode_varint(chunk_len)
        return b"".join((rest, outer, chunk, data_key, frame.data.data))

    def packing(
        self,
        fields: Mapping[str, Any],
        name: str,
        dtype: torch.dtype,
        shape: Sequence[int],
        encoding: str,
        chunk_bytes: int,
    ) -> _Packing | None:
        """How a tensor of this kind goes out as one packed frame; None where it does
        not (:func:`pack_frame`). Remembered per kind: a stream sends the same few."""
        key = (tuple(fields.items()), name, dtype, shape, encoding, chunk_bytes)
        try:
            return self._packings[key]
        except KeyError:
            pass
        built = self._packing(fields, name, dtype, tuple(shape), encoding, chunk_bytes)
        if len(self._packings) >= _LAYOUTS_KEPT:
            self._packings.clear()
        self._packings[key] = built
        return built

    def _packing(
        self,
        fields: Mapping[str, Any],
        name: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        encoding: str,
        chunk_bytes: int,
    ) -> _Packing | None:
        dtype_value = _DTYPE_TO_PROTO.get(dtype)
        enc = get_encoding(encoding)
        if dtype_value is None or not enc.supports(dtype):
            return None
        nbytes = enc.encoded_nbytes(dtype, shape)
        if not 0 < nbytes <= chunk_bytes:
            return None
        layout = self._layout(fields, name, dtype_value, shape, enc.name, nbytes)
        if layout is None:
            return None
        return _Packing(enc, nbytes, *layout, enc.name == "raw" and dtype in _NUMPY_DTYPES)

    def _layout(
        self,
        fields: Mapping[str, Any],
        name: str,
        dtype_value: int,
        shape: tuple[int, ...],
        encoding: str,
        nbytes: int,
    ) -> tuple[bytes, bytes, bytes] | None:
        """The bytes of a packed frame around its checksum and payload, exactly as
        protobuf serialises the message (fields in number order, zeros left out): up
        to the checksum's key, from after the checksum to the payload, after the chunk."""
        before: list[tuple[int, bytes]] = []
        after: list[tuple[int, bytes]] = []
        for field_name, value in fields.items():
            scalar = self._scalars.get(field_name)
            # Anything else (an unknown field, a float, a bool for an integer): the
            # message path, which sets it as protobuf does or raises as protobuf does.
            if scalar is None or type(value) is not (bool if scalar.boolean else int):
                return None
            if not scalar.low <= value <= scalar.high:
                return None
            if value:
                written = scalar.key + _encode_varint(int(value) & 0xFFFF_FFFF_FFFF_FFFF)
                side = before if scalar.number < self._chunk_number else after
                side.append((scalar.number, written))
        try:
            name_bytes = name.encode("utf-8")
            encoding_bytes = encoding.encode("utf-8")
        except UnicodeEncodeError:
            return None
        header = bytearray()
        if name_bytes:
            header += _NAME_KEY + _encode_varint(len(name_bytes)) + name_bytes
        if dtype_value:
            header += _DTYPE_KEY + _encode_varint(dtype_value)
        if shape:
            dims = b"".join(_encode_varint(d) for d in shape)
            header += _SHAPE_KEY + _encode_varint(len(dims)) + dims
        header += _TOTAL_KEY + _encode_varint(nbytes) + _CRC_KEY
        tail_of_header = (
            _ENCODING_KEY + _encode_varint(len(encoding_bytes)) + encoding_bytes
            if encoding_bytes
            else b""
        )
        header_len = len(header) + 4 + len(tail_of_header)
        data_key = _DATA_KEY_BYTES + _encode_varint(nbytes)
        # seq 0 is not written (proto3), nor a seal: the chunk is header then data.
        chunk_len = len(_HEADER_KEY) + len(_encode_varint(header_len)) + header_len
        chunk_len += len(data_key) + nbytes
        head = b"".join(
            (
                *(written for _, written in sorted(before)),
                self._chunk_key_bytes,
                _encode_varint(chunk_len),
                _HEADER_KEY,
                _encode_varint(header_len),
                header,
            )
        )
        tail = b"".join(written for _, written in sorted(after))
        return head, tail_of_header + data_key, tail

    def parse(self, raw: bytes) -> IncomingFrame[M]:
        """A received message, its chunk's payload as a view into ``raw`` where that
        saves a copy worth more than the parsing in Python it costs."""
        if len(raw) < _VIEW_MIN_BYTES:
            return self._parse_slow(raw)
        try:
            return self._parse_fast(raw)
        except (ValueError, IndexError):
            return self._parse_slow(raw)

    def _parse_fast(self, raw: bytes) -> IncomingFrame[M]:
        chunk = _single_len_field(raw, 0, len(raw), self._chunk_key)
        data = chunk and _single_len_field(raw, chunk[1], chunk[2], _DATA_KEY)
        if chunk is None or data is None:
            return self._parse_slow(raw)
        chunk_key_end = _read_varint(raw, chunk[0])[1]
        data_len = data[2] - data[0]
        rest = b"".join(
            (
                raw[:chunk_key_end],
                _encode_varint(chunk[2] - chunk[1] - data_len),
                raw[chunk[1] : data[0]],
                raw[data[2] : chunk[2]],
                raw[chunk[2] :],
            )
        )
        message = self.message_type.FromString(rest)
        return IncomingFrame(message, memoryview(raw)[data[1] : data[2]], self.chunk_field)

    def _parse_slow(self, raw: bytes) -> IncomingFrame[M]:
        message = self.message_type.FromString(raw)
        if not message.HasField(self.chunk_field):  # touching it would make it present
            return IncomingFrame(message, memoryview(b""), self.chunk_field)
        chunk: tensor_pb2.TensorChunk = getattr(message, self.chunk_field)
        data = chunk.data
        chunk.ClearField("data")
        return IncomingFrame(message, memoryview(data), self.chunk_field)


# Received messages shorter than this are parsed by protobuf, which copies their payload
# (a 16 KiB decode step: ~1.4 us, against ~3.8 us for finding the payload in Python to
# view it); longer ones are viewed (2 MiB: protobuf's parse and copies take ~1.4 ms).
_VIEW_MIN_BYTES = 64 * KiB


def pack_frame(
    tensor: torch.Tensor,
    name: str,
    spec: FrameSpec[Any],
    *,
    chunk_bytes: int,
    encoding: str = "raw",
    fields: Mapping[str, Any] | None = None,
) -> PackedFrame | None:
    """``tensor`` as one frame of ``spec``'s messages with ``fields`` set, written
    straight to its wire bytes: exactly what protobuf would serialise for the message
    that :func:`iter_frames` builds (one chunk, seq 0, header and payload), without
    building it. None where that does not apply (the tensor needs more than one chunk or
    has no bytes, a field is not a plain scalar of the message, a value is one protobuf
    would refuse or the checksum is 0): use :func:`iter_frames`, which raises what is
    wrong. One pass over the payload for its checksum, one to copy it into the wire
    bytes (gRPC sends only ``bytes``)."""
    packing = spec.packing(fields or {}, name, tensor.dtype, tensor.shape, encoding, chunk_bytes)
    if packing is None:
        return None
    enc, nbytes, head, mid, tail, numpy = packing
    payload: np.ndarray[Any, Any]
    if numpy:  # detached, on the CPU, in one torch call; its buffer is the raw payload
        payload = tensor.numpy(force=True)
        if not payload.flags.c_contiguous:
            payload = np.ascontiguousarray(payload)  # row-major, as the wire wants
    else:
        payload = enc.encode(tensor.detach().cpu()).numpy()
    # Both read a C-contiguous array's buffer as its bytes, whatever its dtype and shape.
    crc = google_crc32c.value(payload)
    wire = b"".join((head, crc.to_bytes(4, "little"), mid, payload.data, tail))
    if crc == 0:  # protobuf leaves a zero checksum out: the message path writes it so
        return None
    _SENT_BYTES.inc(nbytes)
    _SENT_CHUNKS.inc()
    return PackedFrame(wire, spec)


def _decode(
    encoding: Encoding, payload: torch.Tensor, dtype: torch.dtype, shape: list[int], what: str
) -> torch.Tensor:
    try:
        return encoding.decode(payload, dtype, shape)
    except RuntimeError as exc:  # torch refusing what passed the checks: still bad input
        raise InvalidArgumentError(f"{what}: payload cannot be decoded: {exc}") from None


class ReceivedTensor(NamedTuple):
    """A tensor rebuilt from a stream, with the name and wire encoding it arrived with."""

    name: str
    tensor: torch.Tensor
    encoding: str


class TensorSink(Protocol):
    """Where a :class:`TensorAssembler` with a sink writes tensors instead of buffering
    them: ``begin`` (after the header passed the limits, before any byte), then ``write``
    of the tensor's raw bytes in order. A stream that fails part-way leaves what was
    written; the owner of the sink discards it."""

    def begin(self, name: str, dtype: torch.dtype, shape: Sequence[int]) -> None: ...

    def write(self, data: memoryview) -> None: ...


@dataclass
class _Pending:
    name: str
    dtype: torch.dtype
    shape: list[int]
    encoding: Encoding
    total: int
    reserved: int
    crc32c: int
    # None while the payload goes straight to the sink.
    buffer: torch.Tensor | None
    array: np.ndarray[Any, np.dtype[np.uint8]] | None
    received: int = 0
    next_seq: int = 1
    running_crc: int = 0


# Received bytes are check-summed and copied a block at a time, so that the copy reads
# what the checksum just brought into the cache: one pass over memory, not two. For 2-4 MiB
# pieces not in the cache that is ~15 % less time here (docs/benchmarks.md "Frame round
# trip"); small pieces are one block, as before.
_COPY_BLOCK = 64 * KiB


def _check_and_copy(crc: int, piece: Payload, out: Payload, offset: int) -> int:
    """Copy ``piece`` into ``out`` at ``offset``; its CRC-32C extends ``crc``."""
    if piece.size <= _COPY_BLOCK:
        out[offset : offset + piece.size] = piece
        return int(google_crc32c.extend(crc, piece))
    for start in range(0, piece.size, _COPY_BLOCK):
        block = piece[start : start + _COPY_BLOCK]
        crc = google_crc32c.extend(crc, block)
        out[offset + start : offset + start + block.size] = block
    return crc


class TensorAssembler(Closing):
    """Rebuilds tensors from a sequence of chunks; one tensor at a time.

    :meth:`feed` returns a :class:`ReceivedTensor` when a chunk completes one, else ``None``.
    Errors raise :class:`InvalidArgumentError` (malformed framing), :class:`LimitExceededError`
    (over a limit) or :class:`DataLossError` (checksum mismatch, stream ended mid-tensor);
    the partial buffer is released at once. Use as a context manager (or call
    :meth:`close`) so that a stream that breaks mid-tensor frees what it held.

    With a :class:`ReceiveBudget`, a completed tensor's reservation is kept until
    :meth:`release_completed` (called by :func:`iter_tensors` when its consumer asks for
    the next tensor), the next tensor starts, or :meth:`close`.

    With a ``sink``, each tensor's bytes are written to it as they arrive (raw encoding;
    other encodings are decoded first) and :meth:`feed` returns the completed tensor as a
    ``meta`` tensor: its name, dtype and shape without its values. The checksum is
    checked when the last chunk arrives, after the bytes went to the sink.
    """

    def __init__(
        self,
        limits: TensorLimits = DEFAULT_LIMITS,
        budget: ReceiveBudget | None = None,
        *,
        sink: TensorSink | None = None,
    ) -> None:
        self.limits = limits
        self.budget = budget
        self.sink = sink
        self._pending: _Pending | None = None
        self._completed_reservation = 0

    @property
    def in_progress(self) -> bool:
        return self._pending is not None

    def feed(self, chunk: tensor_pb2.TensorChunk | ChunkView) -> ReceivedTensor | None:
        try:
            return self._feed(chunk)
        except Exception:
            self._release()
            raise

    def _feed(self, item: tensor_pb2.TensorChunk | ChunkView) -> ReceivedTensor | None:
        _RECEIVED_CHUNKS.inc()
        pending = self._pending
        chunk, data = (item.chunk, item.data) if isinstance(item, ChunkView) else (item, item.data)
        if pending is None:
            if not chunk.HasField("header"):
                raise InvalidArgumentError(
                    f"chunk with seq {chunk.seq} arrived without a preceding header; "
                    "the first chunk of each tensor must carry one"
                )
            if chunk.seq != 0:
                raise InvalidArgumentError(f"header chunk has seq {chunk.seq}; expected 0")
            header = chunk.header
            if self.sink is None and len(data) == header.total_bytes:
                return self._whole(header, data)
            pending = self._start(header)
        else:
            if chunk.HasField("header"):
                raise InvalidArgumentError(
                    f"tensor {pending.name!r}: a second header arrived at seq {chunk.seq} "
                    f"after {pending.received} of {pending.total} bytes"
                )
            if chunk.seq != pending.next_seq:
                raise InvalidArgumentError(
                    f"tensor {pending.name!r}: chunk seq {chunk.seq} out of order; "
                    f"expected {pending.next_seq}"
                )
            pending.next_seq += 1
        size = len(data)
        if pending.received + size > pending.total:
            raise InvalidArgumentError(
                f"tensor {pending.name!r}: more bytes than declared "
                f"({pending.received + size} > {pending.total})"
            )
        if size:
            piece = np.frombuffer(data, dtype=np.uint8)
            if pending.array is None:
                assert self.sink is not None
                pending.running_crc = google_crc32c.extend(pending.running_crc, piece)
                self.sink.write(memoryview(data))
            else:
                pending.running_crc = _check_and_copy(
                    pending.running_crc, piece, pending.array, pending.received
                )
            pending.received += size
            _RECEIVED_BYTES.inc(size)
        if pending.received < pending.total:
            return None
        return self._complete(pending)

    def _whole(self, header: tensor_pb2.TensorHeader, data: memoryview | bytes) -> ReceivedTensor:
        """A tensor whose header chunk carries all its bytes (every tensor that fits a
        chunk): what :meth:`_start`, the copy and :meth:`_complete` do, in one step and
        with the same checks, without the state a tensor in pieces needs. Its buffer
        becomes the tensor at once, so it never counts as held in ``WIRE_BUFFER_BYTES``."""
        self.release_completed()
        name = header.name
        dtype, encoding, nbytes, decoded = self.limits.check(
            name, header.dtype, header.shape, header.encoding
        )
        if header.total_bytes != nbytes:
            raise InvalidArgumentError(
                f"tensor {name!r}: header declares {header.total_bytes} bytes but "
                f"dtype {dtype} and shape {list(header.shape)} in encoding {encoding.name!r} "
                f"need {nbytes}"
            )
        budget = self.budget
        reserved = nbytes + decoded if budget is not None else 0
        if budget is not None:
            budget.reserve(reserved, f"tensor {name!r}")
        try:
            buffer: Payload
            if nbytes <= _COPY_BLOCK:  # small: copy, then check the copy (in the cache)
                buffer = np.frombuffer(bytearray(data), dtype=np.uint8)
                crc = google_crc32c.value(buffer) if nbytes else header.crc32c
            else:  # one pass over memory for both, a block at a time
                buffer = np.empty(nbytes, dtype=np.uint8)
                crc = _check_and_copy(0, np.frombuffer(data, dtype=np.uint8), buffer, 0)
            if nbytes:
                _RECEIVED_BYTES.inc(nbytes)
                if crc != header.crc32c:
                    raise DataLossError(
                        f"tensor {name!r}: checksum mismatch (crc32c {crc:#010x}, "
                        f"header says {header.crc32c:#010x})"
                    )
            as_numpy = _NUMPY_DTYPES.get(dtype) if encoding.name == "raw" else None
            if as_numpy is None:
                payload = torch.from_numpy(buffer)
                tensor = _decode(encoding, payload, dtype, list(header.shape), repr(name))
            else:  # what RawEncoding.decode does, as one NumPy array and one torch call
                array = np.ndarray(tuple(header.shape), dtype=as_numpy, buffer=buffer)
                if dtype == torch.bool and nbytes and int(buffer.max()) > 1:
                    raise InvalidArgumentError("bool tensor payload holds bytes other than 0 and 1")
                tensor = torch.from_numpy(array)
        except BaseException:
            if budget is not None:
                budget.release(reserved)
            raise
        self._completed_reservation += reserved
        return ReceivedTensor(name, tensor, encoding.name)

    def _start(self, header: tensor_pb2.TensorHeader) -> _Pending:
        self.release_completed()
        dtype, encoding, nbytes, decoded = self.limits.check(
            header.name, header.dtype, header.shape, header.encoding
        )
        if header.total_bytes != nbytes:
            raise InvalidArgumentError(
                f"tensor {header.name!r}: header declares {header.total_bytes} bytes but "
                f"dtype {dtype} and shape {list(header.shape)} in encoding {encoding.name!r} "
                f"need {nbytes}"
            )
        buffer: torch.Tensor | None = None
        reserved = 0
        if self.sink is not None and encoding.name == "raw" and dtype != torch.bool:
            # Straight to the sink as the chunks arrive: nothing to reserve or hold.
            self.sink.begin(header.name, dtype, list(header.shape))
        else:
            # Only now, with the sizes checked against the limits, reserve and allocate.
            reserved = nbytes + decoded if self.budget is not None else 0
            if self.budget is not None:
                self.budget.reserve(reserved, f"tensor {header.name!r}")
            try:
                buffer = torch.empty(nbytes, dtype=torch.uint8)
            except BaseException:
                if self.budget is not None:
                    self.budget.release(reserved)
                raise
            metrics.WIRE_BUFFER_BYTES.inc(nbytes)
        self._pending = _Pending(
            name=header.name,
            dtype=dtype,
            shape=list(header.shape),
            encoding=encoding,
            total=nbytes,
            reserved=reserved,
            crc32c=header.crc32c,
            buffer=buffer,
            array=None if buffer is None else buffer.numpy(),
        )
        return self._pending

    def _complete(self, pending: _Pending) -> ReceivedTensor:
        if pending.total and pending.running_crc != pending.crc32c:
            raise DataLossError(
                f"tensor {pending.name!r}: checksum mismatch (crc32c {pending.running_crc:#010x}, "
                f"header says {pending.crc32c:#010x})"
            )
        if pending.buffer is None:  # streamed to the sink
            self._release()
            meta = torch.empty(pending.shape, dtype=pending.dtype, device="meta")
            return ReceivedTensor(pending.name, meta, pending.encoding.name)
        tensor = _decode(
            pending.encoding, pending.buffer, pending.dtype, pending.shape, repr(pending.name)
        )
        if self.sink is not None:
            self.sink.begin(pending.name, pending.dtype, pending.shape)
            self.sink.write(as_bytes(tensor).numpy().data)
            self._release()
            meta = torch.empty(pending.shape, dtype=pending.dtype, device="meta")
            return ReceivedTensor(pending.name, meta, pending.encoding.name)
        self._release(keep_reservation=True)
        return ReceivedTensor(pending.name, tensor, pending.encoding.name)

    def finish(self) -> None:
        """Call at end of stream: a tensor still in progress is data loss."""
        pending = self._pending
        if pending is not None:
            self._release()
            raise DataLossError(
                f"stream ended after {pending.received} of {pending.total} bytes "
                f"of tensor {pending.name!r}"
            )

    def _release(self, *, keep_reservation: bool = False) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            if pending.buffer is None:
                return  # streamed to the sink: nothing held or reserved
            metrics.WIRE_BUFFER_BYTES.dec(pending.total)
            if keep_reservation:
                self._completed_reservation += pending.reserved
            elif self.budget is not None:
                self.budget.release(pending.reserved)

    def release_completed(self) -> None:
        """The consumer is done with the tensors completed so far: free their reservation."""
        if self._completed_reservation and self.budget is not None:
            self.budget.release(self._completed_reservation)
        self._completed_reservation = 0

    def close(self) -> None:
        self._release()
        self.release_completed()


def iter_tensors(
    chunks: Iterable[tensor_pb2.TensorChunk | ChunkView],
    limits: TensorLimits = DEFAULT_LIMITS,
    budget: ReceiveBudget | None = None,
) -> Iterator[ReceivedTensor]:
    """Every tensor of a chunk stream, in order; raises if the stream ends mid-tensor."""
    with TensorAssembler(limits, budget) as assembler:
        for chunk in chunks:
            done = assembler.feed(chunk)
            if done is not None:
                yield done
                assembler.release_completed()  # the consumer asked for the next one
        assembler.finish()
