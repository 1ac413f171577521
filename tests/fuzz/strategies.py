"""Hypothesis strategies for hostile messages: protobuf messages with edge values in every
field, chunked tensor streams with bad headers, lying sizes, wrong dtypes, truncated,
reordered and re-numbered chunks, stray seals, random bytes, and oversized metadata.

Everything is drawn as plain protobuf messages and serialised by the caller's own
serialisers; nothing goes through the splitfed client SDK, which would refuse to send it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from splitfed.encodings import get_encoding
from splitfed.v1 import tensor_pb2
from splitfed.wire import SUPPORTED_DTYPES, iter_chunks

S = st.SearchStrategy

# --- scalars --------------------------------------------------------------------------


def unsigned(bits: int) -> S[int]:
    top = (1 << bits) - 1
    return st.one_of(
        st.integers(0, 4), st.integers(0, top), st.sampled_from([top, top >> 1, 1 << (bits - 1)])
    )


def signed(bits: int) -> S[int]:
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return st.one_of(st.integers(-2, 4), st.integers(low, high), st.sampled_from([low, high]))


NASTY_TEXT = [
    "",
    " ",
    "\x00",
    "..",
    "../../etc/passwd",
    "__metadata__",
    "a/b",
    "名前",
    "\u202e",
    "\ud7ff",
    "%s%s%n",
]


def texts(max_long: int = 5000) -> S[str]:
    """Short random text, nasty names, and long runs (up to ``max_long`` characters)."""
    return st.one_of(
        st.text(max_size=24),
        st.sampled_from(NASTY_TEXT),
        st.integers(64, max_long).map(lambda n: "x" * n),
    )


def blobs(max_long: int = 100_000) -> S[bytes]:
    return st.one_of(
        st.binary(max_size=64),
        st.integers(64, max_long).map(lambda n: bytes(range(256)) * (n // 256) + b"\x01"),
    )


doubles = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf]),
)
singles = st.floats(width=32, allow_nan=True, allow_infinity=True)

_INTEGER_BITS = {
    FieldDescriptor.TYPE_INT32: (True, 32),
    FieldDescriptor.TYPE_SINT32: (True, 32),
    FieldDescriptor.TYPE_SFIXED32: (True, 32),
    FieldDescriptor.TYPE_INT64: (True, 64),
    FieldDescriptor.TYPE_SINT64: (True, 64),
    FieldDescriptor.TYPE_SFIXED64: (True, 64),
    FieldDescriptor.TYPE_UINT32: (False, 32),
    FieldDescriptor.TYPE_FIXED32: (False, 32),
    FieldDescriptor.TYPE_UINT64: (False, 64),
    FieldDescriptor.TYPE_FIXED64: (False, 64),
}


def mostly(likely: S[Any], *others: S[Any], percent: int = 75) -> S[Any]:
    """``likely`` in ``percent`` of the draws, else one of ``others``.

    (``st.one_of(a, a, b)`` does not weigh ``a`` twice: hypothesis drops repeated
    branches.)"""
    rest = st.one_of(*others)
    return st.integers(0, 99).flatmap(lambda n: likely if n < percent else rest)


# --- protobuf messages from their descriptors ------------------------------------------


def _scalar(field: FieldDescriptor) -> S[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return texts()
    if kind == FieldDescriptor.TYPE_BYTES:
        return blobs()
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return doubles
    if kind == FieldDescriptor.TYPE_FLOAT:
        return singles
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), signed(32))
    is_signed, bits = _INTEGER_BITS[kind]
    return signed(bits) if is_signed else unsigned(bits)


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
        and field.is_repeated
    )


def messages(
    descriptor: Descriptor,
    hints: Mapping[str, S[Any]] | None = None,
    depth: int = 3,
) -> S[Message]:
    """Messages of ``descriptor``'s type with any field set or not, each to an edge value
    or (often) to one of ``hints[field name]`` (values that reach deeper: a real session
    id, the federation's name)."""
    hints = hints or {}
    cls = message_factory.GetMessageClass(descriptor)
    parts: dict[str, tuple[FieldDescriptor, S[Any]]] = {}
    for field in descriptor.fields:
        if _is_map(field):
            key = _scalar(field.message_type.fields_by_name["key"])
            value = _scalar(field.message_type.fields_by_name["value"])
            strategy: S[Any] = st.dictionaries(key, value, max_size=4)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth <= 0:
                continue
            inner = messages(field.message_type, hints, depth - 1)
            strategy = st.lists(inner, max_size=3) if field.is_repeated else inner
        elif field.is_repeated:
            element = _scalar(field)
            strategy = st.one_of(
                st.lists(element, max_size=4),
                st.integers(5, 300).flatmap(
                    lambda n, e=element: st.lists(e, min_size=n, max_size=n)
                ),
            )
        else:
            strategy = _scalar(field)
        if field.name in hints:
            # Mostly the hint, so that most cases get past the checks of this field.
            parts[field.name] = (field, mostly(hints[field.name], st.none(), strategy))
        else:
            parts[field.name] = (field, st.one_of(st.none(), strategy))

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for field, strategy in parts.values():
            value = draw(strategy)
            if value is None:
                continue
            set_field(message, field, value)
        return message

    return build()


def set_field(message: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if _is_map(field):
        target.update(value)
    elif field.is_repeated:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


# --- raw bytes ---------------------------------------------------------------------------


@st.composite
def mangled(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with bytes flipped, cut, inserted or repeated."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "repeat", "truncate"]))
        at = draw(st.integers(0, len(data)))
        if how == "flip" and data:
            index = min(at, len(data) - 1)
            data[index] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=12))
        elif how == "repeat":
            data += data[at:]
        else:
            del data[at:]
    return bytes(data)


def raw_messages(valid: S[bytes]) -> S[bytes]:
    """Random bytes, protobuf-looking garbage, and mangled valid messages."""
    return st.one_of(
        st.binary(max_size=256),
        # Field keys with every wire type, including the reserved 6 and 7 and groups.
        st.lists(
            st.tuples(st.integers(1, 40), st.integers(0, 7), st.binary(max_size=12)), max_size=6
        ).map(lambda fields: b"".join(_varint(n << 3 | t) + v for n, t, v in fields)),
        valid.flatmap(mangled),
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# --- metadata -------------------------------------------------------------------------

_KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_."
_VALUE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F))

