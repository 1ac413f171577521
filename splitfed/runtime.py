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
``SPLITFED_MALLOC_TUNING=off`` to leave the allocator alone. A service whose memory must
stay flat however many clients it serves (the aggregator) asks for the ``"lean"``
profile instead, trading some throughput for memory given back at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# glibc caps the mmap threshold at 32 MiB on 64-bit hosts.
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


@dataclass(frozen=True)
class AllocatorProfile:
    mmap_threshold: int
    trim_threshold: int
    # At most this many malloc arenas (0: glibc's default, 8 per core).
    arenas: int = 0


PROFILES = {
    # Chunk-sized buffers are reused from the heap: fast streaming (channels, backbone).
    "throughput": AllocatorProfile(MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES),
    # Buffers from 1 MiB up get their own mappings and go back to the kernel when freed,
    # and two arenas keep little freed memory: a service whose memory must not grow
    # with its clients (the aggregator; docs/benchmarks.md "Aggregator memory").
    "lean": AllocatorProfile(1 << 20, 1 << 20, arenas=2),
}

_lock = threading.Lock()
_applied: list[str] = []  # the profile in force, once one is


def applied_profile() -> str | None:
    """The allocator profile in force in this process, if any."""
    return _applied[-1] if _applied else None


def _mallopt() -> Any:
    name = ctypes.util.find_library("c")
    try:
        mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    except OSError:
        return None
    if mallopt is not None:
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
    return mallopt


def tune_allocator(profile: str | None = None) -> bool:
    """Set glibc's malloc thresholds for ``profile``; ``True`` if the profile is in force.

    Without a profile: ``"throughput"`` unless a profile was set already (the channel and
    server factories call this; a service that wants ``"lean"`` asks for it first).
    """
    if profile is not None and profile not in PROFILES:
        raise ValueError(f"unknown allocator profile {profile!r}; choose from {sorted(PROFILES)}")
    if os.environ.get("SPLITFED_MALLOC_TUNING", "on").lower() in {"0", "off", "false", "no"}:
        logger.debug("[runtime] allocator tuning disabled by SPLITFED_MALLOC_TUNING")
        return False
    with _lock:
        if _applied and (profile is None or profile == _applied[-1]):
            return True
        wanted = profile or "throughput"
        mallopt = _mallopt()
        if mallopt is None:  # not glibc (musl, macOS): nothing to tune
            return False
        settings = PROFILES[wanted]
        ok = bool(mallopt(_M_MMAP_THRESHOLD, settings.mmap_threshold)) and bool(
            mallopt(_M_TRIM_THRESHOLD, settings.trim_threshold)
        )
        if settings.arenas:
            ok = ok and bool(mallopt(_M_ARENA_MAX, settings.arenas))
        if ok:
            _applied[:] = [wanted]
        logger.debug("[runtime] allocator profile %s applied: %s", wanted, ok)
        return ok
