"""WAN emulation for benchmarks and tests: a client and a server network namespace joined
by a veth pair, bandwidth shaped with ``tc tbf`` on both ends, one-way delay added by a
user-space TCP proxy (bench/delay_proxy.py) in the client's namespace (this kernel has
no ``netem``).

One module of ~780 lines: the link, its check and the check's two ends
(``sink``, ``probe``, which run this same file inside the namespaces) are one runnable
file that bench/wan.py and the tests import; the proxy is its own script
(bench/delay_proxy.py) because it runs alone in the client's namespace.

Use it from a benchmark (bench/ is on sys.path) or a test (``helpers.bench_module``)::

    with WanLink(PROFILES["wan"]) as link:
        server = ServiceProcess(..., prefix=link.command("server", []))  # binds server_ip:0
        address = link.connect(server_port)       # what a client in client_ns dials
        subprocess.run(link.command("client", [sys.executable, "client.py", address]))
        link.set_profile(PROFILES["poor"])         # same services, another link
        print(link.check())                        # measured RTT and throughput

Shaping: tbf on each veth end shapes that end's egress, so both directions are limited.
``tbf_params`` sizes it: a burst of 2 ms of line rate, at least 16 KiB (room for the
timer; at 1 Gbit/s a 64 KiB GSO packet passes whole; a transfer after idle gains at most
2 ms), and a queue (limit) of the burst plus 10 ms of line rate, at least 256 KiB. The
floor matters at low rates: a local TCP sender keeps up to two 64 KiB GSO packets per
socket in the qdisc (TCP small queues) whatever the rate, and a queue smaller than that
drops them: with 80 KB at 20 Mbit/s a check retransmitted thousands of segments and
measured from -19 % to +15 % of the rate; with 256 KiB, none and -4.4 %. tbf counts
whole frames: TCP payload reaches ~95.6 % of the rate (66 bytes of headers per
1514-byte frame), as on a real link of that rate.

Delay: ``connect`` starts one proxy per server port, on 127.0.0.1:0 inside client_ns,
forwarding only to ``server_ip:port`` and delaying each direction by RTT/2. A profile
without delay (``lan``) gets no proxy: ``connect`` returns the server's address. An
address handed out without a proxy stays undelayed after ``set_profile``: connect again
(or ``connect(port, proxy=True)`` from the start) to measure one set of services under
every profile.

    python bench/wanlink.py check [--profiles lan,metro,wan,poor] [--json PATH]

prints each profile's settings and its measured RTT and throughput (``WanLink.check``),
and exits 1 if one is more than 10 % off. ``sink`` and ``probe`` are the check's two
ends (internal).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import ipaddress
import itertools
import json
import logging
import os
import platform
import queue
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from splitfed.lifecycle import Closing

logger = logging.getLogger(__name__)

PROXY_SCRIPT = Path(__file__).resolve().with_name("delay_proxy.py")
THIS_SCRIPT = Path(__file__).resolve()
READY_PREFIX = "listening on "
NS_PREFIX = "sfwan"
DEVICE = "wan0"
# /30s tried in order; the first that overlaps no route or address of the host is used.
CANDIDATE_BLOCKS = ("10.254.254.0/24", "172.31.254.0/24", "192.168.254.0/24")
MIN_PROXY_LIMIT = 1 << 20
# A profile with delay but no shaping: size the proxy's line as for a fast link.
UNSHAPED_RATE_MBIT = 10_000.0
UNSHAPED_BULK_BYTES = 256 << 20
TOLERANCE = 0.10
# tbf: the burst (tokens saved while idle) and the queue, in ms of line rate.
BURST_MS = 2.0
QUEUE_MS = 10.0
QUEUE_FLOOR_BYTES = 256 << 10
PING_BYTES = 64

Side = Literal["client", "server"]


class WanLinkError(RuntimeError):
    """The link could not be built or changed (the failing command and its message)."""


@dataclass(frozen=True)
class Profile:
    """A link: ``rate_mbit`` each way (None: unshaped) and round-trip time."""

    name: str
    rate_mbit: float | None
    rtt_ms: float

    def __post_init__(self) -> None:
        if self.rate_mbit is not None and not self.rate_mbit > 0:
            raise ValueError(f"profile {self.name}: rate_mbit must be positive or None")
        if not 0 <= self.rtt_ms < 60_000:
            raise ValueError(f"profile {self.name}: rtt_ms must be in [0, 60000)")

    @property
    def one_way_ms(self) -> float:
        return self.rtt_ms / 2

    def describe(self) -> str:
        rate = "unshaped" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        return f"{rate}, {self.rtt_ms:g} ms RTT"


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("lan", None, 0.0),
        Profile("metro", 1000.0, 5.0),
        Profile("wan", 100.0, 40.0),
        Profile("poor", 20.0, 100.0),
    )
}


def parse_profile(text: str) -> Profile:
    """A profile by name, or ``RATE/RTT`` (Mbit/s or ``none``, ms): ``none/5``, ``50/20``."""
    if text in PROFILES:
        return PROFILES[text]
    rate, sep, rtt = text.partition("/")
    try:
        if not sep:
            raise ValueError
        return Profile(text, None if rate == "none" else float(rate), float(rtt))
    except ValueError:
        names = ", ".join(PROFILES)
        raise ValueError(f"unknown profile {text!r}: one of {names}, or RATE/RTT") from None


@dataclass(frozen=True)
class TbfParams:
    """One tbf qdisc: rate in bit/s, burst and queue limit in bytes."""

    rate_bit: int
    burst_bytes: int
    limit_bytes: int

    def tc_args(self) -> list[str]:
        return [
            "tbf",
            "rate",
            f"{self.rate_bit}bit",
            "burst",
            str(self.burst_bytes),
            "limit",
            str(self.limit_bytes),
        ]


def tbf_params(profile: Profile) -> TbfParams | None:
    """The shaper of ``profile`` (None when unshaped); the module docstring says why."""
    if profile.rate_mbit is None:
        return None
    bytes_per_s = profile.rate_mbit * 1e6 / 8
    burst = max(int(bytes_per_s * BURST_MS / 1000), 16 << 10)
    limit = burst + max(int(bytes_per_s * QUEUE_MS / 1000), QUEUE_FLOOR_BYTES)
    return TbfParams(round(profile.rate_mbit * 1e6), burst, limit)


def proxy_limit(profile: Profile) -> int:
    """Bytes the delay proxy holds per direction before it pushes back: 4x rate x one-way
    delay (the line carries rate x delay at full rate; the rest absorbs the bursts in which
    bytes arrive and leave), at least 1 MiB."""
    rate = UNSHAPED_RATE_MBIT if profile.rate_mbit is None else profile.rate_mbit
    return max(MIN_PROXY_LIMIT, int(4 * rate * 1e6 / 8 * profile.one_way_ms / 1000))


def proxy_capacity(profile: Profile) -> int:
    """The ring each proxy allocates per direction: room for every standard profile's
    limit and ``profile``'s, so that ``set_profile`` only moves the limit."""
    return max(proxy_limit(p) for p in (*PROFILES.values(), profile))


