"""Durable files of the aggregator: safetensors written atomically and without a copy of
the tensors in memory (the library's writer serialises every tensor to bytes first).

The writer produces exactly the library's format (tested against ``safetensors``' own
reader and writer, byte for byte), and refuses a tensor name that is not a plain name
(:func:`splitfed.models.schema.validate_tensor_name`): ``__metadata__`` is the header's
own key, and a tensor under it would make the file unreadable."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

from splitfed.files import atomic_write
from splitfed.models.schema import validate_tensor_name

_DTYPES: dict[np.dtype[Any], str] = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
    np.dtype(np.uint64): "U64",
}
_NUMPY: dict[str, np.dtype[Any]] = {code: dtype for dtype, code in _DTYPES.items()}


def write_tensors(
    path: Path, tensors: Mapping[str, np.ndarray[Any, Any]], metadata: Mapping[str, str]
) -> None:
    """Write ``tensors`` (NumPy arrays) as a safetensors file, atomically: a temporary
    file in the same directory, fsync, rename, fsync of the directory."""
    schema = {name: (tuple(a.shape), a.dtype) for name, a in tensors.items()}
    write_tensors_streamed(path, schema, ((n, tensors[n]) for n in sorted(tensors)), metadata)


def write_tensors_streamed(
    path: Path,
    schema: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]],
    tensors: Iterable[tuple[str, np.ndarray[Any, Any]]],
    metadata: Mapping[str, str],
) -> None:
    """:func:`write_tensors` from an iterable that yields the tensors of ``schema`` (name
    -> shape, dtype) one at a time in name order: only the tensor being written needs to
    exist. Anything else than the schema in that order raises ``ValueError``, and no
    file is written."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    names = sorted(schema)
    for name in names:
        validate_tensor_name(name)
        shape, np_dtype = schema[name]
        dtype = _DTYPES.get(np.dtype(np_dtype))
        if dtype is None:
            raise ValueError(f"tensor {name!r}: dtype {np_dtype} is not supported here")
        nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with atomic_write(path) as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        expected = iter(names)
        for name, array in tensors:
            want = next(expected, None)
            shape, np_dtype = schema.get(name, ((), np.dtype(np.float32)))
            if name != want or tuple(array.shape) != shape or array.dtype != np_dtype:
                raise ValueError(
                    f"tensor {name!r} {tuple(array.shape)} {array.dtype} is not the "
                    f"next one of the schema ({want!r})"
                )
            out.write(np.ascontiguousarray(array).data)
            del array
        missing = next(expected, None)
        if missing is not None:
            raise ValueError(f"tensor {missing!r} of the schema was not given")
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_tensors(path: Path) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, str]]:
    with safe_open(str(path), framework="numpy") as handle:
        metadata = dict(handle.metadata() or {})
    return load_file(str(path)), metadata


def tensor_schema(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
    """Names, shapes and dtypes of a safetensors file's tensors, from its header only."""
    with safe_open(str(path), framework="numpy") as handle:
        out: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
        for name in handle.keys():  # noqa: SIM118 (the handle is not a mapping)
            view = handle.get_slice(name)
            dtype = _NUMPY.get(str(view.get_dtype()), np.dtype(np.float32))
            out[str(name)] = (tuple(int(d) for d in view.get_shape()), dtype)
    return out
