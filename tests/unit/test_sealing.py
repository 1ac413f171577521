"""Sealed chunks: AES-256-GCM round trips through the real frame path, and every tampering
the threat model names is refused with the right error.

One module of some 600 lines: one test per tampering of the threat model, all on the
same sealer, opener and frames."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError

from splitfed.errors import (
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SplitfedError,
)
from splitfed.security.sealing import (
    MAX_COUNTER,
    TAG_BYTES,
    TO_BACKBONE,
    TO_CLIENT,
    DataKey,
    FrameContext,
    Opener,
    ReplayWindow,
    Sealer,
)
from splitfed.security.session_crypto import SessionCrypto
from splitfed.v1 import backbone_pb2, tensor_pb2
from splitfed.wire import (
    ChunkView,
    FrameSpec,
    IncomingFrame,
    OutgoingFrame,
    ReceivedTensor,
    TensorAssembler,
    iter_frames,
)

SPEC: FrameSpec[backbone_pb2.TrainRequest] = FrameSpec(backbone_pb2.TrainRequest)
SESSION = "session-a"
CONTEXT = FrameContext(op=backbone_pb2.TRAIN_OP_FORWARD, step=7, micro_batch=1)
_prefixes = itertools.count(1)


def _secret(key_id: int) -> bytes:
    return hashlib.sha256(b"test key %d" % key_id).digest()


def sender_key(key_id: int = 1) -> DataKey:
    """A key as the sender gets it; every call a new nonce prefix (as the key manager)."""
    return DataKey(key_id, _secret(key_id), next(_prefixes).to_bytes(4, "big"))


def any_key(key_id: int) -> DataKey:
    """A key source that knows every key id (so a flipped id yields a wrong key)."""
    return DataKey(key_id, _secret(key_id), b"\0\0\0\0")


def known_keys(*ids: int) -> Callable[[int], DataKey]:
    def keys(key_id: int) -> DataKey:
        if key_id not in ids:
            raise NotFoundError(f"no key {key_id}")
        return any_key(key_id)

    return keys


def chunk_of(frame: OutgoingFrame) -> tensor_pb2.TensorChunk:
    assert isinstance(frame.message, backbone_pb2.TrainRequest)
    return frame.message.chunk


def message_for(context: FrameContext) -> backbone_pb2.TrainRequest:
    return backbone_pb2.TrainRequest(
        op=context.op,  # type: ignore[arg-type]
        step=context.step,
        micro_batch=context.micro_batch,
    )


def frames_of(
    tensor: torch.Tensor,
    name: str = "h1",
    *,
    chunk_bytes: int = 64,
    context: FrameContext = CONTEXT,
) -> Iterator[OutgoingFrame]:
    for frame in iter_frames(tensor, name, SPEC, chunk_bytes=chunk_bytes):
        message = message_for(context)
        message.chunk.CopyFrom(chunk_of(frame))
        yield OutgoingFrame(message, frame.data)


def sealed_wire(
    sealer: Sealer,
    tensor: torch.Tensor,
    name: str = "h1",
    *,
    chunk_bytes: int = 64,
    context: FrameContext = CONTEXT,
) -> list[bytes]:
    frames = frames_of(tensor, name, chunk_bytes=chunk_bytes, context=context)
    return [SPEC.serialize(frame) for frame in sealer.seal_frames(frames, context)]


def open_all(
    opener: Opener, wire: Iterable[bytes], context: FrameContext | None = None
) -> list[ReceivedTensor]:
    out: list[ReceivedTensor] = []
    with TensorAssembler() as assembler:
        for raw in wire:
            frame = SPEC.parse(raw)
            ctx = FrameContext.from_message(frame.message) if context is None else context
            done = assembler.feed(opener.open_frame(frame, ctx))
            if done is not None:
                out.append(done)
        assembler.finish()
    return out


def new_opener(session: str = SESSION, direction: str = TO_BACKBONE, **kw: Any) -> Opener:
    return Opener(session, direction, kw.pop("keys", any_key), **kw)


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=generator).to(
        dtype
    )


# --- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        (torch.float32, (4, 33)),
        (torch.bfloat16, (3, 5, 7)),
        (torch.float16, (1,)),
        (torch.float64, ()),
        (torch.int64, (10,)),
        (torch.int8, (2, 3)),
        (torch.uint8, (300,)),
        (torch.bool, (17,)),
        (torch.float32, (0,)),
        (torch.bfloat16, (4, 0, 2)),
    ],
)
@pytest.mark.parametrize("chunk_bytes", [16, 64, 1 << 20])
def test_round_trip_through_frames(
    dtype: torch.dtype, shape: tuple[int, ...], chunk_bytes: int
) -> None:
    tensor = sample(dtype, shape)
    wire = sealed_wire(Sealer(SESSION, TO_BACKBONE, sender_key()), tensor, chunk_bytes=chunk_bytes)
    expected_chunks = max(1, -(-tensor.numel() * tensor.element_size() // chunk_bytes))
    assert len(wire) == expected_chunks
    [received] = open_all(new_opener(), wire)
    assert received.name == "h1"
    assert received.tensor.dtype == dtype
    assert received.tensor.shape == tensor.shape
    assert torch.equal(received.tensor, tensor)


def test_several_tensors_on_one_stream_and_context_from_message() -> None:
    sealer = Sealer(SESSION, TO_BACKBONE, sender_key())
    h1, mask = sample(torch.float32, (8, 16)), sample(torch.int64, (8,), seed=1)
    wire = sealed_wire(sealer, h1, "h1") + sealed_wire(sealer, mask, "attention_mask")
    received = open_all(new_opener(), wire)  # context read from each message
    assert [r.name for r in received] == ["h1", "attention_mask"]
    assert torch.equal(received[0].tensor, h1)
    assert torch.equal(received[1].tensor, mask)


def test_seal_frame_tracks_name_across_chunks() -> None:
    sealer = Sealer(SESSION, TO_BACKBONE, sender_key())
    tensor = sample(torch.float32, (64,))
    frames = [sealer.seal_frame(f, CONTEXT) for f in frames_of(tensor, "grad_h2")]
    assert len(frames) == 4
    [received] = open_all(new_opener(), [SPEC.serialize(f) for f in frames])
    assert received.name == "grad_h2"
    assert torch.equal(received.tensor, tensor)


def test_empty_tensor_is_sealed_and_header_authenticated() -> None:
    sealer = Sealer(SESSION, TO_BACKBONE, sender_key())
    [frame] = sealer.seal_frames(frames_of(torch.empty(0, 5)), CONTEXT)
    assert chunk_of(frame).HasField("seal")
    assert frame.data.size == TAG_BYTES
    tampered = SPEC.parse(SPEC.serialize(frame))
    tampered.message.chunk.header.shape[1] = 6
    with pytest.raises(DataLossError):
        new_opener().open_frame(tampered, CONTEXT)


def test_wire_bytes_hide_the_plaintext() -> None:
    # A distinctive payload: a repeating, recognisable byte pattern.
    pattern = np.frombuffer(b"SPLITFED-SECRET!" * 64, dtype=np.uint8).copy()
    tensor = torch.from_numpy(pattern)
    plain = pattern.tobytes()
    wire = b"".join(
        sealed_wire(Sealer(SESSION, TO_BACKBONE, sender_key()), tensor, chunk_bytes=256)
    )
    assert b"SPLITFED-SECRET!" not in wire
    for start in range(0, len(plain) - 16, 8):
        assert plain[start : start + 16] not in wire
    # ...and the same payload unsealed does show it (the check can fail).
    unsealed = b"".join(SPEC.serialize(f) for f in frames_of(tensor, chunk_bytes=256))
    assert b"SPLITFED-SECRET!" in unsealed


def test_frames_have_distinct_nonces_and_stated_key() -> None:
    key = sender_key(3)
    sealer = Sealer(SESSION, TO_BACKBONE, key)
    wire = sealed_wire(sealer, sample(torch.float32, (100,)), chunk_bytes=40)
    seals = [SPEC.parse(raw).message.chunk.seal for raw in wire]
    assert {s.key_id for s in seals} == {3}
    assert [s.nonce for s in seals] == [
        key.nonce_prefix + n.to_bytes(8, "big") for n in range(len(seals))
    ]


# --- tampering -----------------------------------------------------------------------


def _first_frame() -> IncomingFrame[backbone_pb2.TrainRequest]:
    sealer = Sealer(SESSION, TO_BACKBONE, sender_key(5))
    return SPEC.parse(sealed_wire(sealer, sample(torch.float32, (8,)))[0])


def _with(
    frame: IncomingFrame[backbone_pb2.TrainRequest],
    data: bytes | None = None,
    edit: Callable[[backbone_pb2.TrainRequest], None] | None = None,
) -> IncomingFrame[backbone_pb2.TrainRequest]:
    message = backbone_pb2.TrainRequest()
    message.CopyFrom(frame.message)
    if edit is not None:
        edit(message)
    return IncomingFrame(message, memoryview(bytes(frame.data) if data is None else data))


def test_untampered_reference_frame_opens() -> None:
    view = new_opener().open_frame(_first_frame(), CONTEXT)
    assert len(view.data) == 32


def test_bit_flip_in_ciphertext_or_tag_is_data_loss() -> None:
    frame = _first_frame()
    data = bytes(frame.data)
    assert len(data) == 32 + TAG_BYTES
    for position in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[position // 8] ^= 1 << (position % 8)
        with pytest.raises(DataLossError, match="does not authenticate"):
            new_opener().open_frame(_with(frame, bytes(flipped)), CONTEXT)


def test_bit_flip_in_nonce_is_data_loss() -> None:
    frame = _first_frame()
    for position in range(12 * 8):

        def flip(message: backbone_pb2.TrainRequest, position: int = position) -> None:
            nonce = bytearray(message.chunk.seal.nonce)
            nonce[position // 8] ^= 1 << (position % 8)
            message.chunk.seal.nonce = bytes(nonce)

        with pytest.raises(DataLossError):
            new_opener().open_frame(_with(frame, edit=flip), CONTEXT)


def test_bit_flip_in_key_id_is_data_loss() -> None:
    frame = _first_frame()
    for bit in range(32):

        def flip(message: backbone_pb2.TrainRequest, bit: int = bit) -> None:
            message.chunk.seal.key_id ^= 1 << bit

        with pytest.raises(DataLossError):
            new_opener().open_frame(_with(frame, edit=flip), CONTEXT)


def test_unknown_key_error_propagates() -> None:
    frame = _first_frame()
    with pytest.raises(NotFoundError):
        new_opener(keys=known_keys(1, 2)).open_frame(frame, CONTEXT)


def test_bit_flip_anywhere_in_the_wire_message_is_refused() -> None:
    sealer = Sealer(SESSION, TO_BACKBONE, sender_key())
    [raw] = sealed_wire(sealer, sample(torch.float32, (4,)))
    assert open_all(new_opener(), [raw])  # unflipped: fine
    for position in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[position // 8] ^= 1 << (position % 8)
        with pytest.raises((SplitfedError, DecodeError)):
            open_all(new_opener(), [bytes(flipped)])  # context from the message


def test_header_shape_tampering_is_data_loss() -> None:
    frame = _first_frame()

    def reshape(message: backbone_pb2.TrainRequest) -> None:
        message.chunk.header.shape[0] = 4
        message.chunk.header.total_bytes = 16

    with pytest.raises(DataLossError):
        new_opener().open_frame(_with(frame, edit=reshape), CONTEXT)


def test_replayed_chunk_is_invalid_argument() -> None:
    sealer = Sealer(SESSION, TO_BACKBONE, sender_key())
    wire = sealed_wire(sealer, sample(torch.float32, (8,)))
    opener = new_opener()
    opener.open_frame(SPEC.parse(wire[0]), CONTEXT)
    with pytest.raises(InvalidArgumentError, match="replayed or reordered"):
        opener.open_frame(SPEC.parse(wire[0]), CONTEXT)
    # The same tensor sent again (a later, fresh counter) opens.
    again = sealed_wire(sealer, sample(torch.float32, (8,)))
    opener.open_frame(SPEC.parse(again[0]), CONTEXT)


def test_swapped_frames_are_refused() -> None:
    sealer = Sealer(SESSION, TO_BACKBONE, sender_key())
    wire = sealed_wire(sealer, sample(torch.float32, (48,)), chunk_bytes=64)
    assert len(wire) == 3
    with pytest.raises(InvalidArgumentError):
        open_all(new_opener(), [wire[0], wire[2], wire[1]])


def test_swapped_payloads_keeping_seq_are_data_loss() -> None:
    sealer = Sealer(SESSION, TO_BACKBONE, sender_key())
    frames = [
        SPEC.parse(raw) for raw in sealed_wire(sealer, sample(torch.float32, (48,)), chunk_bytes=64)
    ]
    opener = new_opener()
    opener.open_frame(frames[0], CONTEXT)

    def moved_seal(message: backbone_pb2.TrainRequest) -> None:
        message.chunk.seal.CopyFrom(frames[2].message.chunk.seal)

    # Chunk 2's sealed payload presented as chunk 1 (its own later nonce): position bound.
    with pytest.raises(DataLossError):
        opener.open_frame(_with(frames[1], bytes(frames[2].data), moved_seal), CONTEXT)


def test_chunk_moved_to_another_tensor_is_data_loss() -> None:
    # Two senders (own nonce prefixes) so that the replay check does not decide.
    sealer_a = Sealer(SESSION, TO_BACKBONE, sender_key())
    sealer_b = Sealer(SESSION, TO_BACKBONE, sender_key())
    a = [SPEC.parse(raw) for raw in sealed_wire(sealer_a, sample(torch.float32, (32,)), "h1")]
    b = [SPEC.parse(raw) for raw in sealed_wire(sealer_b, sample(torch.float32, (32,)), "mask")]
    opener = new_opener()
    opener.open_frame(b[0], CONTEXT)  # now expecting seq 1 of "mask"
    with pytest.raises(DataLossError, match="'mask'"):
        opener.open_frame(a[1], CONTEXT)  # seq 1 of "h1"
    opener.open_frame(b[1], CONTEXT)


@pytest.mark.parametrize(
    ("session", "direction", "context"),
    [
        ("session-b", TO_BACKBONE, CONTEXT),
        (SESSION, TO_CLIENT, CONTEXT),
        (SESSION, TO_BACKBONE, FrameContext(CONTEXT.op, CONTEXT.step + 1, CONTEXT.micro_batch)),
        (SESSION, TO_BACKBONE, FrameContext(CONTEXT.op, CONTEXT.step, CONTEXT.micro_batch + 1)),
        (SESSION, TO_BACKBONE, FrameContext(backbone_pb2.TRAIN_OP_BACKWARD, CONTEXT.step, 1)),
    ],
    ids=["other-session", "other-direction", "other-step", "other-micro-batch", "other-op"],
)
def test_opened_in_another_context_is_data_loss(
    session: str, direction: str, context: FrameContext
) -> None:
    frame = _first_frame()
    with pytest.raises(DataLossError):
        new_opener(session, direction).open_frame(frame, context)


def test_step_field_rewritten_in_message_is_data_loss() -> None:
    frame = _first_frame()

    def restep(message: backbone_pb2.TrainRequest) -> None:
        message.step += 1

    tampered = _with(frame, edit=restep)
    with pytest.raises(DataLossError):
        new_opener().open_frame(tampered, FrameContext.from_message(tampered.message))


def test_unsealed_chunk_is_invalid_argument() -> None:
    [frame] = frames_of(sample(torch.float32, (4,)))
    incoming = SPEC.parse(SPEC.serialize(frame))
    with pytest.raises(InvalidArgumentError, match="not sealed"):
        new_opener().open_frame(incoming, CONTEXT)


def test_stripped_seal_is_invalid_argument() -> None:
    frame = _first_frame()
    with pytest.raises(InvalidArgumentError, match="not sealed"):
        new_opener().open_frame(_with(frame, edit=lambda m: m.chunk.ClearField("seal")), CONTEXT)


@pytest.mark.parametrize("nonce", [b"", b"\0" * 11, b"\0" * 13])
def test_malformed_nonce_is_invalid_argument(nonce: bytes) -> None:
    frame = _first_frame()

    def set_nonce(message: backbone_pb2.TrainRequest) -> None:
        message.chunk.seal.nonce = nonce

    with pytest.raises(InvalidArgumentError, match="nonce"):
        new_opener().open_frame(_with(frame, edit=set_nonce), CONTEXT)


def test_truncated_payload_is_data_loss() -> None:
    frame = _first_frame()
    with pytest.raises(DataLossError):
        new_opener().open_frame(_with(frame, b"\0" * (TAG_BYTES - 1)), CONTEXT)


def test_later_chunk_without_header_first_is_invalid_argument() -> None:
    sealer = Sealer(SESSION, TO_BACKBONE, sender_key())
    wire = sealed_wire(sealer, sample(torch.float32, (32,)))
    with pytest.raises(InvalidArgumentError, match="without a preceding header"):
        new_opener().open_frame(SPEC.parse(wire[1]), CONTEXT)


# --- keys: rotation, replay state, nonce uniqueness -------------------------------------


def test_rotation_mid_stream_opens_and_nonces_never_repeat() -> None:
    key1, key2 = sender_key(1), sender_key(2)
    sealer = Sealer(SESSION, TO_BACKBONE, key1)
    first = frames_of(sample(torch.float32, (64,)), "h1")
    wire = [SPEC.serialize(sealer.seal_frame(next(first), CONTEXT))]
    wire.append(SPEC.serialize(sealer.seal_frame(next(first), CONTEXT)))
    sealer.rotate(key2)  # mid-tensor
    wire += [SPEC.serialize(sealer.seal_frame(f, CONTEXT)) for f in first]
    wire += sealed_wire(sealer, sample(torch.float32, (64,), seed=2), "h2")
    seals = [SPEC.parse(raw).message.chunk.seal for raw in wire]
    assert [s.key_id for s in seals] == [1, 1] + [2] * 6
    nonces = [(s.key_id, s.nonce) for s in seals]
    assert len(set(nonces)) == len(nonces)
    assert all(n.startswith(key1.nonce_prefix) for k, n in nonces if k == 1)
    assert all(n.startswith(key2.nonce_prefix) for k, n in nonces if k == 2)

    opener = new_opener(keys=known_keys(1, 2))
    received = open_all(opener, wire)
    assert torch.equal(received[0].tensor, sample(torch.float32, (64,)))
    assert torch.equal(received[1].tensor, sample(torch.float32, (64,), seed=2))
    assert opener.newest_key_id == 2
    assert opener.opened_key_ids == {1, 2}
    opener.retire_before(2)
    assert opener.opened_key_ids == {2}
    stale = Sealer(SESSION, TO_BACKBONE, sender_key(1))
    with pytest.raises(InvalidArgumentError, match="retired"):
        opener.open_frame(SPEC.parse(sealed_wire(stale, torch.ones(2))[0]), CONTEXT)


def test_rotation_must_increase_key_id() -> None:
    sealer = Sealer(SESSION, TO_BACKBONE, sender_key(4))
    for key_id in (4, 3):
        with pytest.raises(ValueError, match="must increase"):
            sealer.rotate(sender_key(key_id))
    assert sealer.key_id == 4


def test_second_sealer_with_the_same_key_and_prefix_is_refused() -> None:
    key = sender_key(1)
    Sealer(SESSION, TO_BACKBONE, key)
    with pytest.raises(ValueError, match="nonces would repeat"):
        Sealer(SESSION, TO_CLIENT, key)


def test_counter_never_wraps() -> None:
    sealer = Sealer(SESSION, TO_BACKBONE, sender_key())
    sealer._counter = MAX_COUNTER  # test-only: the last nonce of the key
    [last] = sealer.seal_frames(frames_of(torch.ones(1)), CONTEXT)
    assert chunk_of(last).seal.nonce.endswith(b"\xff" * 8)
    with pytest.raises(FailedPreconditionError, match="rotate"):
        list(sealer.seal_frames(frames_of(torch.ones(1)), CONTEXT))
    sealer.rotate(sender_key(2))
    [first] = sealer.seal_frames(frames_of(torch.ones(1)), CONTEXT)
    assert chunk_of(first).seal.nonce.endswith(b"\0" * 8)


def test_replay_state_is_bounded_by_retiring_old_keys() -> None:
    opener = new_opener(max_replay_entries=2)
    for key_id in (1, 2, 3):
        sealer = Sealer(SESSION, TO_BACKBONE, sender_key(key_id))
        open_all(opener, sealed_wire(sealer, torch.ones(2)))
    assert opener.opened_key_ids == {2, 3}
    stale = Sealer(SESSION, TO_BACKBONE, sender_key(1))
    with pytest.raises(InvalidArgumentError, match="retired"):
        open_all(opener, sealed_wire(stale, torch.ones(2)))


def test_too_many_prefixes_under_one_key_is_refused() -> None:
    opener = new_opener(max_replay_entries=2)
    sealers = [Sealer(SESSION, TO_BACKBONE, sender_key(9)) for _ in range(3)]
    for sealer in sealers[:2]:
        open_all(opener, sealed_wire(sealer, torch.ones(2)))
    with pytest.raises(InvalidArgumentError, match="nonce prefixes"):
        open_all(opener, sealed_wire(sealers[2], torch.ones(2)))


# --- values ---------------------------------------------------------------------------


def test_data_key_validates_and_hides_secret() -> None:
    key = sender_key(7)
    assert key.secret.hex() not in repr(key)
    assert key.secret.hex() not in str(key)
    assert "key_id=7" in repr(key)
    for bad in (
        {"key_id": 0},
        {"key_id": 1 << 32},
        {"secret": b"\0" * 16},
        {"nonce_prefix": b"\0" * 8},
    ):
        fields = {"key_id": 1, "secret": b"\0" * 32, "nonce_prefix": b"\0" * 4, **bad}
        with pytest.raises(ValueError):  # noqa: PT011
            DataKey(**fields)  # type: ignore[arg-type]


def test_endpoint_and_context_validation() -> None:
    with pytest.raises(ValueError, match="direction"):
        Sealer(SESSION, "sideways", sender_key())
    with pytest.raises(ValueError, match="session_id"):
        Opener("", TO_CLIENT, any_key)
    with pytest.raises(ValueError, match="step"):
        FrameContext(step=-1)
    assert FrameContext.from_message(message_for(CONTEXT)) == CONTEXT


def test_chunk_view_input_is_accepted() -> None:
    frame = _first_frame()
    view = new_opener().open_frame(ChunkView(frame.message.chunk, frame.data), CONTEXT)
    assert len(view.data) == 32


def test_claimed_keys_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from splitfed.security import sealing

    monkeypatch.setattr(sealing, "MAX_CLAIMED_KEYS", 2)
    monkeypatch.setattr(sealing, "_claimed", {})
    first = sender_key()
    Sealer(SESSION, TO_BACKBONE, first)
    Sealer(SESSION, TO_BACKBONE, sender_key())
    with pytest.raises(ValueError, match="nonces would repeat"):
        Sealer(SESSION, TO_BACKBONE, first)
    Sealer(SESSION, TO_BACKBONE, sender_key())  # the first claim is forgotten now
    Sealer(SESSION, TO_BACKBONE, first)


# --- replay state shared by the streams of a session (issue 15, item 9) -------------


def receiving_crypto() -> SessionCrypto:
    """The backbone's side of a session: it opens what the client sealed."""
    return SessionCrypto(SESSION, TO_CLIENT, any_key)


