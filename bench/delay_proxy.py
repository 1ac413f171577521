"""A TCP proxy that delays each direction by a fixed one-way time without limiting
throughput: the delay half of the WAN harness (bench/wanlink.py starts it inside the
client's network namespace; the kernel here has no ``netem``).

Each accepted connection opens one connection to the single ``--target`` the proxy was
given (an IP address inside ``--network``, the harness's /30; anything else is refused
at start) and carries bytes both ways. Nothing the client sends can choose another
destination: the proxy speaks no protocol, it only copies.

Per direction, a reader thread reads into a preallocated ring (``DelayLine``; up to
1 MiB per read, no copy), stamps each chunk with its arrival time and goes on reading; a
writer thread sends each chunk when ``arrival + delay`` has passed, merging neighbouring
due chunks into one ``send``. The line pipelines: at any moment it holds up to rate x
delay bytes, so throughput is not divided by the delay. It is bounded (``--limit``
bytes, at most the ring's ``--capacity``): when full, the reader stops reading and TCP
pushes back on the sender. TCP_NODELAY is set on both sockets.

Timing is by deadline: the writer waits on a condition with the head chunk's deadline
as timeout, so lateness never accumulates. Three things keep the delay close to its
setting (a 5 ms RTT is 2.5 ms each way): the arrival time is the kernel's receive
timestamp (SO_TIMESTAMPNS), not the reader's wake-up; the process has no timer slack
(Linux adds 50 us to each timed wait); and the writer wakes early by the median lateness
of its recent wake-ups (``WakeLateness``). On the 2-core VM of docs/benchmarks.md this
took the writer from ~110 us late to ~10 us (median), and threads (which release the
interpreter in every recv/send) carry several Gbit/s.

    python bench/delay_proxy.py --target 10.254.0.2:PORT --network 10.254.0.0/30 \
        --delay-ms 2.5 [--listen 127.0.0.1:0] [--limit BYTES] [--capacity BYTES]

It prints ``listening on 127.0.0.1:PORT`` once it accepts, then reads commands on
standard input (``delay MS``, ``limit BYTES``; each answered ``ok ...`` on standard
output; they apply to chunks that arrive afterwards). SIGTERM, or the end of standard
input (its parent gone), closes every connection and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import os
import signal
import socket
import statistics
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import TextIO

READY_PREFIX = "listening on "
MAX_READ = 1 << 20
DEFAULT_CAPACITY = 4 << 20
PR_SET_TIMERSLACK = 29
# Linux's SO_TIMESTAMPNS (socket does not export it): receive timestamps in ns.
SO_TIMESTAMPNS = 35
MAX_WAKE_S = 0.01


class DelayLine:
    """The bytes of one direction between arrival and release: a ring of ``capacity``
    bytes holding chunks in arrival order, each with the time it may leave.

    Bookkeeping only (no lock, no clock): one reader fills ``free_region`` and
    ``commit``s it, one writer sends ``ready_region`` and ``release``s what it sent;
    ``Pipe`` serialises the calls. The two regions never overlap, so the bytes themselves
    are read and written outside the lock."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.buffer = memoryview(bytearray(capacity))
        self._head = 0  # offset of the oldest byte held
        self._used = 0
        # [deadline, start, length]; lists, so that a partial release can shorten one.
        self._chunks: deque[list[float | int]] = deque()

    @property
    def used(self) -> int:
        return self._used

    def free_region(self, limit: int, max_bytes: int = MAX_READ) -> tuple[int, int]:
        """``(start, length)`` of the contiguous free bytes a read may fill, at most
        ``max_bytes``; length 0 while ``limit`` (capped at the capacity) bytes are held."""
        room = min(limit, self.capacity) - self._used
        if room <= 0:
            return 0, 0
        start = (self._head + self._used) % self.capacity
        return start, min(room, self.capacity - start, max_bytes)

    def commit(self, start: int, length: int, deadline: float) -> None:
        """``length`` bytes were read at ``start`` (from ``free_region``); they leave at
        ``deadline``."""
        expected = (self._head + self._used) % self.capacity
        if start != expected or length <= 0 or self._used + length > self.capacity:
            raise ValueError(f"commit of {length} bytes at {start}: expected the tail {expected}")
        self._chunks.append([deadline, start, length])
        self._used += length

    def next_deadline(self) -> float | None:
        """When the oldest chunk may leave; None when the line is empty."""
        return self._chunks[0][0] if self._chunks else None

    def ready_region(self, now: float) -> tuple[int, int]:
        """``(start, length)`` of the contiguous bytes from the head whose deadline is at
        or before ``now`` (due chunks merged up to the end of the ring); length 0 if none."""
        start, length = self._head, 0
        for deadline, chunk_start, chunk_length in self._chunks:
            if deadline > now or chunk_start != start + length:
                break
            length += int(chunk_length)
        return start, length

    def release(self, length: int) -> None:
        """``length`` bytes from the head were sent: free them."""
        if length <= 0 or length > self._used:
            raise ValueError(f"release of {length} bytes with {self._used} held")
        self._used -= length
        self._head = (self._head + length) % self.capacity
        while length:
            chunk = self._chunks[0]
            taken = min(length, int(chunk[2]))
            length -= taken
            if taken == chunk[2]:
                self._chunks.popleft()
            else:
                chunk[1] = int(chunk[1]) + taken
                chunk[2] = int(chunk[2]) - taken