def bulk_bytes(profile: Profile, seconds: float) -> int:
    """Bytes per direction for a throughput measurement of about ``seconds``."""
    if profile.rate_mbit is None:
        return UNSHAPED_BULK_BYTES
    return int(profile.rate_mbit * 1e6 / 8 * seconds)


def choose_subnet(taken: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first /30 of ``CANDIDATE_BLOCKS`` that overlaps none of ``taken`` (the host's
    routes and addresses): the link's addresses never shadow one the host uses."""
    for block in CANDIDATE_BLOCKS:
        for subnet in ipaddress.IPv4Network(block).subnets(new_prefix=30):
            if not any(subnet.overlaps(net) for net in taken):
                return subnet
    raise WanLinkError(f"every /30 of {', '.join(CANDIDATE_BLOCKS)} overlaps a host route")


def steady_rate(timeline: list[tuple[float, int]], skip_fraction: float = 0.2) -> float:
    """Bytes/s over the steady part of a transfer: ``timeline`` holds (time, bytes so far)
    at each read; the first ``skip_fraction`` of the bytes (the shaper's burst, buffers
    filling) is left out."""
    if len(timeline) < 2:
        raise ValueError("a rate needs at least two reads")
    total = timeline[-1][1]
    start = next(point for point in timeline if point[1] >= total * skip_fraction)
    if start == timeline[-1]:
        start = timeline[-2]
    seconds = timeline[-1][0] - start[0]
    if seconds <= 0:
        raise ValueError("the steady part of the transfer took no time")
    return (total - start[1]) / seconds


def deviation(measured: float, setting: float) -> float:
    """Relative difference of a measurement from its setting (+0.05: 5 % above)."""
    return measured / setting - 1


@dataclass(frozen=True)
class LinkCheck:
    """What ``WanLink.check`` measured through the link under ``profile``."""

    profile: Profile
    rtt_ms: float
    up_mbit: float
    down_mbit: float

    def deviations(self) -> dict[str, float]:
        """Each checked figure's deviation from its setting (an unset one is not checked:
        RTT without delay, throughput without shaping)."""
        out: dict[str, float] = {}
        if self.profile.rtt_ms > 0:
            out["rtt"] = deviation(self.rtt_ms, self.profile.rtt_ms)
        if self.profile.rate_mbit is not None:
            out["up"] = deviation(self.up_mbit, self.profile.rate_mbit)
            out["down"] = deviation(self.down_mbit, self.profile.rate_mbit)
        return out

    def within(self, tolerance: float = TOLERANCE) -> bool:
        return all(abs(d) <= tolerance for d in self.deviations().values())

    def summary(self, tolerance: float = TOLERANCE) -> str:
        deviations = self.deviations()

        def part(what: str, value: float, unit: str) -> str:
            if what not in deviations:
                return f"{what} {value:.3g} {unit}"
            d = deviations[what]
            verdict = "ok" if abs(d) <= tolerance else "OFF"
            return f"{what} {value:.4g} {unit} ({d:+.1%}) {verdict}"

        return " | ".join(
            (
                part("rtt", self.rtt_ms, "ms"),
                part("up", self.up_mbit, "Mbit/s"),
                part("down", self.down_mbit, "Mbit/s"),
            )
        )


# --- running commands and children ---------------------------------------------------


def _run(argv: list[str], *, check: bool = True) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if check and result.returncode != 0:
        message = (result.stderr or result.stdout).strip()
        raise WanLinkError(f"`{' '.join(argv)}` failed: {message}")
    return result.stdout


def _host_networks() -> list[ipaddress.IPv4Network]:
    """The host's IPv4 routes (all tables) and address prefixes, default route excluded."""
    networks: list[ipaddress.IPv4Network] = []
    routes = json.loads(_run(["ip", "-4", "-j", "route", "show", "table", "all"]) or "[]")
    for route in routes:
        dst = route.get("dst", "default")
        if dst != "default":
            with contextlib.suppress(ValueError):
                networks.append(ipaddress.IPv4Network(dst, strict=False))
    for link in json.loads(_run(["ip", "-4", "-j", "addr", "show"]) or "[]"):
        for info in link.get("addr_info", []):
            with contextlib.suppress(ValueError, KeyError):
                prefix = f"{info['local']}/{info['prefixlen']}"
                networks.append(ipaddress.IPv4Network(prefix, strict=False))
    return networks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespace_pids(ns: str) -> list[int]:
    """The processes inside ``ns`` (an exited child, a zombie until reaped, is not)."""
    return [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).split()]


