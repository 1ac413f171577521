"""Secure aggregation of adapter updates: the aggregator learns only the weighted sum.

One module on purpose (it is long): it is the protocol's specification (below) and its
only implementation, both sides of it (participant and masked sum); keeping them together
keeps the byte layout of seeds, masks and encodings in one place.

The protocol, one round
-----------------------
Participants are the round's clients, named by their identity names; the aggregator
relays and sums, and sees no individual update in the clear.

1. **Keys.** Each participant makes a fresh X25519 key pair for the round
   (:class:`Participant`) and sends :attr:`Participant.public_key` (32 bytes) to the
   aggregator, which relays the full set ``name -> public key`` to every participant
   (:meth:`Participant.set_peers`).
2. **Pairwise seeds.** Participants i and j both derive the same 32-byte seed
   ``s_ij = HKDF-SHA256(X25519(sk_i, pk_j), salt=None, info)`` with ``info`` =
   ``b"splitfed secagg v1\\x00"`` followed by the length-prefixed (4-byte big-endian)
   federation name, the round as 8 bytes big-endian, and the length-prefixed name and
   public key of the pair's lower name then of its higher name (names ordered as Python
   orders strings).
3. **Encoding.** Participant i with weight ``n_i`` (its sample count, sent in the
   clear) encodes its tensor ``x_i`` as ``q = round(n_i * x_i * scale) mod 2**64``
   (:meth:`Participant.encode`; negative values wrap, numpy ``uint64``).
4. **Masking.** For each peer j, i adds ``mask(s_ij, tensor name)`` when ``i < j`` and
   subtracts it when ``i > j`` (mod 2**64), and uploads the result
   (:meth:`Participant.mask_chunk`, :meth:`Participant.encode_and_mask`). The mask of a
   tensor is the AES-256-CTR keystream, read as little-endian ``uint64`` words, under
   the key ``HKDF-SHA256(s_ij, salt=None, info=b"splitfed secagg mask v1\\x00" + name)``
   with the counter block starting at 0 (16 bytes, big-endian): element ``e`` is bytes
   ``8e .. 8e+7`` of the keystream, so any element range can be masked on its own
   (:func:`mask_range`) and uploads can be masked and summed chunk by chunk.
5. **Summing.** The aggregator adds every upload into one ``uint64`` accumulator per
   tensor (:class:`MaskedSum`). Over all participants the pairwise masks cancel, and the
   sum read as ``int64``, divided by ``scale`` and by ``sum(n_i)``, is the weighted
   average (:meth:`MaskedSum.decode`).
6. **Dropouts.** If participant d never uploaded, the aggregator declares it dropped,
   refuses its uploads from then on, and asks each survivor i for ``s_id``
   (:meth:`Participant.reveal`); it then removes i's mask term for d from the sum
   (:meth:`MaskedSum.remove_masks`). ``s_id`` only masks i's upload against d's, so
   revealing it, once d's upload can no longer count, exposes nothing of i's update.

:class:`MaskedSum` is the arithmetic only. The aggregator that drives it keeps the rules
that make the masks cancel and keep updates hidden: fold an upload completely or not at
all (a partial upload can neither count nor be declared dropped, because removing its
masks would unmask the part that arrived: abandon the attempt instead), refuse uploads
from a participant declared dropped, remove masks only with the seeds the named survivor
revealed, and decode with the sum of the contributors' weights.

Trust assumptions
-----------------
The aggregator is honest but curious: it follows the protocol (relays public keys
unchanged, declares dropped only participants that did not upload, refuses their late
uploads) and does not collude with participants. Under that assumption it learns the
weighted sum of the survivors' updates (at least ``min_survivors`` of them) and nothing
about any single one. This is the simple pairwise-masking scheme without the self-masks
and Shamir shares of Bonawitz et al. (CCS 2017): an aggregator that lies about dropouts
(tells d's peers that d dropped after d did upload) collects all of d's seeds and
unmasks d's update; one that substitutes public keys can read everything. Participants
limit what an aggregator can ask for (a participant reveals nothing that would leave
fewer than ``min_survivors`` participants, and masks nothing after a reveal) but cannot
detect such lies. Participants are not protected against each other's poisoned updates:
the sum is only as good as what each one sends.

Range and precision
-------------------
The sum is computed modulo 2**64 and read as a signed 64-bit integer, so the weighted sum
``sum(n_i * x_i)`` of every element must stay within ``+-2**63 / scale`` (``+-2**39`` for
the default ``scale = 2**24``). :meth:`Participant.encode` guarantees it: with k
participants it refuses any ``|n_i * x_i|`` of ``2**63 / (k * scale)`` or more (see
:func:`max_abs_value`) and any non-finite value. Each participant's rounding error is at
most ``0.5 / scale`` in units of ``n_i * x_i``, so the decoded average is within
``k / (2 * scale * sum(n_i))`` of the exact one (below ``3e-8`` for sample-count weights).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from splitfed.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)

logger = logging.getLogger(__name__)

U64Array = npt.NDArray[np.uint64]

PUBLIC_KEY_BYTES: Final = 32
SEED_BYTES: Final = 32
DEFAULT_SCALE: Final = float(2**24)
MAX_ROUND: Final = (1 << 64) - 1

_SEED_INFO: Final = b"splitfed secagg v1\x00"
_MASK_INFO: Final = b"splitfed secagg mask v1\x00"
# Keystream is produced in blocks of this many uint64 words (512 KiB): fast (in cache)
# and a bounded temporary, whatever the tensor size.
_BLOCK: Final = 1 << 16
_ZEROS: Final = bytes(8 * _BLOCK)
# Keeps the sum of k values, each below 2**63 / k after float rounding, below 2**63.
_SAFETY: Final = 1.0 - 2.0**-40


def _counted(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"{what} must be a non-empty string, got {name!r}")
    return name


@dataclass(frozen=True)
class SecAggParams:
    """What every party of one round agrees on.

    ``federation`` and ``round`` are bound into every pairwise seed, so masks never repeat
    across rounds or federations. ``scale`` is the fixed-point scale (a power of two keeps
    encoding exact for values that are multiples of ``1 / scale``). ``min_survivors`` is
    the fewest participants whose updates may be summed: a participant refuses to reveal
    seeds that would leave fewer, so an update is never summed with fewer than
    ``min_survivors - 1`` others.
    """

    federation: str
    round: int
    scale: float = DEFAULT_SCALE
    min_survivors: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.federation, str) or not self.federation:
            raise ValueError("SecAggParams.federation must be a non-empty string")
        if isinstance(self.round, bool) or not isinstance(self.round, int):
            raise ValueError(f"SecAggParams.round must be an int, got {self.round!r}")
        if not 0 <= self.round <= MAX_ROUND:
            raise ValueError(
                f"SecAggParams.round must be between 0 and 2**64 - 1, got {self.round}"
            )
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float):
            raise ValueError(f"SecAggParams.scale must be a number, got {self.scale!r}")
        if not (math.isfinite(self.scale) and 1.0 <= self.scale <= 2.0**52):
            raise ValueError(
                f"SecAggParams.scale must be between 1 and 2**52 (default 2**24), got {self.scale}"
            )
        if isinstance(self.min_survivors, bool) or not isinstance(self.min_survivors, int):
            raise ValueError(
                f"SecAggParams.min_survivors must be an int, got {self.min_survivors!r}"
            )
        if self.min_survivors < 2:
            raise ValueError(
                "SecAggParams.min_survivors must be at least 2: the sum of one update is "
                f"that update, got {self.min_survivors}"
            )


def max_abs_value(params: SecAggParams, participants: int) -> float:
    """The bound on ``|weight * value|`` that :meth:`Participant.encode` enforces in a
    round of ``participants``: below it, the sum of all uploads cannot overflow."""
    if participants < 1:
        raise ValueError(f"participants must be at least 1, got {participants}")
    return 2.0**63 / participants * _SAFETY / float(params.scale)


def _derive_seed(
    params: SecAggParams,
    private_key: X25519PrivateKey,
    own: tuple[str, bytes],
    peer: tuple[str, bytes],
) -> bytes:
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer[1]))
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise InvalidArgumentError(f"public key of peer {peer[0]!r} is not usable: {exc}") from None
    low, high = sorted((own, peer))
    info = b"".join(
        (
            _SEED_INFO,
            _counted(params.federation.encode()),
            params.round.to_bytes(8, "big"),
            _counted(low[0].encode()),
            _counted(low[1]),
            _counted(high[0].encode()),
            _counted(high[1]),
        )
    )
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def _tensor_key(seed: bytes, name: str) -> bytes:
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise InvalidArgumentError(f"a pairwise seed must be {SEED_BYTES} bytes")
    info = _MASK_INFO + _check_name(name, "tensor name").encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)


def _keystream(seed: bytes, name: str, start: int, stop: int) -> Iterator[tuple[int, U64Array]]:
    """``(first element, mask words)`` covering elements [start, stop) in order. The arrays
    share one buffer: use each before asking for the next."""
    if isinstance(start, bool) or isinstance(stop, bool):
        raise InvalidArgumentError("element range must be ints")
    if not 0 <= start <= stop:
        raise InvalidArgumentError(f"bad element range [{start}, {stop})")
    key = _tensor_key(seed, name)
    first = start - (start & 1)  # counter blocks hold two words
    encryptor = Cipher(algorithms.AES(key), modes.CTR((first // 2).to_bytes(16, "big"))).encryptor()
    buffer = np.empty(8 * _BLOCK + 16, dtype=np.uint8)
    writable = buffer.data
    zeros = memoryview(_ZEROS)
    position = first
    while position < stop:
        count = min(_BLOCK, stop - position)
        encryptor.update_into(zeros[: 8 * count], writable)
        words = buffer[: 8 * count].view("<u8")
        skip = max(start - position, 0)
        yield position + skip, words[skip:]
        position += count


def mask_range(seed: bytes, name: str, start: int, stop: int) -> U64Array:
    """The mask of pair seed ``seed`` for elements [start, stop) of tensor ``name``
    (flattened, row-major), without generating the elements before ``start``."""
    out = np.empty(stop - start if stop >= start else 0, dtype=np.uint64)
    for at, words in _keystream(seed, name, start, stop):
        out[at - start : at - start + words.size] = words
    return out


def _apply_mask(target: U64Array, seed: bytes, name: str, start: int, add: bool) -> None:
    """target (elements [start, start + target.size) of ``name``) += or -= the mask."""
    operation = np.add if add else np.subtract
    for at, words in _keystream(seed, name, start, start + target.size):
        segment = target[at - start : at - start + words.size]
        operation(segment, words, out=segment)


def _as_float64(values: torch.Tensor | npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    if isinstance(values, torch.Tensor):
        if not values.is_floating_point():
            raise InvalidArgumentError(f"values must be floating point, got {values.dtype}")
        return values.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
    if isinstance(values, np.ndarray):
        if not np.issubdtype(values.dtype, np.floating):
            raise InvalidArgumentError(f"values must be floating point, got {values.dtype}")
        return values.astype(np.float64).reshape(-1)
    raise InvalidArgumentError(f"values must be a torch tensor or numpy array, got {type(values)}")


def _check_u64(values: object) -> U64Array:
    if not isinstance(values, np.ndarray) or values.dtype != np.uint64 or values.ndim != 1:
        raise InvalidArgumentError("masked values must be a 1-D numpy uint64 array")
    return values


class Participant:
    """One client's side of one round: its key pair, pairwise seeds, encoding and masks.

    Make a new one for every round and every attempt of a round (fresh keys): masking two
    different values of the same elements with one participant would let the aggregator
    subtract the masks away. The private key is dropped once the seeds are derived
    (:meth:`set_peers`). Safe to use from several threads.
    """

    def __init__(self, name: str, params: SecAggParams) -> None:
        self.name: Final = _check_name(name, "participant name")
        self.params: Final = params
        self._private_key: X25519PrivateKey | None = X25519PrivateKey.generate()
        self.public_key: Final = self._private_key.public_key().public_bytes_raw()
        self._seeds: dict[str, bytes] = {}
        self._revealed: set[str] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Participant({self.name!r}, round={self.params.round}, peers={len(self._seeds)})"

    @property
    def peers(self) -> tuple[str, ...]:
        """The other participants' names, sorted; empty before :meth:`set_peers`."""
        return tuple(sorted(self._seeds))

    def set_peers(self, peers: Mapping[str, bytes]) -> None:
        """Derive the pairwise seeds from the round's public keys (name -> 32 bytes), as
        relayed by the aggregator; this participant's own entry may be included and must
        then carry its own key. Callable once."""
        with self._lock:
            if self._private_key is None:
                raise FailedPreconditionError(f"participant {self.name!r} already has its peers")
            own = (self.name, self.public_key)
            others: dict[str, bytes] = {}
            seen: dict[bytes, str] = {self.public_key: self.name}
            for peer, key in peers.items():
                _check_name(peer, "peer name")
                if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
                    raise InvalidArgumentError(
                        f"public key of peer {peer!r} must be {PUBLIC_KEY_BYTES} bytes"
                    )
                if peer == self.name:
                    if key != self.public_key:
                        raise InvalidArgumentError(
                            f"the peer set carries another public key for {self.name!r} itself"
                        )
                    continue
                if key in seen:
                    raise InvalidArgumentError(
                        f"peers {seen[key]!r} and {peer!r} have the same public key"
                    )
                seen[key] = peer
                others[peer] = key
            if not others:
                raise InvalidArgumentError(
                    "secure aggregation needs at least one other participant"
                )
            self._seeds = {
                peer: _derive_seed(self.params, self._private_key, own, (peer, key))
                for peer, key in others.items()
            }
            self._private_key = None

    def _participants(self) -> int:
        if not self._seeds:
            raise FailedPreconditionError(f"participant {self.name!r} has no peers yet")
        return len(self._seeds) + 1

    def encode(self, values: torch.Tensor | npt.NDArray[Any], weight: float) -> U64Array:
        """Fixed-point ``round(weight * values * scale) mod 2**64``, flattened.

        Raises :class:`InvalidArgumentError` for a negative or non-finite weight, a
        non-finite value, or ``|weight * value|`` at or above :func:`max_abs_value`.
        """
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise InvalidArgumentError(f"weight must be a number, got {weight!r}")
        if not (math.isfinite(weight) and weight >= 0):
            raise InvalidArgumentError(f"weight must be finite and non-negative, got {weight}")
        limit = max_abs_value(self.params, self._participants())
        scaled = _as_float64(values) * float(weight)
        if scaled.size:
            largest = float(np.max(np.abs(scaled)))
            if not math.isfinite(largest):
                raise InvalidArgumentError("values must be finite (found NaN or infinity)")
            if largest >= limit:
                raise InvalidArgumentError(
                    f"|weight * value| reaches {largest:.6g}; with scale {self.params.scale:g} "
                    f"and {self._participants()} participants the sum could overflow 64 bits "
                    f"above {limit:.6g}: lower the scale or clip the update"
                )
        scaled *= float(self.params.scale)
        np.rint(scaled, out=scaled)
        return scaled.astype(np.int64).view(np.uint64)

    def mask_chunk(self, name: str, start: int, encoded: U64Array) -> U64Array:
        """``encoded`` (elements [start, start + len) of tensor ``name``, flattened) plus
        this participant's pairwise masks, as a new array."""
        masked = _check_u64(encoded).copy()
        with self._lock:
            self._participants()
            if self._revealed:
                raise FailedPreconditionError(
                    f"participant {self.name!r} revealed seeds this round and masks nothing more"
                )
            for peer, seed in self._seeds.items():
                _apply_mask(masked, seed, name, start, add=self.name < peer)
        return masked

    def encode_and_mask(
        self, name: str, tensor: torch.Tensor | npt.NDArray[Any], weight: float
    ) -> U64Array:
        """The whole upload of tensor ``name``: :meth:`encode`, then :meth:`mask_chunk`."""
        return self.mask_chunk(name, 0, self.encode(tensor, weight))

    def reveal(self, dropped: Iterable[str]) -> dict[str, bytes]:
        """The pairwise seeds with the peers the aggregator says dropped (name -> seed).

        Refuses its own name, a name that is not a peer, and a request that would leave
        fewer than ``min_survivors`` participants counting all peers named dropped so far.
        After a reveal this participant masks nothing more this round.
        """
        wanted = list(dropped)
        with self._lock:
            total = self._participants()
            for peer in wanted:
                if peer == self.name:
                    raise InvalidArgumentError(f"participant {self.name!r} did not drop out")
                if peer not in self._seeds:
                    raise NotFoundError(f"{peer!r} is not a peer of {self.name!r} this round")
            survivors = total - len(self._revealed | set(wanted))
            if survivors < self.params.min_survivors:
                raise PermissionDeniedError(
                    f"revealing would leave {survivors} participants, fewer than "
                    f"min_survivors={self.params.min_survivors}"
                )
            self._revealed.update(wanted)
            return {peer: self._seeds[peer] for peer in wanted}


