"""Sealed chunks: AES-256-GCM on tensor payloads, above TLS.

What it protects, and from whom
-------------------------------
Activations and gradients cross the network as ``TensorChunk`` payloads inside mutual
TLS. TLS protects them per hop: a TLS-terminating proxy, load balancer or service mesh
sidecar between a client and the backbone sees them in plaintext. Sealing encrypts and
authenticates each chunk's payload end to end between the two parties of a session, with
a data key that only they obtain from the key manager (``GetSessionKey``). A party in the
middle can still drop or delay whole frames (the stream then fails or times out), but it
can neither read a payload nor alter, reorder, replay or move a chunk to another tensor,
step, session or direction without the receiver refusing it.

On the wire (``TensorChunk.seal``, docs/wire.md): ``seal.key_id`` names the session data
key, ``seal.nonce`` is 12 bytes (the sender's 4-byte nonce prefix, then a big-endian
8-byte counter), and ``data`` is the AES-256-GCM ciphertext of the plaintext payload
followed by the 16-byte tag. An empty tensor's single header chunk is sealed too: its
``data`` is the tag alone, which authenticates the header.

Nonces are never reused: the key manager hands each party of a session a nonce prefix of
its own for each key (never the same prefix twice for a key), and a :class:`Sealer`
counts up from 0 under its prefix. Construct one :class:`Sealer` per (session,
direction) and keep it for the session's life; a process refuses a second sealer for a
key and prefix it has sealed under before (the last 65536 such keys), and a sealer
refuses to count past 2**64 - 1 (rotate first).

The associated data (authenticated, not sent) binds each chunk to: the session id, the
direction (:data:`TO_BACKBONE` or :data:`TO_CLIENT`), the key id, the frame's
:class:`FrameContext` (op, step, micro-batch), the tensor's name, the chunk's ``seq``
and, for the header chunk, the header itself (deterministic protobuf serialisation), so
shape, dtype, encoding, size and checksum cannot be altered. An :class:`Opener` also
refuses a nonce counter that does not increase under a (key id, prefix) on its stream, so
a replayed or reordered chunk fails even where it would authenticate; and, given the
session's :class:`ReplayWindow` (one per session and direction, shared by every receiving
stream, as :class:`~splitfed.security.session_crypto.SessionCrypto` does), a chunk that
any stream of the session opened before, so a chunk replayed into another stream fails
too. The window accepts counters out of order across streams (the sender's streams
share one sealer) up to :data:`DEFAULT_REPLAY_WINDOW` behind the newest.

What stays visible to someone who sees the TLS plaintext: the stream's other fields (op,
step, micro-batch, commands and results), the tensor header (name, dtype, shape, encoding,
``total_bytes``, and the CRC-32C of the *plaintext* payload, which lets an observer
confirm a guessed payload), chunk sizes and timing, key ids and nonces.

Use
---
Sender, once per (session, direction)::

    sealer = Sealer(session_id, TO_BACKBONE, key)          # key: a DataKey
    context = FrameContext(op=TRAIN_OP_FORWARD, step=7, micro_batch=0)
    frames = sealer.seal_frames(iter_frames(h1, "h1", REQUEST_FRAMES), context)
    ...
    sealer.rotate(newer_key)                                # key ids must increase

Receiver, one :class:`ReplayWindow` per (session, direction) and one :class:`Opener`
per receiving stream (its own replay state assumes the frames of one stream, in order)::

    window = ReplayWindow()                                 # once per session, direction
    opener = Opener(session_id, TO_BACKBONE, keys, shared=window)  # keys: id -> DataKey
    for frame in requests:
        view = opener.open_frame(frame, FrameContext.from_message(frame.message))
        done = assembler.feed(view)
    opener.retire_before(opener.newest_key_id)              # when older keys are gone

:meth:`Opener.open_frame` raises :class:`~splitfed.errors.DataLossError` when a chunk does
not authenticate, and :class:`~splitfed.errors.InvalidArgumentError` for an unsealed
chunk, a malformed seal, a replayed or reordered nonce, or a retired key; the ``keys``
callable's own errors (``NotFoundError``, ``PermissionDeniedError``) pass through.

Why one module (over 500 lines): :class:`Sealer` and :class:`Opener` are the two halves
of one AEAD format (nonce layout, associated data, key ids, replay window); a reviewer
audits them together, and a change to one side without the other breaks every session.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import Message

from splitfed.errors import DataLossError, FailedPreconditionError, InvalidArgumentError
from splitfed.v1 import tensor_pb2
from splitfed.wire import ChunkView, IncomingFrame, OutgoingFrame

TO_BACKBONE: Final = "to_backbone"
TO_CLIENT: Final = "to_client"
DIRECTIONS: Final = frozenset({TO_BACKBONE, TO_CLIENT})

KEY_BYTES: Final = 32
NONCE_PREFIX_BYTES: Final = 4
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
MAX_KEY_ID: Final = (1 << 32) - 1
MAX_COUNTER: Final = (1 << 64) - 1
_MAX_U64: Final = (1 << 64) - 1
DEFAULT_MAX_REPLAY_ENTRIES: Final = 64
# Counters a ReplayWindow remembers below the newest under a key and prefix: chunks of
# concurrent streams may arrive this far out of order (at 4 MiB chunks, 64 GiB). A bitmap
# of this many bits (2 KiB) per (key id, prefix).
DEFAULT_REPLAY_WINDOW: Final = 1 << 14

# Version tag of the associated-data layout; change it if the layout ever changes.
_AD_MAGIC: Final = b"splitfed/seal/v1\x00"
_CONTEXT: Final = struct.Struct(">IQQQI")  # key id, op, step, micro-batch, seq
_LENGTH: Final = struct.Struct(">I")


def _counted(value: bytes) -> bytes:
    return _LENGTH.pack(len(value)) + value


@dataclass(frozen=True, repr=False)
class DataKey:
    """A session data key as the key manager issues it (``SessionKey``).

    ``secret`` is the 32-byte AES-256 key; ``nonce_prefix`` the 4 bytes that this party's
    nonces start with under this key (a receiver ignores it: prefixes travel in nonces).
    The repr never shows the secret.
    """

    key_id: int
    secret: bytes
    nonce_prefix: bytes

    def __post_init__(self) -> None:
        if isinstance(self.key_id, bool) or not isinstance(self.key_id, int):
            raise TypeError(f"key_id must be an int, got {type(self.key_id).__name__}")
        if not 1 <= self.key_id <= MAX_KEY_ID:
            raise ValueError(f"key_id must be between 1 and {MAX_KEY_ID}, got {self.key_id}")
        if not isinstance(self.secret, bytes) or len(self.secret) != KEY_BYTES:
            raise ValueError(f"secret of key {self.key_id} must be {KEY_BYTES} bytes")
        if not isinstance(self.nonce_prefix, bytes) or len(self.nonce_prefix) != (
            NONCE_PREFIX_BYTES
        ):
            raise ValueError(
                f"nonce_prefix of key {self.key_id} must be {NONCE_PREFIX_BYTES} bytes"
            )

    def __repr__(self) -> str:
        return f"DataKey(key_id={self.key_id}, nonce_prefix={self.nonce_prefix.hex()}, secret=...)"


@dataclass(frozen=True, slots=True)
class FrameContext:
    """What a frame's other fields say and both sides know; bound into every seal.

    ``op`` is the stream's op enum value, ``step`` the optimizer step, ``micro_batch``
    the micro-batch within it; 0 where a stream has no such field.
    """

    op: int = 0
    step: int = 0
    micro_batch: int = 0

    def __post_init__(self) -> None:
        for name in ("op", "step", "micro_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"FrameContext.{name} must be an int, got {value!r}")
            if not 0 <= value <= _MAX_U64:
                raise ValueError(f"FrameContext.{name} must be between 0 and 2**64 - 1")

    @classmethod
    def from_message(cls, message: Message) -> FrameContext:
        """The context a stream message declares: its ``op``, ``step`` and
        ``micro_batch`` fields, each 0 where the message type has none. A receiver that
        takes the context from the message authenticates those fields with the chunk."""
        fields = message.DESCRIPTOR.fields_by_name
        op, step, micro_batch = (
            int(getattr(message, name)) if name in fields else 0
            for name in ("op", "step", "micro_batch")
        )
        return cls(op, step, micro_batch)


def _check_endpoint(session_id: str, direction: str) -> bytes:
    if not isinstance(session_id, str) or not session_id:
        raise ValueError("session_id must be a non-empty string")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be {TO_BACKBONE!r} or {TO_CLIENT!r}, got {direction!r}")
    return _AD_MAGIC + _counted(session_id.encode()) + _counted(direction.encode())


def _associated_data(
    endpoint: bytes,
    key_id: int,
    context: FrameContext,
    seq: int,
    name: str,
    header: bytes | None,
) -> bytes:
    return b"".join(
        (
            endpoint,
            _CONTEXT.pack(key_id, context.op, context.step, context.micro_batch, seq),
            _counted(name.encode()),
            b"\x00" if header is None else b"\x01" + _counted(header),
        )
    )


def _header_bytes(chunk: tensor_pb2.TensorChunk) -> bytes | None:
    if not chunk.HasField("header"):
        return None
    return chunk.header.SerializeToString(deterministic=True)


# Digests of (key id, prefix, secret) of the keys given to Sealers in this process, so
# that a second Sealer with the same key and prefix, which would count its nonces from 0
# again, is refused. A best-effort guard, bounded to the most recent claims (a long-lived
# server sees many sessions); nonce uniqueness itself rests on the key manager handing
# out each prefix once per key.
MAX_CLAIMED_KEYS: Final = 1 << 16
_claimed: dict[bytes, None] = {}
_claimed_lock = threading.Lock()


def _claim(key: DataKey) -> None:
    fingerprint = hashlib.sha256(
        b"splitfed/sealer-key\x00" + key.key_id.to_bytes(4, "big") + key.nonce_prefix + key.secret
    ).digest()
    with _claimed_lock:
        if fingerprint in _claimed:
            raise ValueError(
                f"key {key.key_id} with nonce prefix {key.nonce_prefix.hex()} already sealed "
                "in this process; nonces would repeat. Keep one Sealer per session and "
                "direction, or fetch a key with a fresh nonce prefix"
            )
        _claimed[fingerprint] = None
        if len(_claimed) > MAX_CLAIMED_KEYS:
            del _claimed[next(iter(_claimed))]


class Sealer:
    """Seals the chunks one party sends in one direction of one session.

    Thread-safe: frames of concurrent streams may be sealed with one sealer (each takes
    the next nonce). :meth:`seal_frame` remembers the tensor name of the last header chunk
    it sealed, for that tensor's later chunks, so frames of one tensor must go through
    it in order; :meth:`seal_frames` keeps the name per call, for concurrent streams.
    """

    def __init__(self, session_id: str, direction: str, key: DataKey) -> None:
        self.session_id = session_id
        self.direction = direction
        self._endpoint = _check_endpoint(session_id, direction)
        self._lock = threading.Lock()
        self._name: str | None = None
        self._set_key(key)

    def _set_key(self, key: DataKey) -> None:
        if not isinstance(key, DataKey):
            raise TypeError(f"expected a DataKey, got {type(key).__name__}")
        _claim(key)
        self._key = key
        self._aead = AESGCM(key.secret)
        self._counter = 0

    @property
    def key_id(self) -> int:
        """The id of the key that seals the next chunk."""
        return self._key.key_id

    def rotate(self, key: DataKey) -> None:
        """Seal from now on with ``key``, whose id must be above the current one."""
        with self._lock:
            if key.key_id <= self._key.key_id:
                raise ValueError(
                    f"cannot rotate from key {self._key.key_id} to key {key.key_id}: "
                    "key ids must increase"
                )
            self._set_key(key)

    def _next(self) -> tuple[int, bytes, AESGCM]:
        with self._lock:
            counter = self._counter
            if counter > MAX_COUNTER:
                raise FailedPreconditionError(
                    f"key {self._key.key_id} has sealed 2**64 chunks; rotate the key"
                )
            self._counter = counter + 1
            nonce = self._key.nonce_prefix + counter.to_bytes(8, "big")
            return self._key.key_id, nonce, self._aead

    def seal_frame(
        self, frame: OutgoingFrame, context: FrameContext, chunk_field: str = "chunk"
    ) -> OutgoingFrame:
        """``frame`` with its chunk sealed: ``seal`` set, the payload replaced by the
        ciphertext and tag (a new array; the tensor is not touched)."""
        chunk: tensor_pb2.TensorChunk = getattr(frame.message, chunk_field)
        name = self._name_for(chunk, self._name)
        sealed = self._seal(frame, chunk, context, name)
        if chunk.HasField("header"):
            self._name = name
        return sealed

    def seal_frames(
        self, frames: Iterable[OutgoingFrame], context: FrameContext, chunk_field: str = "chunk"
    ) -> Iterator[OutgoingFrame]:
        """Each of ``frames`` sealed, as it is taken; the frames of one stream, in order."""
        name: str | None = None
        for frame in frames:
            chunk: tensor_pb2.TensorChunk = getattr(frame.message, chunk_field)
            name = self._name_for(chunk, name)
            yield self._seal(frame, chunk, context, name)

    @staticmethod
    def _name_for(chunk: tensor_pb2.TensorChunk, current: str | None) -> str:
        if chunk.HasField("seal"):
            raise ValueError(f"chunk seq {chunk.seq} is already sealed")
        has_header = chunk.HasField("header")
        if has_header != (chunk.seq == 0):
            raise ValueError(
                f"chunk seq {chunk.seq} {'has' if has_header else 'lacks'} a header; "
                "exactly the chunks with seq 0 carry one"
            )
        if has_header:
            return chunk.header.name
        if current is None:
            raise ValueError(f"chunk seq {chunk.seq} comes without a preceding header chunk")
        return current

    def _seal(
        self, frame: OutgoingFrame, chunk: tensor_pb2.TensorChunk, context: FrameContext, name: str
    ) -> OutgoingFrame:
        key_id, nonce, aead = self._next()
        ad = _associated_data(
            self._endpoint, key_id, context, chunk.seq, name, _header_bytes(chunk)
        )
        plaintext = np.ascontiguousarray(frame.data, dtype=np.uint8)  # no copy: a view
        out = np.empty(plaintext.size + TAG_BYTES, dtype=np.uint8)
        aead.encrypt_into(nonce, plaintext.data, ad, out.data)
        chunk.seal.key_id = key_id
        chunk.seal.nonce = nonce
        return OutgoingFrame(frame.message, out)


V = TypeVar("V")


class _PerKey(dict[tuple[int, bytes], V]):
    """State per (key id, nonce prefix) of one session; keys below ``retired_below`` are
    retired (their chunks refused, their state dropped)."""

    def __init__(self) -> None:
        super().__init__()
        self.retired_below = 1

    def retire_before(self, key_id: int) -> None:
        self.retired_below = max(self.retired_below, key_id)
        for entry in [entry for entry in self if entry[0] < key_id]:
            del self[entry]


class ReplayWindow:
    """Nonce counters already opened under each (key id, nonce prefix), shared by all
    receiving streams of one session and direction. Thread-safe.

    Per entry: the newest counter and a bitmap of the ``window`` counters below it that
    were opened. A counter is accepted once; one ``window`` or more behind the newest is
    refused (too old to tell). At most ``max_entries`` entries: past that the oldest
    key is retired (its chunks refused from then on), so the state stays bounded.
    Record only chunks that authenticated (:meth:`accept` after opening)."""

    def __init__(
        self,
        *,
        window: int = DEFAULT_REPLAY_WINDOW,
        max_entries: int = DEFAULT_MAX_REPLAY_ENTRIES,
    ) -> None:
        if window < 1 or max_entries < 1:
            raise ValueError(f"window and max_entries must be >= 1, got {window}, {max_entries}")
        self.window = window
        self.max_entries = max_entries
        self._lock = threading.Lock()
        # (key id, prefix) -> (newest counter, bitmap: bit i = counter newest - i opened)
        self._seen: _PerKey[tuple[int, int]] = _PerKey()

    @property
    def entries(self) -> int:
        return len(self._seen)

    def check(self, entry: tuple[int, bytes], counter: int) -> None:
        """Raise InvalidArgumentError if ``counter`` under ``entry`` cannot be accepted."""
        with self._lock:
            self._check(entry, counter)

    def accept(self, entry: tuple[int, bytes], counter: int) -> None:
        """Record ``counter`` as opened, or raise InvalidArgumentError if it was (or is
        too old or under a retired key)."""
        with self._lock:
            self._check(entry, counter)
            state = self._seen.get(entry)
            if state is None:
                while len(self._seen) >= self.max_entries:
                    oldest = min(key_id for key_id, _ in self._seen)
                    if oldest >= entry[0]:
                        raise InvalidArgumentError(
                            f"more than {self.max_entries} nonce prefixes under keys from "
                            f"{oldest} in this session; rotate the session key"
                        )
                    self._seen.retire_before(oldest + 1)
                self._seen[entry] = (counter, 1)
                return
            newest, bits = state
            if counter > newest:
                shift = counter - newest
                bits = (
                    ((bits << shift) | 1) & ((1 << self.window) - 1) if shift < self.window else 1
                )
                self._seen[entry] = (counter, bits)
            else:
                self._seen[entry] = (newest, bits | (1 << (newest - counter)))

    def retire_before(self, key_id: int) -> None:
        """Refuse chunks under keys below ``key_id`` from now on and drop their state."""
        with self._lock:
            self._seen.retire_before(key_id)

    def _check(self, entry: tuple[int, bytes], counter: int) -> None:
        if entry[0] < self._seen.retired_below:
            raise InvalidArgumentError(
                f"a chunk is sealed under key {entry[0]}, which this session retired (keys "
                f"below {self._seen.retired_below} are)"
            )
        state = self._seen.get(entry)
        if state is None:
            return
        newest, bits = state
        if counter > newest:
            return
        behind = newest - counter
        if behind >= self.window:
            raise InvalidArgumentError(
                f"nonce counter {counter} under key {entry[0]} is {behind} behind the newest "
                f"this session opened, too far behind to tell it from a replay"
            )
        if bits >> behind & 1:
            raise InvalidArgumentError(
                f"nonce counter {counter} under key {entry[0]} was already opened in this "
                "session: a replayed chunk"
            )


class Opener:
    """Opens the sealed chunks of one receiving stream of one session and direction.

    ``keys`` returns the :class:`DataKey` with a given id (fetching and caching it; its
    errors propagate). Per (key id, nonce prefix) the nonce counter must increase from
    chunk to chunk; that state is kept for at most ``max_replay_entries`` pairs: past
    that, the oldest key is retired (its state dropped, its chunks refused from then on).
    With ``shared`` (the session's :class:`ReplayWindow`), a chunk any stream of the
    session opened before is refused as well.
    """

    def __init__(
        self,
        session_id: str,
        direction: str,
        keys: Callable[[int], DataKey],
        *,
        max_replay_entries: int = DEFAULT_MAX_REPLAY_ENTRIES,
        shared: ReplayWindow | None = None,
    ) -> None:
        if max_replay_entries < 1:
            raise ValueError(f"max_replay_entries must be >= 1, got {max_replay_entries}")
        self.session_id = session_id
        self.direction = direction
        self._endpoint = _check_endpoint(session_id, direction)
        self._keys = keys
        self._max_entries = max_replay_entries
        self._shared = shared
        self._lock = threading.Lock()
        # (key id, nonce prefix) -> last counter that authenticated.
        self._last: _PerKey[int] = _PerKey()
        self._newest: int | None = None
        self._name: str | None = None

    @property
    def newest_key_id(self) -> int | None:
        """The highest key id under which a chunk has authenticated, if any."""
        return self._newest

    @property
    def opened_key_ids(self) -> frozenset[int]:
        """Key ids under which chunks authenticated and that are not retired."""
        with self._lock:
            return frozenset(key_id for key_id, _ in self._last)

    def retire_before(self, key_id: int) -> None:
        """Refuse chunks under keys below ``key_id`` from now on and drop their state."""
        with self._lock:
            self._last.retire_before(key_id)

    def open_frame(self, frame: IncomingFrame[Any] | ChunkView, context: FrameContext) -> ChunkView:
        """The frame's chunk with its plaintext payload, for ``TensorAssembler.feed``."""
        chunk, data = frame.chunk_view() if isinstance(frame, IncomingFrame) else frame
        seq = chunk.seq
        if not chunk.HasField("seal"):
            raise InvalidArgumentError(
                f"chunk seq {seq}{self._of(chunk)} is not sealed; this stream requires "
                "sealed chunks"
            )
        key_id, nonce = chunk.seal.key_id, chunk.seal.nonce
        if len(nonce) != NONCE_BYTES:
            raise InvalidArgumentError(
                f"chunk seq {seq}{self._of(chunk)}: seal nonce has {len(nonce)} bytes; "
                f"expected {NONCE_BYTES}"
            )
        if key_id == 0:
            raise InvalidArgumentError(f"chunk seq {seq}{self._of(chunk)}: seal has no key id")
        entry = (key_id, nonce[:NONCE_PREFIX_BYTES])
        counter = int.from_bytes(nonce[NONCE_PREFIX_BYTES:], "big")
        if self._shared is not None:
            self._shared.check(entry, counter)
        with self._lock:
            self._check_fresh(chunk, entry, counter)
            if chunk.HasField("header"):
                name = chunk.header.name
            elif seq == 0 or self._name is None:
                raise InvalidArgumentError(
                    f"chunk seq {seq} arrived without a preceding header chunk"
                )
            else:
                name = self._name
        key = self._keys(key_id)
        if key.key_id != key_id:
            raise ValueError(f"the key source returned key {key.key_id} for key {key_id}")
        ad = _associated_data(self._endpoint, key_id, context, seq, name, _header_bytes(chunk))
        if len(data) < TAG_BYTES:
            raise DataLossError(
                f"chunk seq {seq} of tensor {name!r}: {len(data)} bytes cannot hold the "
                f"{TAG_BYTES}-byte tag"
            )
        plaintext = np.empty(len(data) - TAG_BYTES, dtype=np.uint8)
        try:
            AESGCM(key.secret).decrypt_into(nonce, data, ad, plaintext.data)
        except InvalidTag:
            raise DataLossError(
                f"chunk seq {seq} of tensor {name!r} does not authenticate under key "
                f"{key_id}: altered, or sealed for another session, direction, step, "
                "tensor or position"
            ) from None
        with self._lock:
            self._check_fresh(chunk, entry, counter)  # a concurrent caller may have won
            if self._shared is not None:
                self._shared.accept(entry, counter)  # another stream may have won
            self._accept(entry, counter)
            if chunk.HasField("header"):
                self._name = name
        return ChunkView(chunk, plaintext.data)

    def _of(self, chunk: tensor_pb2.TensorChunk) -> str:
        name = chunk.header.name if chunk.HasField("header") else self._name
        return "" if name is None else f" of tensor {name!r}"

    def _check_fresh(
        self, chunk: tensor_pb2.TensorChunk, entry: tuple[int, bytes], counter: int
    ) -> None:
        key_id = entry[0]
        if key_id < self._last.retired_below:
            raise InvalidArgumentError(
                f"chunk seq {chunk.seq}{self._of(chunk)} is sealed under key {key_id}, "
                f"which is retired (keys below {self._last.retired_below} are)"
            )
        last = self._last.get(entry)
        if last is not None and counter <= last:
            raise InvalidArgumentError(
                f"chunk seq {chunk.seq}{self._of(chunk)}: nonce counter {counter} under key "
                f"{key_id} does not follow {last}; a replayed or reordered chunk"
            )

    def _accept(self, entry: tuple[int, bytes], counter: int) -> None:
        key_id = entry[0]
        if entry not in self._last:
            while len(self._last) >= self._max_entries:
                oldest = min(k for k, _ in self._last)
                if oldest >= key_id:
                    raise InvalidArgumentError(
                        f"more than {self._max_entries} nonce prefixes under keys from "
                        f"{oldest}; retire older keys first"
                    )
                self._last.retire_before(oldest + 1)
        self._last[entry] = counter
        if self._newest is None or key_id > self._newest:
            self._newest = key_id
