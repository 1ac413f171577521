"""Wire encodings: their reconstruction error bounds (docs/wire.md) and their registry."""

from __future__ import annotations

import google_crc32c
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitfed.encodings import (
    RawEncoding,
    encoding_names,
    get_encoding,
    register_encoding,
)
from splitfed.errors import InvalidArgumentError
from splitfed.v1 import tensor_pb2
from splitfed.wire import iter_chunks, iter_tensors

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def round_trip(t: torch.Tensor, encoding: str, chunk_bytes: int = 64) -> torch.Tensor:
    (received,) = list(
        iter_tensors(iter_chunks(t, "x", chunk_bytes=chunk_bytes, encoding=encoding))
    )
    assert received.encoding == encoding
    assert received.tensor.dtype == t.dtype and received.tensor.shape == t.shape
    return received.tensor


def activations(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Heavy-tailed, like real hidden states: most values small, a few outliers per row.
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * torch.exp(2 * torch.randn(shape, generator=gen, dtype=torch.float64))
    return x.to(dtype)


def test_registry_lists_the_three_encodings() -> None:
    assert encoding_names() == ["bf16", "int8", "raw"]
    assert get_encoding("").name == "raw"


def test_unknown_encoding_names_the_known_ones() -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"unknown wire encoding 'zstd'; known: bf16, int8, raw"
    ):
        get_encoding("zstd")


def test_registering_a_name_twice_is_refused() -> None:
    class Again(RawEncoding):
        name = "raw"

    with pytest.raises(ValueError, match="already registered"):
        register_encoding(Again())


@pytest.mark.parametrize("encoding", ["bf16", "int8"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_lossy_encodings_refuse_non_floating_tensors(encoding: str, dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="does not apply to dtype"):
        list(iter_chunks(torch.zeros(3, dtype=dtype), "x", encoding=encoding))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_bf16_relative_error_is_at_most_2_pow_minus_8(
    seed: int, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    x = activations(seed, shape, dtype)
    back = round_trip(x, "bf16")
    # Round-to-nearest to 8 significant bits: relative error <= 2**-8 (normal range).
    assert torch.all((back.double() - x.double()).abs() <= 2.0**-8 * x.double().abs())


def test_bf16_keeps_specials_and_is_exact_for_bf16_inputs() -> None:
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1.0, -2.5])
    back = round_trip(specials, "bf16")
    assert torch.equal(back, specials)
    assert torch.signbit(back[1])
    assert torch.isnan(round_trip(torch.tensor([float("nan")]), "bf16")).all()
    x = torch.randn(33, 7).to(torch.bfloat16)
    assert torch.equal(round_trip(x, "bf16"), x)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(FLOATS),
)
def test_int8_error_is_at_most_half_a_step_of_each_rows_scale(
    seed: int, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    x = activations(seed, shape, dtype)
    back = round_trip(x, "int8")
    rows = x.double().reshape(-1, shape[-1])
    bound = rows.abs().amax(dim=1, keepdim=True) / 254
    err = (back.double().reshape(-1, shape[-1]) - rows).abs()
    # Plus the rounding of the decoded value back into a low-precision dtype.
    out_eps = torch.finfo(dtype).eps * rows.abs()
    assert torch.all(err <= bound * (1 + 1e-6) + out_eps)


def test_int8_payload_is_a_quarter_plus_the_scales() -> None:
    x = torch.randn(16, 1024)
    chunks = list(iter_chunks(x, "x", encoding="int8"))
    assert chunks[0].header.total_bytes == 16 * 1024 + 16 * 4
    assert get_encoding("bf16").encoded_nbytes(torch.float32, (16, 1024)) == 16 * 1024 * 2


def test_int8_zero_rows_scalars_and_empty_tensors() -> None:
    z = torch.zeros(3, 5)
    assert torch.equal(round_trip(z, "int8"), z)
    s = torch.tensor(-4.25)
    torch.testing.assert_close(round_trip(s, "int8"), s)
    for empty in (torch.empty(0, 4), torch.empty(4, 0)):
        assert round_trip(empty, "int8").shape == empty.shape


def test_int8_refuses_non_finite_values_on_the_sender() -> None:
    with pytest.raises(ValueError, match="finite"):
        list(iter_chunks(torch.tensor([1.0, float("inf")]), "x", encoding="int8"))


@pytest.mark.parametrize("bad_scale", [-1.0, float("nan"), float("inf")])
def test_int8_receiver_rejects_a_bad_scale(bad_scale: float) -> None:
    chunks = list(iter_chunks(torch.ones(1, 4), "x", encoding="int8"))
    payload = bytearray(chunks[0].data)
    payload[:4] = torch.tensor([bad_scale]).view(torch.uint8).numpy().tobytes()
    chunks[0].data = bytes(payload)
    chunks[0].header.crc32c = google_crc32c.value(bytes(payload))
    with pytest.raises(InvalidArgumentError, match="negative or non-finite scale"):
        list(iter_tensors(chunks))


def int8_chunks(
    scale: float, q: list[int], dtype: torch.dtype = torch.float32
) -> list[tensor_pb2.TensorChunk]:
    chunks = list(iter_chunks(torch.ones(1, len(q), dtype=dtype), "x", encoding="int8"))
    payload = torch.tensor([scale]).view(torch.uint8).numpy().tobytes()
    payload += torch.tensor(q, dtype=torch.int8).view(torch.uint8).numpy().tobytes()
    chunks[0].data = payload
    chunks[0].header.crc32c = google_crc32c.value(payload)
    return chunks


def test_int8_receiver_rejects_minus_128_and_scales_that_overflow_the_dtype() -> None:
    with pytest.raises(InvalidArgumentError, match="holds -128"):
        list(iter_tensors(int8_chunks(1.0, [1, -128])))
    with pytest.raises(InvalidArgumentError, match=r"scale too large for torch\.float16"):
        list(iter_tensors(int8_chunks(1000.0, [127, 1], torch.float16)))
    (ok,) = list(iter_tensors(int8_chunks(0.5, [127, -127])))
    assert ok.tensor.tolist() == [[63.5, -63.5]]


def test_int8_decodes_in_blocks_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(37, 11)
    whole = round_trip(x, "int8")
    monkeypatch.setattr(type(get_encoding("int8")), "_BLOCK_ELEMENTS", 20)
    assert torch.equal(round_trip(x, "int8"), whole)