def _shape(name: str, shape: object) -> tuple[int, ...]:
    if not isinstance(shape, tuple | list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidArgumentError(f"shape of {name!r} must be non-negative ints, got {shape!r}")
    return tuple(shape)


class MaskedSum:
    """The aggregator's running sum of masked uploads: one ``uint64`` accumulator per
    tensor (as much memory as one adapter), in each tensor's shape.

    ``shapes`` names every tensor of the upload (global adapter names). The sum is pure
    arithmetic; the caller runs the round and must (see the module notes):

    * fold each participant's upload completely or not at all (a partial upload can
      neither count nor be dropped: abandon the attempt);
    * refuse uploads from a participant once it is declared dropped;
    * remove masks only with seeds revealed by the survivor named, once per pair (a pair
      removed twice is refused: it would corrupt the sum);
    * decode with the sum of the contributors' weights.

    Safe to use from several threads.
    """

    def __init__(self, params: SecAggParams, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.params: Final = params
        self.shapes: Final = {
            _check_name(n, "tensor name"): _shape(n, s) for n, s in shapes.items()
        }
        self._sums = {
            name: np.zeros(math.prod(shape), dtype=np.uint64) for name, shape in self.shapes.items()
        }
        self._removed: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def add_chunk(self, name: str, start: int, masked: U64Array) -> None:
        """Fold elements [start, start + len) of one participant's masked upload of tensor
        ``name`` (flattened) into the sum, mod 2**64."""
        _check_u64(masked)
        with self._lock:
            total = self._sums.get(name)
            if total is None:
                raise NotFoundError(f"tensor {name!r} is not part of this round")
            if isinstance(start, bool) or not isinstance(start, int):
                raise InvalidArgumentError(f"start must be an int, got {start!r}")
            stop = start + masked.size
            if not 0 <= start <= stop <= total.size:
                raise InvalidArgumentError(
                    f"elements [{start}, {stop}) are outside tensor {name!r} of "
                    f"{total.size} elements"
                )
            target = total[start:stop]
            np.add(target, masked, out=target)

    def remove_masks(self, survivor: str, dropped: str, seed: bytes) -> None:
        """Remove ``survivor``'s mask term for the ``dropped`` peer from every tensor, given
        their pairwise seed (from ``survivor``'s :meth:`Participant.reveal`)."""
        _check_name(survivor, "survivor")
        _check_name(dropped, "dropped peer")
        if survivor == dropped:
            raise InvalidArgumentError(f"{survivor!r} cannot be both survivor and dropped")
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise InvalidArgumentError(f"a pairwise seed must be {SEED_BYTES} bytes")
        with self._lock:
            if (survivor, dropped) in self._removed:
                raise FailedPreconditionError(
                    f"the masks of {survivor!r} for {dropped!r} were already removed"
                )
            # The survivor added the mask if survivor < dropped: subtract it, and vice versa.
            for name, total in self._sums.items():
                _apply_mask(total, seed, name, 0, add=not survivor < dropped)
            self._removed.add((survivor, dropped))
        logger.debug(
            "[secagg] %s round %s: masks of %s for dropped %s removed",
            self.params.federation,
            self.params.round,
            survivor,
            dropped,
        )

    def decode(self, total_weight: float) -> dict[str, torch.Tensor]:
        """The weighted average, float32 in each tensor's shape: the sum read as int64,
        divided by ``scale * total_weight`` (the sum of the contributors' weights)."""
        return dict(self.decoded(total_weight))

    def decoded(self, total_weight: float) -> Iterator[tuple[str, torch.Tensor]]:
        """:meth:`decode` one tensor at a time, by name (holds one decoded tensor)."""
        if isinstance(total_weight, bool) or not isinstance(total_weight, int | float):
            raise InvalidArgumentError(f"total_weight must be a number, got {total_weight!r}")
        if not (math.isfinite(total_weight) and total_weight > 0):
            raise InvalidArgumentError(f"total_weight must be positive, got {total_weight}")
        divisor = float(self.params.scale) * float(total_weight)
        for name in sorted(self._sums):
            with self._lock:
                total = self._sums[name]
                average = (total.view(np.int64) / divisor).astype(np.float32)
            yield name, torch.from_numpy(average.reshape(self.shapes[name]))

    def state(self) -> dict[str, U64Array]:
        """The accumulators, ``uint64`` copies in each tensor's shape (safetensors stores
        them as ``U64``). Which pairs' masks were removed is not part of it: persist the sum
        before removing masks, or record the removed pairs beside it."""
        with self._lock:
            return {
                name: total.reshape(self.shapes[name]).copy() for name, total in self._sums.items()
            }

    def load(self, tensors: Mapping[str, U64Array]) -> None:
        """Replace the accumulators with :meth:`state` output (the same tensors, shapes)."""
        if set(tensors) != set(self.shapes):
            missing = sorted(set(tensors) ^ set(self.shapes))
            raise InvalidArgumentError(
                f"state tensors differ from the round's, e.g. {missing[0]!r}"
            )
        restored: dict[str, U64Array] = {}
        for name, array in tensors.items():
            if not isinstance(array, np.ndarray) or array.dtype != np.uint64:
                raise InvalidArgumentError(f"state tensor {name!r} must be uint64")
            if tuple(array.shape) != self.shapes[name]:
                raise InvalidArgumentError(
                    f"state tensor {name!r} has shape {list(array.shape)}, "
                    f"expected {list(self.shapes[name])}"
                )
            restored[name] = np.array(array, dtype=np.uint64, copy=True).reshape(-1)
        with self._lock:
            self._sums = restored
            self._removed = set()
