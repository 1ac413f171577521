"""Bounds on streaming calls: how many may be open at once, and how long one may idle.

gRPC's synchronous server runs each streaming call on a worker thread for as long as the
call lasts. Without bounds, a client could open as many streams as there are workers
and then send (or read) nothing, leaving no thread for anyone else, health checks
included. A :class:`StreamGuard` caps a servicer's open streams below the server's
worker count (RESOURCE_EXHAUSTED past the cap), optionally also per caller identity (so
that one party cannot take every slot), and cancels a stream on which no message has
moved, in either direction, for ``idle_timeout_s``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

import grpc

from splitfed.errors import LimitExceededError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class GuardedStream(Generic[T]):
    """The requests of one guarded call; every message that moves counts as activity."""

    def __init__(self, requests: Iterator[T], touch: list[float]) -> None:
        self._requests = requests
        self._touch = touch

    def __iter__(self) -> Iterator[T]:
        for request in self._requests:
            self._touch[0] = time.monotonic()
            yield request

    def pace(self, responses: Iterable[R]) -> Iterator[R]:
        """Yield ``responses``, counting each one the client takes as activity."""
        for response in responses:
            yield response
            self._touch[0] = time.monotonic()


class StreamGuard:
    """At most ``max_streams`` open streams, and at most ``max_streams_per_identity`` of
    them (None: no such cap) for any one identity passed to :meth:`open`."""

    def __init__(
        self,
        name: str,
        max_streams: int = 8,
        idle_timeout_s: float = 120.0,
        max_streams_per_identity: int | None = None,
    ) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        if idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s must be positive, got {idle_timeout_s}")
        if max_streams_per_identity is not None and not (
            1 <= max_streams_per_identity <= max_streams
        ):
            raise ValueError(
                f"max_streams_per_identity must be between 1 and max_streams ({max_streams}), "
                f"got {max_streams_per_identity}"
            )
        self.name = name
        self.max_streams = max_streams
        self.max_streams_per_identity = max_streams_per_identity
        self.idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()
        # stream id -> (context, [last activity], identity)
        self._open: dict[int, tuple[grpc.ServicerContext, list[float], str | None]] = {}
        self._per_identity: Counter[str] = Counter()
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def open_streams(self) -> int:
        return len(self._open)

    def streams_of(self, identity: str) -> int:
        """Streams ``identity`` holds open now."""
        with self._lock:
            return self._per_identity[identity]

    @contextmanager
    def open(
        self, context: grpc.ServicerContext, requests: Iterator[T], identity: str | None = None
    ) -> Iterator[GuardedStream[T]]:
        """Hold one of the guard's slots for the duration of a streaming call, counted
        for ``identity`` (the caller's certificate identity, e.g. ``client/hospital-a``)
        when given."""
        touch = [time.monotonic()]
        with self._lock:
            if len(self._open) >= self.max_streams:
                raise LimitExceededError(
                    f"{self.name}: {self.max_streams} streams are already open; try again later"
                )
            cap = self.max_streams_per_identity
            if identity is not None and cap is not None and self._per_identity[identity] >= cap:
                raise LimitExceededError(
                    f"{self.name}: {identity} already has {cap} streams open, the limit per "
                    "identity; close one or try again later"
                )
            stream_id = next(self._ids)
            self._open[stream_id] = (context, touch, identity)
            if identity is not None:
                self._per_identity[identity] += 1
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name=f"{self.name}-idle-watchdog", daemon=True
                )
                self._watchdog.start()
        try:
            yield GuardedStream(requests, touch)
        finally:
            with self._lock:
                del self._open[stream_id]
                if identity is not None:
                    self._per_identity[identity] -= 1
                    if self._per_identity[identity] <= 0:
                        del self._per_identity[identity]

    def _watch(self) -> None:
        period = min(1.0, self.idle_timeout_s / 4)
        while True:
            self._wake.wait(period)
            now = time.monotonic()
            with self._lock:
                idle = [c for c, t, _ in self._open.values() if now - t[0] > self.idle_timeout_s]
            for context in idle:
                logger.warning(
                    "[%s] cancelling a stream idle for more than %.0fs",
                    self.name,
                    self.idle_timeout_s,
                )
                context.cancel()
