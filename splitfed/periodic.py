"""A background thread that runs a task at a fixed period (certificate renewal,
revocation polling, the key manager renewing its own certificate)."""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)


class Periodic:
    """A daemon thread running ``tick`` every ``period_s`` until :meth:`stop`."""

    def __init__(self, name: str, period_s: float) -> None:
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.tick()
            except Exception:  # keep going: the next tick may succeed
                logger.warning("[%s] tick failed", self._thread.name, exc_info=True)

    def tick(self) -> None:
        raise NotImplementedError
