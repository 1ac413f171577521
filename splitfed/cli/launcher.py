"""Start splitfed services as child processes and stop them cleanly.

Used by the demo and by tests: a child runs ``python -m splitfed serve ...``, announces
``listening on HOST:PORT`` on stdout once it serves, and stops gracefully on SIGTERM.
The child also watches its standard input, a pipe from this process: if this process
dies without stopping it (SIGKILL, a crash), the pipe closes and the child shuts down,
so no server is left orphaned.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from splitfed.lifecycle import Running

logger = logging.getLogger(__name__)

READY_PREFIX = "listening on "


class ServiceStartError(RuntimeError):
    pass


class ServiceProcess(Running):
    """One service in a child process; a context manager that never leaves an orphan."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.name = name
        # ``prefix``: a command that execs the rest (e.g. ``ip netns exec NS``: the service
        # in a network namespace; the pid stays the service's).
        self.args = [*prefix, sys.executable, "-m", "splitfed", *args, "--stop-on-stdin-eof"]
        self.log_path = log_path
        self.env = env
        self.address: str | None = None
        # What the child printed before it announced its address (e.g. a second port).
        self.preamble: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pump_thread: threading.Thread | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._proc.pid

    @property
    def port(self) -> int:
        if self.address is None:
            raise RuntimeError(f"{self.name} has not announced its address")
        return int(self.address.rsplit(":", 1)[1])

    def start(self, timeout_s: float = 60.0) -> str:
        """Start the child and wait until it announces its address; return the address."""
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("w")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._proc = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log if self._log is not None else None,
            text=True,
            env=env,
        )
        self._pump_thread = threading.Thread(
            target=self._pump, name=f"{self.name}-stdout", daemon=True
        )
        self._pump_thread.start()
        try:
            while True:
                line = self._lines.get(timeout=timeout_s)
                if line is None:
                    code = self._proc.wait()
                    raise ServiceStartError(
                        f"{self.name} exited with code {code} before serving"
                        + (f"; see {self.log_path}" if self.log_path else "")
                    )
                if not line.startswith(READY_PREFIX):
                    self.preamble.append(line.rstrip("\n"))
                if line.startswith(READY_PREFIX):
                    self.address = line[len(READY_PREFIX) :].strip()
                    logger.info(
                        "[launcher] %s serving on %s (pid %d)", self.name, self.address, self.pid
                    )
                    return self.address
        except queue.Empty:
            self.stop()
            raise ServiceStartError(f"{self.name} did not start within {timeout_s:.0f}s") from None
        except BaseException:
            self.stop()
            raise

    def _pump(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            self._lines.put(line)
            if self._log is not None:
                self._log.write(line)
                self._log.flush()
        self._lines.put(None)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if the child has not exited after ``timeout_s``."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("[launcher] %s ignored SIGTERM; killing it", self.name)
                proc.kill()
                proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        if self._pump_thread is not None:
            self._pump_thread.join(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode
