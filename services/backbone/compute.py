"""One worker runs all model computation of a backbone, fairly across sessions.

Work for the device is serialised (one forward or backward at a time keeps memory
predictable and avoids thrashing the GPU); identities and their sessions take turns:
the worker picks the next job round-robin over the identities that have work waiting,
and within an identity round-robin over its sessions, so neither a session that queues
many jobs nor an identity that opens many sessions can starve the others. (Merged work,
a generation pass of many sessions or a client-batch round, takes the turn of the
session and identity it is queued for.)
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from splitfed.services.backbone.metrics import (
    COMPUTE_QUEUE_DEPTH,
    COMPUTE_SECONDS,
    COMPUTE_WAIT_SECONDS,
)

T = TypeVar("T")
# A job, its future, when it was queued, and its operation (a metrics label).
_Item = tuple[Callable[[], Any], Future[Any], float, str]


class Turn(Protocol):
    """Whose turn a job takes: a session of an identity."""

    @property
    def session_id(self) -> str: ...

    @property
    def owner(self) -> str: ...


def _timed(operation: str, job: Callable[[], T]) -> T:
    started = time.perf_counter()
    try:
        return job()
    finally:
        COMPUTE_SECONDS.labels(operation).observe(time.perf_counter() - started)


class ComputeQueue:
    def __init__(self, name: str = "backbone-compute") -> None:
        self._lock = threading.Condition()
        # Waiting jobs by identity, then by key (a session): both in turn order.
        self._queues: OrderedDict[str, OrderedDict[str, deque[_Item]]] = OrderedDict()
        self._closed = False
        # A job is running (on the worker, or inline in a caller): others wait.
        self._running = False
        self.waited_s = 0.0
        self.jobs = 0
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    def submit(
        self, key: str, job: Callable[[], T], operation: str = "other", owner: str = ""
    ) -> Future[T]:
        """Queue ``job`` in the turn of session ``key`` of identity ``owner`` (by default
        an identity of its own)."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the compute queue is closed")
            keys = self._queues.setdefault(owner or key, OrderedDict())
            keys.setdefault(key, deque()).append((job, future, time.monotonic(), operation))
            COMPUTE_QUEUE_DEPTH.inc()
            self._lock.notify()
        return future

    def run(self, key: str, job: Callable[[], T], operation: str = "other", owner: str = "") -> T:
        """Run ``job`` in ``key``'s turn and return its result.

        When nothing else is running or waiting, the job runs at once in the calling
        thread (still one job at a time): no hand-off to the worker, which matters for
        the many small jobs of generation. Otherwise it queues for its turn."""
        with self._lock:
            idle = not self._running and not self._queues and not self._closed
            if idle:
                self._running = True
        if not idle:
            return self.submit(key, job, operation, owner).result()
        self.jobs += 1
        COMPUTE_WAIT_SECONDS.observe(0.0)
        try:
            return _timed(operation, job)
        finally:
            with self._lock:
                self._running = False
                if self._queues:  # the worker waits for the device only with jobs queued
                    self._lock.notify()

    def run_for(self, session: Turn, job: Callable[[], T], operation: str = "other") -> T:
        """:meth:`run` in the turn of ``session`` and its identity."""
        return self.run(session.session_id, job, operation, session.owner)

    @property
    def depth(self) -> int:
        with self._lock:
            return sum(len(q) for keys in self._queues.values() for q in keys.values())

    def _next(self) -> _Item | None:
        with self._lock:
            while not self._closed and (not self._queues or self._running):
                self._lock.wait()
            if not self._queues:
                return None
            self._running = True
            owner, keys = next(iter(self._queues.items()))
            key, queue = next(iter(keys.items()))
            item = queue.popleft()
            COMPUTE_QUEUE_DEPTH.dec()
            # Round robin: this session goes to the back of its identity's line, and
            # the identity to the back of the line of identities.
            del keys[key]
            if queue:
                keys[key] = queue
            del self._queues[owner]
            if keys:
                self._queues[owner] = keys
            return item

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            job, future, queued, operation = item
            waited = time.monotonic() - queued
            self.waited_s += waited
            COMPUTE_WAIT_SECONDS.observe(waited)
            self.jobs += 1
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(_timed(operation, job))
                    except BaseException as exc:  # delivered to the caller
                        future.set_exception(exc)
            finally:
                with self._lock:
                    self._running = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending = [
                item for keys in self._queues.values() for queue in keys.values() for item in queue
            ]
            self._queues.clear()
            COMPUTE_QUEUE_DEPTH.dec(len(pending))
            self._lock.notify_all()
        for _, future, _, _ in pending:
            future.cancel()
        self._worker.join(timeout=10)
