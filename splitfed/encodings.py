"""Wire encodings for activations: how a tensor's values become payload bytes.

An encoding maps a tensor of some dtype to a flat ``uint8`` payload and back. The
decoded tensor always has the dtype and shape named in the header; encodings other than
``raw`` trade precision for bytes. Bounds on the reconstruction error (tested in
``tests/unit/test_encodings.py``, documented in ``docs/wire.md``):

``raw``   exact, every dtype; payload = numel * itemsize.
``bf16``  floating dtypes; each value is rounded to bfloat16 (round-to-nearest-even), so
          ``|x' - x| <= 2**-8 * |x|`` for normal values; payload = numel * 2.
``int8``  floating dtypes with finite values; per row (the last dimension; a 0-d tensor is
          one row) a float32 scale ``s = absmax(row) / 127`` and ``q = round(x / s)``, so
          ``|x' - x| <= s / 2 = absmax(row) / 254``; payload = 4 * rows + numel.

Add an encoding by subclassing :class:`Encoding` in this file and calling
:func:`register_encoding`; receivers learn it by name from the header.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from splitfed.errors import InvalidArgumentError

FLOATING = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})
_LITTLE_ENDIAN = sys.byteorder == "little"


def numel_of(shape: Sequence[int]) -> int:
    return math.prod(shape)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat little-endian ``uint8`` view of ``tensor``'s values (row-major).

    No copy when ``tensor`` is contiguous (and the host little-endian); one copy otherwise.
    Works for every dtype, bfloat16 and bool included, without going through NumPy dtypes.
    """
    # contiguous() copies only if needed; bool views as uint8 like any 1-byte dtype.
    out = tensor.detach().contiguous().view(-1).view(torch.uint8)
    if not _LITTLE_ENDIAN and tensor.element_size() > 1:  # pragma: no cover - big-endian
        out = out.view(-1, tensor.element_size()).flip(-1).reshape(-1)
    return out


def from_bytes(payload: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`as_bytes`: view a flat ``uint8`` payload as ``dtype`` and ``shape``."""
    if payload.numel() == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    if not _LITTLE_ENDIAN and dtype.itemsize > 1:  # pragma: no cover - big-endian hosts
        payload = payload.view(-1, dtype.itemsize).flip(-1).reshape(-1)
    if dtype == torch.bool:
        if int(payload.max()) > 1:
            raise InvalidArgumentError("bool tensor payload holds bytes other than 0 and 1")
        return payload.view(torch.bool).view(tuple(shape))
    return payload.view(dtype).view(tuple(shape))


class Encoding(ABC):
    """One way of putting a tensor's values on the wire."""

    name: str

    @abstractmethod
    def supports(self, dtype: torch.dtype) -> bool:
        """Whether tensors of ``dtype`` can use this encoding."""

    @abstractmethod
    def encoded_nbytes(self, dtype: torch.dtype, shape: Sequence[int]) -> int:
        """Exact payload length for a tensor of ``dtype`` and ``shape``."""

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        """A flat, contiguous ``uint8`` payload for ``tensor``."""

    @abstractmethod
    def decode(
        self, payload: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]
    ) -> torch.Tensor:
        """The tensor that a payload of :meth:`encoded_nbytes` bytes stands for.

        ``payload`` has exactly the declared length; malformed contents raise
        :class:`~splitfed.errors.InvalidArgumentError`.
        """


class RawEncoding(Encoding):
    name = "raw"

    def supports(self, dtype: torch.dtype) -> bool:
        return True

    def encoded_nbytes(self, dtype: torch.dtype, shape: Sequence[int]) -> int:
        return numel_of(shape) * dtype.itemsize

    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        return as_bytes(tensor)

    def decode(
        self, payload: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]
    ) -> torch.Tensor:
        return from_bytes(payload, dtype, shape)


class Bf16Encoding(Encoding):
    name = "bf16"

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in FLOATING

    def encoded_nbytes(self, dtype: torch.dtype, shape: Sequence[int]) -> int:
        return numel_of(shape) * 2

    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        return as_bytes(tensor.to(torch.bfloat16))

    def decode(
        self, payload: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]
    ) -> torch.Tensor:
        return from_bytes(payload, torch.bfloat16, shape).to(dtype)


class Int8Encoding(Encoding):
    name = "int8"
    _BLOCK_ELEMENTS = 1 << 22

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in FLOATING

    @staticmethod
    def _rows(shape: Sequence[int]) -> int:
        return numel_of(shape[:-1]) if len(shape) > 0 else 1

    def encoded_nbytes(self, dtype: torch.dtype, shape: Sequence[int]) -> int:
        return 4 * self._rows(shape) + numel_of(shape)

    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        shape = tuple(tensor.shape)
        rows = self._rows(shape)
        x = tensor.detach().reshape(rows, shape[-1] if shape else 1).to(torch.float32)
        absmax = x.abs().amax(dim=1) if x.numel() else torch.zeros(rows, dtype=torch.float32)
        if not bool(torch.isfinite(absmax).all()):
            raise ValueError("int8 wire encoding needs finite values; the tensor holds inf or nan")
        scale = absmax / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(x / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return torch.cat([as_bytes(scale), as_bytes(q)])

    def decode(
        self, payload: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]
    ) -> torch.Tensor:
        rows = self._rows(shape)
        cols = numel_of(shape) // rows if rows else 0
        scale = from_bytes(payload[: 4 * rows].clone(), torch.float32, (rows,))
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise InvalidArgumentError("int8 payload holds a negative or non-finite scale")
        if bool((scale > torch.finfo(dtype).max / 127).any()):
            raise InvalidArgumentError(f"int8 payload holds a scale too large for {dtype}")
        q = from_bytes(payload[4 * rows :], torch.int8, (rows, cols))
        if q.numel() and int(q.min()) < -127:
            raise InvalidArgumentError("int8 payload holds -128; values must be in [-127, 127]")
        out = torch.empty((rows, cols), dtype=dtype)
        # In blocks of rows, so the float32 intermediate stays small whatever the tensor.
        step = max(1, self._BLOCK_ELEMENTS // max(cols, 1))
        for start in range(0, rows, step):
            block = q[start : start + step].to(torch.float32) * scale[start : start + step, None]
            out[start : start + step] = block
        return out.reshape(tuple(shape))


_REGISTRY: dict[str, Encoding] = {}


def register_encoding(encoding: Encoding) -> None:
    if encoding.name in _REGISTRY:
        raise ValueError(f"wire encoding {encoding.name!r} is already registered")
    _REGISTRY[encoding.name] = encoding


def get_encoding(name: str) -> Encoding:
    """The encoding called ``name`` (empty means ``raw``)."""
    try:
        return _REGISTRY[name or "raw"]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown wire encoding {name!r}; known: {', '.join(sorted(_REGISTRY))}"
        ) from None


def encoding_names() -> list[str]:
    return sorted(_REGISTRY)


for _encoding in (RawEncoding(), Bf16Encoding(), Int8Encoding()):
    register_encoding(_encoding)