def test_a_chunk_opened_on_one_stream_is_refused_on_another_stream_of_the_session() -> None:
    crypto = receiving_crypto()
    sealer = Sealer(SESSION, TO_BACKBONE, sender_key())
    wire = sealed_wire(sealer, sample(torch.float32, (48,)))
    open_all(crypto.opener(), wire)
    with pytest.raises(InvalidArgumentError, match="replayed"):
        open_all(crypto.opener(), wire)
    # A single chunk of it, too; and fresh chunks still open on a new stream.
    with pytest.raises(InvalidArgumentError, match="replayed"):
        open_all(crypto.opener(), wire[:1])
    open_all(crypto.opener(), sealed_wire(sealer, sample(torch.float32, (48,))))


def test_concurrent_streams_of_a_session_open_their_chunks_in_any_interleaving() -> None:
    """One sealer serves the sender's concurrent streams, so a later counter can arrive
    on one stream before an earlier one on another: both open, each once."""
    crypto = receiving_crypto()
    sealer = Sealer(SESSION, TO_BACKBONE, sender_key())
    first = sealed_wire(sealer, sample(torch.float32, (48,), seed=1))
    second = sealed_wire(sealer, sample(torch.float32, (48,), seed=2))
    (b,) = open_all(crypto.opener(), second)
    (a,) = open_all(crypto.opener(), first)
    assert torch.equal(a.tensor, sample(torch.float32, (48,), seed=1))
    assert torch.equal(b.tensor, sample(torch.float32, (48,), seed=2))
    for wire in (first, second):
        with pytest.raises(InvalidArgumentError, match="replayed"):
            open_all(crypto.opener(), wire)


def test_the_shared_replay_window_is_bounded() -> None:
    window = ReplayWindow(window=8, max_entries=2)
    entry = (1, b"\0\0\0\1")
    window.accept(entry, 20)
    window.accept(entry, 13)  # 7 behind the newest: inside the window
    with pytest.raises(InvalidArgumentError, match="replayed"):
        window.accept(entry, 13)
    with pytest.raises(InvalidArgumentError, match="too far behind"):
        window.accept(entry, 12)
    window.accept((2, b"\0\0\0\1"), 0)
    window.accept((3, b"\0\0\0\1"), 0)  # a third entry retires key 1
    with pytest.raises(InvalidArgumentError, match="retired"):
        window.accept(entry, 21)
    assert window.entries == 2