def _kill_namespace_processes(ns: str, grace_s: float = 3.0) -> None:
    """SIGTERM every process inside ``ns``, then SIGKILL those still there after
    ``grace_s``."""
    pids = _namespace_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        time.sleep(0.02)
        pids = _namespace_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _delete_namespace(ns: str) -> None:
    _kill_namespace_processes(ns)
    _run(["ip", "netns", "del", ns], check=False)


# The namespaces of this process's open links (a stale one may carry a reused pid).
_live_namespaces: set[str] = set()


def cleanup_stale() -> list[str]:
    """Delete the namespaces of WanLinks whose process is gone (killed before it could
    clean up; or an earlier process with this pid); returns their names."""
    pattern = re.compile(rf"^{NS_PREFIX}(\d+)x\d+[cs]$")
    stale = []
    for line in _run(["ip", "netns", "list"], check=False).splitlines():
        name = line.split(" ", 1)[0]
        match = pattern.match(name)
        if match is None or name in _live_namespaces:
            continue
        pid = int(match[1])
        if pid == os.getpid() or not _pid_alive(pid):
            _delete_namespace(name)
            stale.append(name)
    return stale


class _Child:
    """A child process that announces ``listening on ADDRESS`` and answers commands on
    stdin line by line; its stdin closing stops it."""

    def __init__(self, argv: list[str], timeout_s: float = 30.0) -> None:
        self.label = " ".join(argv)
        self.capacity = 0  # a proxy's ring, bytes per direction
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self.address = self.expect(READY_PREFIX, timeout_s)[len(READY_PREFIX) :]
        except BaseException:
            self.stop()
            raise

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, prefix: str, timeout_s: float = 10.0) -> str:
        """The next line, which must start with ``prefix``."""
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise WanLinkError(f"no answer from {self.label} in {timeout_s}s") from None
        if line is None:
            code = self.proc.wait()
            raise WanLinkError(f"{self.label} exited with code {code}")
        if not line.startswith(prefix):
            raise WanLinkError(f"{self.label} answered {line!r}, expected {prefix!r}")
        return line

    def command(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.expect("ok ")

    def stop(self, grace_s: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


# --- the link ---------------------------------------------------------------------------

_link_numbers = itertools.count()


class WanLink(Closing):
    """Two network namespaces joined by a shaped veth pair, plus delay proxies; a context
    manager that leaves no namespace or child behind, even on failure or Ctrl-C."""

    def __init__(self, profile: Profile) -> None:
        number = next(_link_numbers)
        self.client_ns = f"{NS_PREFIX}{os.getpid()}x{number}c"
        self.server_ns = f"{NS_PREFIX}{os.getpid()}x{number}s"
        self.profile = profile
        self._created: list[str] = []
        self._proxies: list[_Child] = []
        self._direct: list[str] = []
        self._sink: _Child | None = None
        self._check_address: str | None = None
        self._shaped = False
        self._closed = False
        atexit.register(self.close)
        try:
            cleanup_stale()
            self.subnet = choose_subnet(_host_networks())
            client_ip, server_ip = list(self.subnet.hosts())[:2]
            self.client_ip, self.server_ip = str(client_ip), str(server_ip)
            for ns in (self.client_ns, self.server_ns):
                _live_namespaces.add(ns)
                _run(["ip", "netns", "add", ns])
                self._created.append(ns)
            peer = ["peer", "name", DEVICE, "netns", self.server_ns]
            _run(["ip", "-n", self.client_ns, "link", "add", DEVICE, "type", "veth", *peer])
            prefix = self.subnet.prefixlen
            for ns, ip in ((self.client_ns, client_ip), (self.server_ns, server_ip)):
                _run(["ip", "-n", ns, "addr", "add", f"{ip}/{prefix}", "dev", DEVICE])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                _run(["ip", "-n", ns, "link", "set", DEVICE, "up"])
            self.set_profile(profile)
        except BaseException:
            self.close()
            raise

    def command(self, side: Side, argv: list[str]) -> list[str]:
        """``argv`` run inside the client's or the server's namespace."""
        ns = {"client": self.client_ns, "server": self.server_ns}[side]
        return ["ip", "netns", "exec", ns, *argv]

    def connect(self, server_port: int, *, proxy: bool | None = None) -> str:
        """The address a client in client_ns dials to reach ``server_ip:server_port``
        through the link: a new delay proxy's ``127.0.0.1:PORT``, or, for a profile
        without delay (unless ``proxy``), the server's own address."""
        if not 0 < server_port < 65536:
            raise ValueError(f"server_port {server_port} out of range")
        if not (self.profile.rtt_ms > 0 if proxy is None else proxy):
            address = f"{self.server_ip}:{server_port}"
            self._direct.append(address)
            return address
        argv = [
            sys.executable,
            str(PROXY_SCRIPT),
            "--target",
            f"{self.server_ip}:{server_port}",
            "--network",
            str(self.subnet),
            "--delay-ms",
            repr(self.profile.one_way_ms),
            "--limit",
            str(proxy_limit(self.profile)),
            "--capacity",
            str(proxy_capacity(self.profile)),
        ]
        child = _Child(self.command("client", argv))
        child.capacity = proxy_capacity(self.profile)
        self._proxies.append(child)
        return child.address

    def set_profile(self, profile: Profile) -> None:
        """Reshape the link (both tbf qdiscs, every proxy's delay and limit) in place."""
        params = tbf_params(profile)
        for ns in (self.client_ns, self.server_ns):
            if params is not None:
                _run(["tc", "-n", ns, "qdisc", "replace", "dev", DEVICE, "root", *params.tc_args()])
            elif self._shaped:
                _run(["tc", "-n", ns, "qdisc", "del", "dev", DEVICE, "root"])
        self._shaped = params is not None
        for child in self._proxies:
            child.command(f"delay {profile.one_way_ms!r}")
            child.command(f"limit {proxy_limit(profile)}")
            if proxy_limit(profile) > child.capacity:
                logger.warning(
                    "[WanLink] the proxy at %s holds %d bytes, not the %d %s asks for: "
                    "its throughput is capped near %.0f Mbit/s; connect again",
                    child.address,
                    child.capacity,
                    proxy_limit(profile),
                    profile.name,
                    child.capacity * 8 / 1e6 / (profile.one_way_ms / 1000),
                )
        if profile.rtt_ms > 0 and self._direct:
            logger.warning(
                "[WanLink] %s has no delay proxy: it stays undelayed under %s; connect again",
                ", ".join(self._direct),
                profile.name,
            )
        self.profile = profile

    def check(self, *, seconds: float = 1.5, pings: int = 20) -> LinkCheck:
        """Measure the link as a client in client_ns sees it, through the same path as
        ``connect`` gives: the median of ``pings`` round trips of a 64-byte message, then
        the steady throughput of about ``seconds`` of bulk transfer each way."""
        if self._sink is None:
            argv = [sys.executable, str(THIS_SCRIPT), "sink", "--bind", self.server_ip]
            self._sink = _Child(self.command("server", argv))
        port = int(self._sink.address.rsplit(":", 1)[1])
        if self.profile.rtt_ms == 0:
            address = f"{self.server_ip}:{port}"
        else:
            if self._check_address is None:
                self._check_address = self.connect(port, proxy=True)
            address = self._check_address
        size = bulk_bytes(self.profile, seconds)
        argv = [sys.executable, str(THIS_SCRIPT), "probe", address]
        argv += ["--pings", str(pings), "--bytes", str(size)]
        timeout = 60 + 4 * seconds + pings * self.profile.rtt_ms / 1000 * 2
        result = subprocess.run(
            self.command("client", argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise WanLinkError(f"the check's probe failed: {result.stderr.strip()}")
        figures = json.loads(result.stdout)
        return LinkCheck(
            self.profile,
            rtt_ms=statistics.median(figures["rtt_ms"]),
            up_mbit=figures["up_bytes_s"] * 8 / 1e6,
            down_mbit=figures["down_bytes_s"] * 8 / 1e6,
        )

    def close(self) -> None:
        """Stop every child (proxies, the check's sink, then anything left inside the
        namespaces) and delete the namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            for child in [*self._proxies, *([self._sink] if self._sink else [])]:
                try:
                    child.stop()
                except Exception:
                    logger.exception("[WanLink] stopping %s", child.label)
        finally:
            for ns in self._created:
                _delete_namespace(ns)
            _live_namespaces.difference_update((self.client_ns, self.server_ns))


@functools.cache
def unavailable() -> str | None:
    """None when a WanLink can be built here, else why not (tests skip with it)."""
    if not sys.platform.startswith("linux"):
        return "the WAN harness needs Linux network namespaces"
    if os.geteuid() != 0:
        return f"the WAN harness needs root for network namespaces (uid {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the WAN harness needs iproute2's `{tool}` on PATH"
    try:
        with WanLink(Profile("probe", 1000.0, 0.0)):
            pass
    except (WanLinkError, OSError, subprocess.SubprocessError) as error:
        return f"cannot build a WAN link here (namespaces, veth, tbf): {error}"
    return None


# --- the check's two ends (run inside the namespaces) -----------------------------------

_HEADER = struct.Struct("!cQ")
_RATE = struct.Struct("!d")
_READ = 1 << 20


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            raise ConnectionError("peer closed mid-message")
        data += piece
    return bytes(data)


def _receive_timeline(sock: socket.socket, n: int) -> list[tuple[float, int]]:
    buffer = memoryview(bytearray(_READ))
    timeline, total = [(time.monotonic(), 0)], 0
    while total < n:
        got = sock.recv_into(buffer[: min(_READ, n - total)])
        if not got:
            raise ConnectionError("peer closed mid-transfer")
        total += got
        timeline.append((time.monotonic(), total))
    return timeline


def _send_zeros(sock: socket.socket, n: int) -> None:
    zeros = memoryview(bytes(_READ))
    while n:
        step = min(n, _READ)
        sock.sendall(zeros[:step])
        n -= step


def _serve_sink(conn: socket.socket) -> None:
    """P: echo n bytes; U: receive n bytes, answer their steady rate; D: send n bytes."""
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                op, n = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
            except ConnectionError:
                return
            if op == b"P":
                conn.sendall(_recv_exact(conn, n))
            elif op == b"U":
                conn.sendall(_RATE.pack(steady_rate(_receive_timeline(conn, n))))
            elif op == b"D":
                _send_zeros(conn, n)
            else:
                return


def _sink_main(bind: str) -> int:
    listener = socket.create_server((bind, 0))
    print(f"{READY_PREFIX}{bind}:{listener.getsockname()[1]}", flush=True)

    def stop_on_eof() -> None:
        sys.stdin.read()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_on_eof, daemon=True).start()
    with listener:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=_serve_sink, args=(conn,), daemon=True).start()


def _probe_main(address: str, pings: int, size: int) -> int:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = bytes(PING_BYTES)
        rtts = []
        for i in range(pings + 1):
            start = time.perf_counter()
            sock.sendall(_HEADER.pack(b"P", len(payload)) + payload)
            _recv_exact(sock, len(payload))
            if i:  # the first one opens the path (thread start-up, slow start)
                rtts.append((time.perf_counter() - start) * 1000)
        sock.sendall(_HEADER.pack(b"U", size))
        _send_zeros(sock, size)
        (up,) = _RATE.unpack(_recv_exact(sock, _RATE.size))
        sock.sendall(_HEADER.pack(b"D", size))
        down = steady_rate(_receive_timeline(sock, size))
    print(json.dumps({"rtt_ms": rtts, "up_bytes_s": up, "down_bytes_s": down}))
    return 0


# --- the CLI ----------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _check_main(profiles: list[Profile], seconds: float, json_path: Path | None) -> int:
    reason = unavailable()
    if reason is not None:
        print(f"wan check: unavailable: {reason}", file=sys.stderr)
        return 2
    # A SIGTERM unwinds like Ctrl-C, so the namespaces are deleted.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    load = os.getloadavg()
    described: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in load],
    }
    print("machine: " + ", ".join(f"{k} {v}" for k, v in described.items()))
    results: list[dict[str, Any]] = []
    failed = []
    with WanLink(profiles[0]) as link:
        for profile in profiles:
            link.set_profile(profile)
            started = time.monotonic()
            measured = link.check(seconds=seconds)
            elapsed = time.monotonic() - started
            params = tbf_params(profile)
            shaping = (
                f"tbf burst {params.burst_bytes} B limit {params.limit_bytes} B"
                if params
                else "no tbf"
            )
            delay = f"proxy {profile.one_way_ms:g} ms each way" if profile.rtt_ms else "no proxy"
            print(f"profile {profile.name}: {profile.describe()} ({shaping}; {delay})")
            print(f"  measured: {measured.summary()}  [{elapsed:.1f} s]")
            if not measured.within():
                failed.append(profile.name)
            results.append(
                {
                    **asdict(measured),
                    "deviations": measured.deviations(),
                    "within": measured.within(),
                    "tbf": asdict(params) if params else None,
                    "proxy_limit_bytes": proxy_limit(profile) if profile.rtt_ms else None,
                }
            )
    verdict = "FAILED: " + ", ".join(failed) if failed else "ok"
    print(f"wan check: every figure within {TOLERANCE:.0%} of its setting: {verdict}")
    if json_path is not None:
        document = {"benchmark": "wanlink", "machine": described, "profiles": results}
        json_path.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="measure each profile through the link")
    check.add_argument("--profiles", default=",".join(PROFILES), help="names or RATE/RTT")
    check.add_argument("--seconds", type=float, default=1.5, help="bulk transfer each way")
    check.add_argument("--json", type=Path, default=None, help="write the figures here")
    sink = commands.add_parser("sink", help="(internal) the check's server end")
    sink.add_argument("--bind", required=True)
    probe = commands.add_parser("probe", help="(internal) the check's client end")
    probe.add_argument("address")
    probe.add_argument("--pings", type=int, default=20)
    probe.add_argument("--bytes", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "sink":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        return _sink_main(args.bind)
    if args.command == "probe":
        return _probe_main(args.address, args.pings, args.bytes)
    try:
        profiles = [parse_profile(p) for p in args.profiles.split(",")]
    except ValueError as error:
        parser.error(str(error))
    return _check_main(profiles, args.seconds, args.json)


if __name__ == "__main__":
    sys.exit(main())