class WakeLateness:
    """How late a timed wait wakes, learnt as it happens: the median lateness of the last
    ``window`` waits that ran out (each capped at ``cap_s``), shared by every pipe of the
    proxy. A writer asks to wake that much before a deadline, so that it sends at the
    deadline on average instead of one scheduler wake-up after it (~40-120 us here)."""

    def __init__(self, window: int = 31, cap_s: float = 0.0005) -> None:
        self.cap_s = cap_s
        self._recent: deque[float] = deque(maxlen=window)
        self.estimate_s = 0.0

    def lead(self, delay_s: float) -> float:
        """How early to wake, at most a quarter of the delay itself."""
        return min(self.estimate_s, delay_s / 4)

    def observe(self, late_s: float) -> None:
        self._recent.append(min(max(late_s, 0.0), self.cap_s))
        self.estimate_s = statistics.median(self._recent)


def arrival_time(ancillary: list[tuple[int, int, bytes]], now: float, wall_now: float) -> float:
    """When the bytes of a read reached the socket, on the monotonic clock: the kernel's
    receive timestamp (SO_TIMESTAMPNS, wall clock) when present and plausible (at most
    ``MAX_WAKE_S`` old), else ``now``. It leaves this thread's wake-up out of the delay."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack_from("@qq", data)
            waited = wall_now - (int(seconds) + int(nanoseconds) / 1e9)
            if 0 <= waited <= MAX_WAKE_S:
                return now - waited
    return now


@dataclass
class Settings:
    """What the control commands change; read for every chunk as it arrives."""

    delay_s: float
    limit: int
    lateness: WakeLateness = field(default_factory=WakeLateness)


class Connection:
    """One client connection and its upstream: two pipes, four threads. Either side's
    error aborts both directions; the sockets close when the last thread ends."""

    def __init__(
        self, client: socket.socket, upstream: socket.socket, settings: Settings, capacity: int
    ) -> None:
        self.sockets = (client, upstream)
        self._lock = threading.Lock()
        self._running = 4
        self._aborted = False
        self.pipes = (
            Pipe(client, upstream, self, settings, capacity),
            Pipe(upstream, client, self, settings, capacity),
        )

    def start(self) -> None:
        for pipe in self.pipes:
            pipe.start()

    @property
    def running(self) -> bool:
        return self._running > 0

    def abort(self) -> None:
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
        for pipe in self.pipes:
            pipe.stop()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def thread_done(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            for sock in self.sockets:
                sock.close()


class Pipe:
    """One direction: a reader thread filling the line, a writer thread draining it."""

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        connection: Connection,
        settings: Settings,
        capacity: int,
    ) -> None:
        self.src, self.dst = src, dst
        self.connection = connection
        self.settings = settings
        self.line = DelayLine(capacity)
        self.cond = threading.Condition()
        self.eof = False
        self.stopped = False

    def start(self) -> None:
        for target in (self._read, self._write):
            threading.Thread(target=self._run, args=(target,), daemon=True).start()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def _run(self, target: Callable[[], None]) -> None:
        try:
            target()
        except OSError:
            self.connection.abort()
        finally:
            self.connection.thread_done()

    def _read(self) -> None:
        line, buffer = self.line, self.line.buffer
        while True:
            with self.cond:
                while True:
                    if self.stopped:
                        return
                    start, length = line.free_region(self.settings.limit)
                    if length:
                        break
                    self.cond.wait()
            n, ancillary, _, _ = self.src.recvmsg_into([buffer[start : start + length]], 64)
            arrived = arrival_time(ancillary, time.monotonic(), time.time())
            with self.cond:
                if n == 0:
                    self.eof = True
                else:
                    line.commit(start, n, arrived + self.settings.delay_s)
                self.cond.notify_all()
            if n == 0:
                return

    def _write(self) -> None:
        line, buffer = self.line, self.line.buffer
        while True:
            with self.cond:
                while True:
                    if self.stopped:
                        return
                    lead = self.settings.lateness.lead(self.settings.delay_s)
                    now = time.monotonic()
                    start, length = line.ready_region(now + lead)
                    if length:
                        break
                    deadline = line.next_deadline()
                    if deadline is None:
                        if self.eof:
                            self.dst.shutdown(socket.SHUT_WR)
                            return
                        self.cond.wait()
                        continue
                    wake = deadline - lead
                    if not self.cond.wait(wake - now):
                        self.settings.lateness.observe(time.monotonic() - wake)
            sent = self.dst.send(buffer[start : start + length])
            with self.cond:
                line.release(sent)
                self.cond.notify_all()


class DelayProxy:
    """Accepts on ``listener`` and joins each client to ``target`` through two pipes."""

    def __init__(
        self,
        listener: socket.socket,
        target: tuple[str, int],
        settings: Settings,
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        self.listener = listener
        self.target = target
        self.settings = settings
        self.capacity = capacity
        self.connections: list[Connection] = []

    def serve_forever(self) -> None:
        while True:
            client, _ = self.listener.accept()
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError as error:
                print(f"delay_proxy: cannot reach {self.target}: {error}", file=sys.stderr)
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            connection = Connection(client, upstream, self.settings, self.capacity)
            self.connections = [c for c in self.connections if c.running] + [connection]
            connection.start()

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.abort()


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` with HOST an IPv4 literal -> (host, port)."""
    host, sep, port = text.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError
    except ValueError:
        raise ValueError(f"expected IPv4:PORT, got {text!r}") from None
    return host, int(port)


