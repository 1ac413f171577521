"""Round trips of the codec over every dtype, shape, layout and chunk size."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitfed.encodings import as_bytes
from splitfed.v1 import tensor_pb2
from splitfed.wire import (
    SUPPORTED_DTYPES,
    TensorAssembler,
    dtype_from_proto,
    dtype_to_proto,
    from_proto,
    iter_chunks,
    iter_tensors,
    to_proto,
)

DTYPES = sorted(SUPPORTED_DTYPES, key=str)


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random values covering each dtype's whole bit range (NaNs and infinities included)."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    # Random bit patterns, reinterpreted: every float special value can appear.
    raw = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), generator=gen)
    return raw.to(torch.uint8).view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)
layouts = st.sampled_from(["contiguous", "transposed", "strided", "expanded"])


def apply_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if t.dim() < 2 or layout == "contiguous":
        return t
    if layout == "transposed":
        return t.transpose(0, -1)
    if layout == "strided":
        return t[::2]
    return t[:1].expand(3, *t.shape[1:]) if t.shape[0] else t


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=shapes,
    layout=layouts,
    chunk_bytes=st.integers(1, 97),
    seed=st.integers(0, 2**31 - 1),
)
def test_chunk_round_trip_is_bit_exact(
    dtype: torch.dtype, shape: tuple[int, ...], layout: str, chunk_bytes: int, seed: int
) -> None:
    tensor = apply_layout(make_tensor(dtype, shape, seed), layout)
    chunks = list(iter_chunks(tensor, "t", chunk_bytes=chunk_bytes))
    nbytes = tensor.numel() * dtype.itemsize
    assert len(chunks) == max(1, math.ceil(nbytes / chunk_bytes))
    assert chunks[0].HasField("header")
    assert not any(c.HasField("header") for c in chunks[1:])
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    (received,) = list(iter_tensors(chunks))
    assert received.name == "t"
    assert received.encoding == "raw"
    assert same_bits(received.tensor, tensor)


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=shapes, layout=layouts, seed=st.integers(0, 2**31))
def test_message_round_trip_is_bit_exact(
    dtype: torch.dtype, shape: tuple[int, ...], layout: str, seed: int
) -> None:
    tensor = apply_layout(make_tensor(dtype, shape, seed), layout)
    message = tensor_pb2.Tensor.FromString(to_proto(tensor).SerializeToString())
    assert same_bits(from_proto(message), tensor)


def test_every_bfloat16_bit_pattern_round_trips() -> None:
    every = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    (received,) = list(iter_tensors(iter_chunks(every, "all", chunk_bytes=4096)))
    assert same_bits(received.tensor, every)
    assert same_bits(from_proto(to_proto(every)), every)


def test_zero_d_and_empty_tensors() -> None:
    scalar = torch.tensor(3.5, dtype=torch.float64)
    empty = torch.empty(0, 7, dtype=torch.bfloat16)
    chunks = [*iter_chunks(scalar, "scalar"), *iter_chunks(empty, "empty")]
    assert len(chunks) == 2  # one header-only chunk for the empty tensor
    got = list(iter_tensors(chunks))
    assert [r.name for r in got] == ["scalar", "empty"]
    assert got[0].tensor.shape == () and got[0].tensor.item() == 3.5
    assert got[1].tensor.shape == (0, 7) and got[1].tensor.dtype == torch.bfloat16


def test_payload_is_little_endian_row_major() -> None:
    t = torch.tensor([[1, 2], [3, 256]], dtype=torch.int16).t()  # non-contiguous
    message = to_proto(t)
    assert message.data == bytes([1, 0, 3, 0, 2, 0, 0, 1])
    assert list(message.shape) == [2, 2]


def test_several_tensors_in_one_stream_and_a_tensor_that_requires_grad() -> None:
    a = torch.randn(5, 3, requires_grad=True)
    b = torch.arange(10)
    chunks = [*iter_chunks(a, "a", chunk_bytes=8), *iter_chunks(b, "b", chunk_bytes=8)]
    with TensorAssembler() as assembler:
        done = [r for c in chunks if (r := assembler.feed(c)) is not None]
        assert not assembler.in_progress
    assert [r.name for r in done] == ["a", "b"]
    torch.testing.assert_close(done[0].tensor, a.detach(), rtol=0, atol=0)
    assert torch.equal(done[1].tensor, b)


def test_received_raw_tensor_is_writable_and_owns_its_memory() -> None:
    t = torch.randn(64)
    (received,) = list(iter_tensors(iter_chunks(t, "t", chunk_bytes=16)))
    received.tensor.add_(1)  # would fail on a read-only buffer
    torch.testing.assert_close(received.tensor, t + 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_enum_mapping_round_trips(dtype: torch.dtype) -> None:
    assert dtype_from_proto(dtype_to_proto(dtype)) == dtype


def test_unsupported_dtype_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot go on the wire; supported"):
        to_proto(torch.zeros(2, dtype=torch.complex64))


def test_bad_arguments_fail_at_the_call_not_at_the_first_chunk() -> None:
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        iter_chunks(torch.zeros(2), "t", chunk_bytes=0)
    with pytest.raises(ValueError, match="needs finite values"):
        iter_chunks(torch.tensor([float("nan")]), "t", encoding="int8")
