"""The receiver's checks: each malformed stream gets its own error, and nothing is kept."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import google_crc32c
import pytest
import torch

from splitfed import metrics
from splitfed.errors import DataLossError, InvalidArgumentError, LimitExceededError
from splitfed.v1 import tensor_pb2
from splitfed.wire import (
    DEFAULT_MAX_TENSOR_BYTES,
    ReceiveBudget,
    TensorAssembler,
    TensorLimits,
    dtype_to_proto,
    iter_chunks,
    iter_tensors,
)

Chunks = list[tensor_pb2.TensorChunk]


def good(n: int = 40, chunk_bytes: int = 16) -> Chunks:
    return list(iter_chunks(torch.arange(n, dtype=torch.int32), "h1", chunk_bytes=chunk_bytes))


def header_chunk(shape: list[int], dtype: int = tensor_pb2.DTYPE_FLOAT32, **kw: object) -> Chunks:
    numel = 1
    for d in shape:
        numel *= d
    fields: dict[str, object] = {
        "name": "h1",
        "dtype": dtype,
        "shape": shape,
        "total_bytes": max(numel, 0) * 4,
    }
    fields.update(kw)
    return [tensor_pb2.TensorChunk(seq=0, header=tensor_pb2.TensorHeader(**fields))]  # type: ignore[arg-type]


def buffered() -> float:
    return metrics.WIRE_BUFFER_BYTES._value.get()


def drop_header(c: Chunks) -> Chunks:
    c[0].ClearField("header")
    return c


def dup_header(c: Chunks) -> Chunks:
    c[1].header.CopyFrom(c[0].header)
    return c


def swap(c: Chunks) -> Chunks:
    c[1], c[2] = c[2], c[1]
    return c


def skip(c: Chunks) -> Chunks:
    del c[1]
    return c


def extra(c: Chunks) -> Chunks:
    c[-1].data += b"\x00"
    return c


def flip_bit(c: Chunks) -> Chunks:
    c[1].data = bytes([c[1].data[0] ^ 1]) + c[1].data[1:]
    return c


def bad_header_seq(c: Chunks) -> Chunks:
    c[0].seq = 3
    return c


def wrong_total(c: Chunks) -> Chunks:
    c[0].header.total_bytes += 4
    return c


CASES: list[tuple[str, Callable[[Chunks], Chunks], type[Exception], str]] = [
    ("missing header", drop_header, InvalidArgumentError, "without a preceding header"),
    ("duplicate header", dup_header, InvalidArgumentError, "a second header arrived"),
    ("reordered chunks", swap, InvalidArgumentError, "out of order; expected 1"),
    ("missing chunk", skip, InvalidArgumentError, "out of order; expected 1"),
    ("header seq", bad_header_seq, InvalidArgumentError, "header chunk has seq 3"),
    ("more bytes", extra, InvalidArgumentError, "more bytes than declared"),
    ("corrupted", flip_bit, DataLossError, "checksum mismatch"),
    ("declared total", wrong_total, InvalidArgumentError, "header declares 164 bytes"),
]


@pytest.mark.parametrize(("case", "mangle", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_malformed_stream_is_rejected_and_frees_its_buffer(
    case: str, mangle: Callable[[Chunks], Chunks], error: type[Exception], message: str
) -> None:
    before = buffered()
    with pytest.raises(error, match=message):
        list(iter_tensors(mangle(good())))
    assert buffered() == before


def test_stream_ending_mid_tensor_is_data_loss_and_frees_the_buffer() -> None:
    before = buffered()
    with pytest.raises(DataLossError, match=r"stream ended after 32 of 160 bytes of tensor 'h1'"):
        list(iter_tensors(good()[:2]))
    assert buffered() == before


def test_abandoned_assembler_frees_the_buffer_on_close() -> None:
    before = buffered()
    with TensorAssembler() as assembler:
        assembler.feed(good()[0])
        assert assembler.in_progress
        assert buffered() == before + 160
    assert buffered() == before


def test_closing_a_consumer_mid_tensor_frees_the_buffer() -> None:
    before = buffered()
    chunks = good()
    gen = iter_tensors(iter([*chunks, *chunks[:2]]))
    next(gen)  # first tensor complete, second one half-received once we pull again
    assert buffered() == before
    gen.close()
    assert buffered() == before


@pytest.mark.parametrize(
    ("chunk", "error", "message"),
    [
        (header_chunk([2, 3], dtype=0), InvalidArgumentError, "unknown or unspecified dtype 0"),
        (header_chunk([2, 3], dtype=99), InvalidArgumentError, "unknown or unspecified dtype 99"),
        (header_chunk([1] * 9), InvalidArgumentError, "rank 9 exceeds the limit of 8"),
        (header_chunk([4, -1]), InvalidArgumentError, "negative dimension"),
        (header_chunk([2], name="x" * 300), InvalidArgumentError, "300 characters long"),
        (header_chunk([2], encoding="zstd"), InvalidArgumentError, "unknown wire encoding"),
        (
            header_chunk([2], dtype=tensor_pb2.DTYPE_INT64, encoding="bf16", total_bytes=4),
            InvalidArgumentError,
            "'bf16' does not apply to dtype torch.int64",
        ),
        # 2**124 bytes: had the receiver allocated before checking, this would not be
        # a LimitExceededError but an allocation failure.
        (
            header_chunk([1 << 60, 1 << 62], total_bytes=0),
            LimitExceededError,
            "the limit is 2147483648 bytes",
        ),
        (header_chunk([1 << 29, 2]), LimitExceededError, "needs 4294967296 bytes"),
    ],
)
def test_declared_header_is_checked_before_allocation(
    chunk: Chunks, error: type[Exception], message: str
) -> None:
    before = buffered()
    with pytest.raises(error, match=message):
        TensorAssembler().feed(chunk[0])
    assert buffered() == before


def test_configured_limits_apply() -> None:
    small = TensorLimits(max_tensor_bytes=100, max_rank=1, dtypes=frozenset({torch.int32}))
    with pytest.raises(LimitExceededError, match="needs 160 bytes; the limit is 100"):
        list(iter_tensors(good(), small))
    with pytest.raises(InvalidArgumentError, match="rank 2 exceeds the limit of 1"):
        list(iter_tensors(iter_chunks(torch.zeros(2, 2, dtype=torch.int32), "m"), small))
    with pytest.raises(InvalidArgumentError, match=r"dtype torch\.float32 is not accepted here"):
        list(iter_tensors(iter_chunks(torch.zeros(2), "f"), small))
    only_raw = TensorLimits(encodings=frozenset({"raw"}))
    with pytest.raises(InvalidArgumentError, match="'int8' is not accepted here"):
        list(iter_tensors(iter_chunks(torch.zeros(2), "f", encoding="int8"), only_raw))


def test_default_limit_is_two_gib() -> None:
    assert TensorLimits().max_tensor_bytes == DEFAULT_MAX_TENSOR_BYTES == 2 << 30


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tensor_bytes": 0}, "max_tensor_bytes must be positive"),
        ({"max_rank": 65}, "max_rank must be between 0 and 64"),
        ({"encodings": frozenset({"nope"})}, "unknown wire encoding"),
        ({"dtypes": frozenset({torch.complex64})}, "not supported on the wire"),
    ],
)
def test_limits_validate_themselves(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TensorLimits(**kwargs)  # type: ignore[arg-type]


def test_bool_payload_with_other_bytes_is_rejected() -> None:
    payload = bytes([0, 1, 2])
    chunk = tensor_pb2.TensorChunk(
        seq=0,
        header=tensor_pb2.TensorHeader(
            name="mask",
            dtype=tensor_pb2.DTYPE_BOOL,
            shape=[3],
            total_bytes=3,
            crc32c=google_crc32c.value(payload),
        ),
        data=payload,
    )
    with pytest.raises(InvalidArgumentError, match="bool tensor payload holds bytes other than"):
        list(iter_tensors([chunk]))


def test_a_good_stream_after_a_bad_one_works_on_a_fresh_assembler() -> None:
    with pytest.raises(InvalidArgumentError):
        list(iter_tensors(swap(good())))
    (received,) = list(iter_tensors(good()))
    assert torch.equal(received.tensor, torch.arange(40, dtype=torch.int32))


def test_receive_budget_is_shared_and_released() -> None:
    budget = ReceiveBudget(200)
    first, second = TensorAssembler(budget=budget), TensorAssembler(budget=budget)
    first.feed(good()[0])  # 160 bytes reserved
    assert budget.held == 160
    with pytest.raises(LimitExceededError, match="already hold 160 of 200 bytes; 160 more"):
        second.feed(good()[0])
    assert budget.held == 160
    first.close()
    assert budget.held == 0
    (received,) = list(iter_tensors(good(), budget=budget))
    assert received.name == "h1" and budget.held == 0


def test_receive_budget_validates() -> None:
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        ReceiveBudget(0)


def test_decoded_size_counts_against_the_limit() -> None:
    """An int8 payload declared as float64 decodes to ~8x its wire bytes."""
    limits = TensorLimits(max_tensor_bytes=1 << 20)
    chunk = header_chunk(
        [1, 1 << 20], dtype=tensor_pb2.DTYPE_FLOAT64, encoding="int8", total_bytes=(1 << 20) + 4
    )
    with pytest.raises(LimitExceededError, match="needs 8388608 bytes"):
        TensorAssembler(limits).feed(chunk[0])


def test_empty_tensor_with_huge_dimensions_is_refused() -> None:
    chunk = header_chunk([0, 1 << 62, 1 << 62], total_bytes=0)
    with pytest.raises(LimitExceededError, match="the limit is"):
        TensorAssembler().feed(chunk[0])
    (ok,) = list(iter_tensors(iter_chunks(torch.empty(0, 1000, 3), "e")))
    assert ok.tensor.shape == (0, 1000, 3)


def test_reservation_lasts_until_the_consumer_takes_the_next_tensor() -> None:
    budget = ReceiveBudget(10_000)
    stream = [*good(), *iter_chunks(torch.zeros(8, dtype=torch.int32), "b"), *good()]
    tensors = iter_tensors(stream, budget=budget)
    first = next(tensors)
    assert first.name == "h1" and budget.held == 160  # still in use by the consumer
    second = next(tensors)
    assert second.name == "b" and budget.held == 32
    tensors.close()
    assert budget.held == 0


def test_lossy_encodings_reserve_the_decoded_tensor_too() -> None:
    budget = ReceiveBudget(10_000)
    tensors = iter_tensors(iter_chunks(torch.ones(4, 100), "x", encoding="bf16"), budget=budget)
    next(tensors)
    assert budget.held == 4 * 100 * 2 + 4 * 100 * 4


class ListSink:
    """A TensorSink that records what it is given."""

    def __init__(self, refuse: str = "") -> None:
        self.begun: list[tuple[str, torch.dtype, list[int]]] = []
        self.data = bytearray()
        self.refuse = refuse

    def begin(self, name: str, dtype: torch.dtype, shape: Sequence[int]) -> None:
        if name == self.refuse:
            raise InvalidArgumentError(f"no {name}")
        self.begun.append((name, dtype, list(shape)))

    def write(self, data: memoryview) -> None:
        self.data += data


def feed_all(assembler: TensorAssembler, chunks: Chunks) -> None:
    with assembler:
        for chunk in chunks:
            assembler.feed(chunk)
        assembler.finish()


def test_a_sink_receives_the_raw_bytes_and_nothing_is_buffered() -> None:
    tensors = [torch.randn(7, 5), torch.arange(11, dtype=torch.int64)]
    chunks = [c for i, t in enumerate(tensors) for c in iter_chunks(t, f"t{i}", chunk_bytes=24)]
    sink = ListSink()
    before = buffered()
    done = []
    with TensorAssembler(sink=sink) as assembler:
        for chunk in chunks:
            result = assembler.feed(chunk)
            assert buffered() == before
            if result is not None:
                done.append(result)
        assembler.finish()
    assert [(d.name, d.tensor.device.type, list(d.tensor.shape)) for d in done] == [
        ("t0", "meta", [7, 5]),
        ("t1", "meta", [11]),
    ]
    assert sink.begun == [("t0", torch.float32, [7, 5]), ("t1", torch.int64, [11])]
    assert bytes(sink.data) == b"".join(t.numpy().tobytes() for t in tensors)


def test_a_sink_sees_a_checksum_mismatch_as_data_loss() -> None:
    chunks = good()
    chunks[0].header.crc32c ^= 1
    with pytest.raises(DataLossError, match="checksum"):
        feed_all(TensorAssembler(sink=ListSink()), chunks)


def test_a_sink_is_not_begun_for_a_header_over_the_limits() -> None:
    sink = ListSink()
    limits = TensorLimits(max_tensor_bytes=64)
    with pytest.raises(LimitExceededError), TensorAssembler(limits, sink=sink) as a:
        a.feed(header_chunk([100])[0])
    assert sink.begun == []


def test_a_sink_refusing_a_tensor_stops_the_stream() -> None:
    with pytest.raises(InvalidArgumentError, match="no h1"):
        feed_all(TensorAssembler(sink=ListSink(refuse="h1")), good())


def test_a_sink_gets_encoded_tensors_decoded() -> None:
    tensor = torch.randn(6, 4)
    sink = ListSink()
    with TensorAssembler(sink=sink) as assembler:
        for chunk in iter_chunks(tensor, "w", encoding="bf16", chunk_bytes=10):
            assembler.feed(chunk)
        assembler.finish()
    expected = tensor.to(torch.bfloat16).to(torch.float32)
    assert bytes(sink.data) == expected.numpy().tobytes()
    assert sink.begun == [("w", torch.float32, [6, 4])]


@pytest.mark.parametrize("chunk_bytes", [1000, 64 * 1024 - 1, 64 * 1024, 200_000, 1 << 20])
def test_a_flipped_bit_anywhere_in_a_multi_block_tensor_is_data_loss(chunk_bytes: int) -> None:
    # Received bytes are check-summed and copied a block (64 KiB) at a time: a bit flipped
    # in any block, across chunk and block boundaries, still fails the checksum, and an
    # intact stream arrives bit-exact.
    tensor = torch.arange(300_000, dtype=torch.int32)  # 1.2 MB: many blocks
    [received] = iter_tensors(iter_chunks(tensor, "t", chunk_bytes=chunk_bytes))
    assert torch.equal(received.tensor, tensor)
    for flipped in (0, 64 * 1024 - 1, 64 * 1024, 700_001, 4 * 300_000 - 1):
        chunks = list(iter_chunks(tensor, "t", chunk_bytes=chunk_bytes))
        seq, offset = divmod(flipped, chunk_bytes)
        data = bytearray(chunks[seq].data)
        data[offset] ^= 0x10
        chunks[seq].data = bytes(data)
        with pytest.raises(DataLossError, match="checksum mismatch"):
            list(iter_tensors(chunks))


def test_a_header_that_passed_once_is_still_checked_against_its_own_limits() -> None:
    # TensorLimits remembers headers that passed; others are still refused, and two
    # limits with different memories are equal.
    limits = TensorLimits(max_tensor_bytes=1024, max_rank=2)
    float32 = dtype_to_proto(torch.float32)
    first = limits.check("h1", float32, [4, 8], "raw")
    assert limits.check("h1", float32, [4, 8], "raw") == first
    with pytest.raises(LimitExceededError):
        limits.check("h1", float32, [4, 80], "raw")
    with pytest.raises(InvalidArgumentError, match="rank"):
        limits.check("h1", float32, [1, 4, 8], "raw")
    for i in range(300):  # more passed headers than it keeps
        limits.check(f"t{i}", float32, [i % 8, 1], "raw")
    assert len(limits._passed) <= 256
    assert limits == TensorLimits(max_tensor_bytes=1024, max_rank=2)
    assert hash(limits) == hash(TensorLimits(max_tensor_bytes=1024, max_rank=2))


def _one_chunk(tensor: torch.Tensor, name: str = "h1") -> tensor_pb2.TensorChunk:
    (chunk,) = iter_chunks(tensor, name, chunk_bytes=1 << 20)
    return chunk


def test_a_tensor_in_one_chunk_keeps_its_reservation_until_the_next() -> None:
    budget = ReceiveBudget(1 << 20)
    tensor = torch.arange(10, dtype=torch.float32)
    with TensorAssembler(budget=budget) as assembler:
        received = assembler.feed(_one_chunk(tensor))
        assert received is not None and torch.equal(received.tensor, tensor)
        assert budget.held == 40 and buffered() == 0
        assembler.release_completed()
        assert budget.held == 0
    assert budget.held == 0


@pytest.mark.parametrize(
    ("spoil", "error"),
    [
        (lambda c: setattr(c.header, "crc32c", c.header.crc32c ^ 1), DataLossError),
        (lambda c: setattr(c, "data", b"\2" * len(c.data)), DataLossError),  # checksum
        (lambda c: setattr(c.header, "total_bytes", 5), InvalidArgumentError),
        (lambda c: c.header.shape.__setitem__(0, 3), InvalidArgumentError),  # 12 bytes, not 16
    ],
)
def test_a_bad_tensor_in_one_chunk_holds_nothing(
    spoil: Callable[[tensor_pb2.TensorChunk], None], error: type[Exception]
) -> None:
    budget = ReceiveBudget(1 << 20)
    chunk = _one_chunk(torch.ones(4, dtype=torch.float32))
    spoil(chunk)
    with TensorAssembler(budget=budget) as assembler:
        with pytest.raises(error):
            assembler.feed(chunk)
        assert budget.held == 0 and buffered() == 0 and not assembler.in_progress
        # The stream goes on with the next tensor as with any other.
        assert assembler.feed(_one_chunk(torch.zeros(2))) is not None


def test_a_bool_tensor_in_one_chunk_with_other_bytes_frees_its_reservation() -> None:
    budget = ReceiveBudget(1 << 20)
    chunk = _one_chunk(torch.tensor([True, False, True]))
    chunk.data = b"\x01\x02\x01"
    chunk.header.crc32c = google_crc32c.value(chunk.data)
    with TensorAssembler(budget=budget) as assembler, pytest.raises(InvalidArgumentError):
        assembler.feed(chunk)
    assert budget.held == 0