metadata_keys = st.text(_KEY_CHARS, min_size=1, max_size=40).filter(
    lambda k: not k.startswith("grpc-") and not k.endswith("-bin") and k[0] not in "-_."
)


def header_value(text: str) -> str:
    """``text`` as an HTTP/2 header value gRPC lets a client send (printable ASCII)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text).strip()


def metadata(budget: int = 7000) -> S[tuple[tuple[str, str | bytes], ...]]:
    """Call metadata within what gRPC accepts (8 KiB of headers by default): many short
    entries, a few long ones, binary ones."""
    entry = st.one_of(
        st.tuples(metadata_keys, st.text(_VALUE_CHARS, max_size=40)),
        st.tuples(metadata_keys, st.integers(100, 4000).map(lambda n: "v" * n)),
        st.tuples(metadata_keys.map(lambda k: k + "-bin"), st.binary(max_size=200)),
    )

    def fit(entries: list[tuple[str, str | bytes]]) -> tuple[tuple[str, str | bytes], ...]:
        kept, used = [], 0
        for key, value in entries:
            size = len(key) + len(value) * (2 if isinstance(value, bytes) else 1) + 32
            if used + size > budget:
                break
            kept.append((key, value))
            used += size
        return tuple(kept)

    return st.one_of(
        st.lists(entry, max_size=8),
        st.integers(20, 150).flatmap(lambda n: st.lists(entry, min_size=n, max_size=n)),
    ).map(fit)


# --- chunked tensors ---------------------------------------------------------------------

DTYPES = sorted(SUPPORTED_DTYPES, key=str)
ENCODINGS = ["raw", "", "bf16", "int8"]


@dataclass(frozen=True)
class Template:
    """A tensor a service expects: its name, dtypes and shapes (drawn)."""

    name: str
    dtypes: tuple[torch.dtype, ...]
    shape: S[list[int]]


def any_shape(max_rank: int = 4, max_dim: int = 6) -> S[list[int]]:
    return st.lists(st.integers(0, max_dim), max_size=max_rank)


def tensor_values(dtype: torch.dtype, shape: Sequence[int], seed: int, kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        tensor = torch.randn(shape, generator=generator, dtype=torch.float32)
        if kind == "special" and tensor.numel():
            flat = tensor.view(-1)
            specials = torch.tensor([math.nan, math.inf, -math.inf, 3e38, -0.0])
            flat[: min(5, flat.numel())] = specials[: min(5, flat.numel())]
        return tensor.to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    info = torch.iinfo(dtype)
    low, high = (info.min, info.max) if kind == "special" else (-3, 4)
    low, high = max(low, info.min), min(high, info.max)
    return torch.randint(low, high, shape, generator=generator, dtype=torch.int64).to(dtype)


@st.composite
def valid_tensor_chunks(
    draw: st.DrawFn, templates: Sequence[Template] = ()
) -> tuple[list[tensor_pb2.TensorChunk], str]:
    """One tensor, chunked as the codec does; from a template or anything."""
    if templates and draw(st.integers(0, 3)) > 0:
        template = draw(st.sampled_from(list(templates)))
        name, dtype, shape = (
            template.name,
            draw(st.sampled_from(template.dtypes)),
            draw(template.shape),
        )
    else:
        name = draw(st.one_of(st.sampled_from([t.name for t in templates] or ["t"]), texts(300)))
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(any_shape())
    kind = draw(st.sampled_from(["normal", "normal", "ones", "special"]))
    tensor = tensor_values(dtype, shape, draw(st.integers(0, 2**16)), kind)
    encoding = draw(st.sampled_from(ENCODINGS))
    if not get_encoding(encoding).supports(dtype) or (kind == "special" and encoding == "int8"):
        encoding = "raw"  # what the codec cannot send; mutations still declare it
    chunk_bytes = draw(st.one_of(st.integers(1, 96), st.just(64 * 1024)))
    chunks = list(iter_chunks(tensor, name, chunk_bytes=chunk_bytes, encoding=encoding))
    dtype_name = str(dtype).removeprefix("torch.")
    what = f"{name[:40]!r} {dtype_name} {list(shape)} {encoding or 'raw'} {kind}"
    return chunks, what


def _copy(chunk: tensor_pb2.TensorChunk) -> tensor_pb2.TensorChunk:
    out = tensor_pb2.TensorChunk()
    out.CopyFrom(chunk)
    return out


MUTATIONS = [
    "total_bytes",
    "crc32c",
    "dtype",
    "shape",
    "encoding",
    "name",
    "truncate",
    "drop_header",
    "swap",
    "duplicate",
    "seq",
    "second_header",
    "extra_bytes",
    "cut_bytes",
    "seal",
    "flip",
    "empty_chunk",
]


@st.composite
def mutate(
    draw: st.DrawFn, chunks: list[tensor_pb2.TensorChunk]
) -> tuple[list[tensor_pb2.TensorChunk], list[str]]:
    """``chunks`` with 0-3 hostile changes; what was changed."""
    chunks = [_copy(c) for c in chunks]
    done: list[str] = []
    for how in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        if not chunks:
            break
        at = draw(st.integers(0, len(chunks) - 1))
        header = chunks[0].header
        if how == "total_bytes":
            header.total_bytes = draw(unsigned(64))
            done.append(f"total_bytes={header.total_bytes}")
        elif how == "crc32c":
            header.crc32c = draw(unsigned(32))
            done.append("crc32c")
        elif how == "dtype":
            header.dtype = draw(st.one_of(st.integers(0, 12), signed(32)))  # type: ignore[assignment]
            done.append(f"dtype={header.dtype}")
        elif how == "shape":
            shape = draw(st.lists(st.one_of(st.integers(-2, 8), signed(64)), max_size=70))
            header.ClearField("shape")
            header.shape.extend(shape)
            done.append(f"shape={shape[:8]}{'...' if len(shape) > 8 else ''}")
        elif how == "encoding":
            header.encoding = draw(st.one_of(st.sampled_from(ENCODINGS), texts(500)))
            done.append(f"encoding={header.encoding[:20]!r}")
        elif how == "name":
            header.name = draw(texts(2000))
            done.append(f"name of {len(header.name)} chars")
        elif how == "truncate":
            del chunks[at:]
            done.append(f"truncated to {at} chunks")
        elif how == "drop_header":
            del chunks[0]
            done.append("no header chunk")
        elif how == "swap" and len(chunks) > 1:
            other = draw(st.integers(0, len(chunks) - 1))
            chunks[at], chunks[other] = chunks[other], chunks[at]
            done.append(f"swapped {at} and {other}")
        elif how == "duplicate":
            chunks.insert(at, _copy(chunks[at]))
            done.append(f"chunk {at} twice")
        elif how == "seq":
            chunks[at].seq = draw(unsigned(32))
            done.append(f"chunk {at} seq={chunks[at].seq}")
        elif how == "second_header" and at > 0:
            chunks[at].header.CopyFrom(chunks[0].header)
            done.append(f"header again at {at}")
        elif how == "extra_bytes":
            chunks[at].data += draw(st.binary(min_size=1, max_size=64))
            done.append(f"extra bytes at {at}")
        elif how == "cut_bytes" and chunks[at].data:
            chunks[at].data = chunks[at].data[: draw(st.integers(0, len(chunks[at].data) - 1))]
            done.append(f"fewer bytes at {at}")
        elif how == "seal":
            chunks[at].seal.key_id = draw(unsigned(32))
            chunks[at].seal.nonce = draw(st.one_of(st.binary(min_size=12, max_size=12), blobs(200)))
            done.append(f"seal at {at}")
        elif how == "flip" and chunks[at].data:
            data = bytearray(chunks[at].data)
            data[draw(st.integers(0, len(data) - 1))] ^= 0xFF
            chunks[at].data = bytes(data)
            done.append(f"flipped a byte at {at}")
        elif how == "empty_chunk":
            chunks.insert(at, tensor_pb2.TensorChunk(seq=draw(unsigned(32))))
            done.append(f"empty chunk at {at}")
    return chunks, done


@st.composite
def tensor_stream(
    draw: st.DrawFn, templates: Sequence[Template] = (), max_tensors: int = 3
) -> tuple[list[tensor_pb2.TensorChunk], str]:
    """The chunks of 1-``max_tensors`` tensors, often mutated; a description."""
    out: list[tensor_pb2.TensorChunk] = []
    notes = []
    for _ in range(draw(st.integers(1, max_tensors))):
        chunks, what = draw(valid_tensor_chunks(templates))
        if draw(st.integers(0, 3)) > 0:
            chunks, changes = draw(mutate(chunks))
            if changes:
                what += " [" + "; ".join(changes) + "]"
        out += chunks
        notes.append(what)
    return out, " + ".join(notes)


def frames(
    chunks: Sequence[tensor_pb2.TensorChunk], wrap: Callable[[tensor_pb2.TensorChunk], Message]
) -> list[bytes]:
    return [wrap(chunk).SerializeToString() for chunk in chunks]
