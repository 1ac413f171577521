"""Process-level tuning for moving large tensors through Python.

glibc's malloc serves blocks above a (dynamic) threshold with fresh ``mmap`` pages and
hands freed heap memory back to the kernel eagerly. Streaming a tensor allocates and
frees a chunk-sized buffer several times per chunk (protobuf arenas, serialised
messages, ``bytes`` objects); with the defaults each of those touches fresh pages, and
the page faults cost more than the copies themselves: serialising a fresh 1 MiB chunk
message took ~1.4 ms instead of ~0.07 ms here (see docs/benchmarks.md). Raising both
thresholds lets those buffers be reused from the heap. Tensors above 32 MiB still get
their own mappings and go back to the kernel when freed; each malloc arena keeps at most
64 MiB of freed memory before trimming.

:func:`tune_allocator` is called by the channel and server factories; set
``SPLITFED_MALLOC_TUNING=off`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at 32 MiB on 64-bit hosts.
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


@functools.cache
def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; ``True`` if they are set."""
    if os.environ.get("SPLITFED_MALLOC_TUNING", "on").lower() in {"0", "off", "false", "no"}:
        logger.debug("[runtime] allocator tuning disabled by SPLITFED_MALLOC_TUNING")
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    except OSError:
        mallopt = None
    if mallopt is None:  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    logger.debug("[runtime] allocator thresholds raised: %s", ok)
    return ok