def checked_target(target: str, network: str) -> tuple[str, int]:
    """The proxy's one destination, refused unless it lies inside ``network`` (a private
    network: the harness's link) and is not the network or broadcast address."""
    host, port = parse_address(target)
    net = ipaddress.IPv4Network(network)
    if not net.is_private:
        raise ValueError(f"refusing network {network}: not a private network")
    address = ipaddress.IPv4Address(host)
    if address not in net or (
        net.prefixlen < 31 and address in {net.network_address, net.broadcast_address}
    ):
        raise ValueError(f"refusing target {target}: outside {network}")
    if port == 0:
        raise ValueError(f"refusing target {target}: port 0")
    return host, port


def apply_command(settings: Settings, line: str) -> str:
    """Apply one control line (``delay MS`` or ``limit BYTES``) and return the answer."""
    words = line.split()
    if len(words) == 2 and words[0] == "delay":
        delay_ms = float(words[1])
        if not 0 <= delay_ms < 60_000:
            raise ValueError(f"delay {delay_ms} ms out of range")
        settings.delay_s = delay_ms / 1000
        return f"ok delay {delay_ms:g}"
    if len(words) == 2 and words[0] == "limit":
        limit = int(words[1])
        if limit <= 0:
            raise ValueError(f"limit {limit} must be positive")
        settings.limit = limit
        return f"ok limit {limit}"
    raise ValueError(f"unknown command {line.strip()!r}")


def _control(stream: TextIO, settings: Settings) -> None:
    for line in stream:
        try:
            answer = apply_command(settings, line)
        except ValueError as error:
            answer = f"error {error}"
        print(answer, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def _no_timer_slack() -> None:
    """prctl(PR_SET_TIMERSLACK, 1): timed waits of this process end within 1 ns of
    their time instead of 50 us (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="IP:PORT, the only destination")
    parser.add_argument("--network", required=True, help="CIDR the target must lie in")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    parser.add_argument("--listen", default="127.0.0.1:0", help="loopback IP:PORT")
    parser.add_argument("--limit", type=int, default=DEFAULT_CAPACITY, help="bytes held")
    parser.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY, help="ring bytes")
    args = parser.parse_args(argv)
    try:
        target = checked_target(args.target, args.network)
        listen = parse_address(args.listen)
        if not ipaddress.IPv4Address(listen[0]).is_loopback:
            raise ValueError(f"refusing to listen on {args.listen}: not a loopback address")
        settings = Settings(0.0, 1)
        apply_command(settings, f"delay {args.delay_ms}")
        apply_command(settings, f"limit {args.limit}")
    except ValueError as error:
        print(f"delay_proxy: {error}", file=sys.stderr)
        return 2
    # Threads wake at their deadlines: no timer slack (Linux adds 50 us to every timed
    # wait by default), and a short switch interval lets a woken writer take the
    # interpreter promptly from a reader doing bookkeeping.
    _no_timer_slack()
    sys.setswitchinterval(0.0005)
    signal.signal(signal.SIGTERM, _stop)
    listener = socket.create_server(listen)
    proxy = DelayProxy(listener, target, settings, max(args.capacity, 1))
    print(f"{READY_PREFIX}{listen[0]}:{listener.getsockname()[1]}", flush=True)
    threading.Thread(target=_control, args=(sys.stdin, settings), daemon=True).start()
    try:
        proxy.serve_forever()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
