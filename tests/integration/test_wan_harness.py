"""The WAN harness (bench/wanlink.py) checks itself: through one link reshaped to each
profile, the measured RTT and throughput are within 10 % of the settings; its delay
proxy connects to nothing but its target and stops on SIGTERM; tearing a link down
leaves no namespace and no process, whatever ends the ``with`` block. Every test skips,
with the reason, where namespaces cannot be made (not root, no iproute2, no tbf).

The figures are the harness's own check (docs/benchmarks.md, "Emulating a WAN"): a link
that misses them would make every WAN figure wrong, so here they are the assertion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import SERVER_NAME, Pki, bench_module

from splitfed.cli.launcher import ServiceProcess

wanlink = bench_module("wanlink")
PROFILES = wanlink.PROFILES

# A client in client_ns: send one echo request whose payload reads like a request to go
# elsewhere, print what came back, then hold the connection until stdin closes.
CLIENT = """
import socket, struct, sys
host, port = sys.argv[1].rsplit(":", 1)
payload = b"CONNECT 127.0.0.1:22 HTTP/1.1\\r\\nHost: 8.8.8.8:53\\r\\n\\r\\n"
with socket.create_connection((host, int(port)), timeout=30) as sock:
    sock.sendall(struct.pack("!cQ", b"P", len(payload)) + payload)
    echo = b""
    while len(echo) < len(payload):
        echo += sock.recv(len(payload) - len(echo))
    print(echo == payload, flush=True)
    sys.stdin.read()
"""


# A splitfed client in client_ns: one health call over mTLS, then its time in ms.
HEALTH = """
import sys, time
from splitfed.clients.diagnostics import DiagnosticsClient
from splitfed.tls import TLSConfig
from splitfed.transport import create_channel
address, tls_dir, server_name = sys.argv[1:]
with create_channel(address, TLSConfig.from_dir(tls_dir), server_name=server_name) as channel:
    client = DiagnosticsClient(channel)
    print(client.health())
    start = time.perf_counter()
    client.health()
    print((time.perf_counter() - start) * 1000)
"""


@pytest.fixture(scope="module")
def available() -> None:
    reason = wanlink.unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def link(available: None) -> Iterator[Any]:
    """One link for the module, reshaped by each test that needs a profile."""
    with wanlink.WanLink(PROFILES["metro"]) as made:
        yield made


@pytest.fixture
def sink(link: Any) -> Iterator[int]:
    """The check's echo server inside server_ns; its port."""
    argv = [sys.executable, str(wanlink.THIS_SCRIPT), "sink", "--bind", link.server_ip]
    proc = subprocess.Popen(
        link.command("server", argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    yield int(line.rsplit(":", 1)[1])
    proc.stdin.close()
    proc.wait(timeout=10)


def start_client(link: Any, address: str) -> subprocess.Popen[str]:
    """CLIENT in the client's namespace, talking to ``address``, its pipes open."""
    client = subprocess.Popen(
        link.command("client", [sys.executable, "-c", CLIENT, address]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None and client.stdin is not None
    return client


def _namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split(" ", 1)[0] for line in listed.stdout.splitlines()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lan", "metro", "wan", "poor"])
def test_each_profile_measures_within_ten_percent_of_its_settings(link: Any, name: str) -> None:
    link.set_profile(PROFILES[name])
    check = link.check()
    context = f"{name}: {check.summary()} (load average {os.getloadavg()})"
    if name == "lan":
        # No shaping, no delay: only that it is fast and direct.
        assert check.rtt_ms < 1.0, context
        assert min(check.up_mbit, check.down_mbit) > 1000, context
    else:
        assert set(check.deviations()) == {"rtt", "up", "down"}
        assert check.within(0.10), context


def test_a_service_in_server_ns_answers_a_client_in_client_ns_through_the_link(
    link: Any, pki: Pki, tmp_path: Path
) -> None:
    """The way bench/wan.py runs splitfed: the service in the server's namespace
    (``ServiceProcess(prefix=...)``, bound to server_ip:0), the client in the client's,
    over mTLS through the delay proxy."""
    link.set_profile(PROFILES["wan"])
    pki.ca.issue("backbone-0", "backbone", dns_names=[SERVER_NAME]).write(tmp_path / "srv")
    pki.ca.issue("hospital-a", "client").write(tmp_path / "cli")
    args = ["serve", "diagnostics", "--tls-dir", str(tmp_path / "srv")]
    args += ["--listen", f"{link.server_ip}:0"]
    with ServiceProcess("diagnostics", args, prefix=link.command("server", [])) as service:
        address = link.connect(service.port)
        argv = [sys.executable, "-c", HEALTH, address, str(tmp_path / "cli"), SERVER_NAME]
        result = subprocess.run(
            link.command("client", argv), capture_output=True, text=True, timeout=60, check=False
        )
    assert result.returncode == 0, result.stderr[-3000:]
    status, elapsed_ms = result.stdout.split()
    assert status == "SERVING"
    # A lower bound only (load makes it slower, never faster): the call crossed the
    # proxy, which may send at most 0.5 ms early each way.
    assert float(elapsed_ms) >= PROFILES["wan"].rtt_ms - 1.0


def test_the_proxy_refuses_any_target_outside_the_link(link: Any) -> None:
    proxy = [sys.executable, str(wanlink.PROXY_SCRIPT), "--delay-ms", "1"]
    cases = [
        (["--target", "127.0.0.1:22", "--network", str(link.subnet)], "outside"),
        (["--target", "8.8.8.8:53", "--network", str(link.subnet)], "outside"),
        (["--target", "8.8.8.9:53", "--network", "8.8.8.8/30"], "not a private network"),
        (
            [
                *("--target", f"{link.server_ip}:9", "--network", str(link.subnet)),
                *("--listen", f"{link.client_ip}:0"),
            ],
            "not a loopback address",
        ),
    ]
    for args, message in cases:
        result = subprocess.run(
            link.command("client", [*proxy, *args]),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert "listening on" not in result.stdout


def test_the_proxy_connects_only_to_its_target_whatever_the_client_sends(
    link: Any, sink: int
) -> None:
    link.set_profile(PROFILES["wan"])
    address = link.connect(sink)
    assert address.startswith("127.0.0.1:")
    client = start_client(link, address)
    try:
        # The bytes reached the target verbatim (the sink echoed them).
        assert client.stdout.readline().strip() == "True"
        listed = subprocess.run(
            link.command("client", ["ss", "-Htn", "state", "established"]),
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        client.stdin.close()
        client.wait(timeout=10)
    peers = [line.split()[3] for line in listed.stdout.splitlines()]
    # The client's connection to the proxy (both ends on loopback), and the proxy's one
    # connection out: to the target, nowhere else.
    assert f"{link.server_ip}:{sink}" in peers
    outside = [p for p in peers if not p.startswith("127.0.0.1:")]
    assert outside == [f"{link.server_ip}:{sink}"]


def test_the_proxy_stops_cleanly_on_sigterm_with_a_connection_open(link: Any, sink: int) -> None:
    argv = [sys.executable, str(wanlink.PROXY_SCRIPT), "--delay-ms", "20"]
    argv += ["--target", f"{link.server_ip}:{sink}", "--network", str(link.subnet)]
    proxy = subprocess.Popen(
        link.command("client", argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proxy.stdout is not None and proxy.stdin is not None
    address = proxy.stdout.readline().removeprefix("listening on ").strip()
    client = start_client(link, address)
    try:
        assert client.stdout.readline().strip() == "True"
        assert proxy.stdin.write("delay 1\n") and proxy.stdin.flush() is None
        assert proxy.stdout.readline().strip() == "ok delay 1"
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(timeout=10) == 0
    finally:
        proxy.kill()
        client.stdin.close()
        client.wait(timeout=10)


@pytest.mark.parametrize("ending", [None, RuntimeError, KeyboardInterrupt])
def test_teardown_leaves_no_namespace_and_no_process(
    available: None, ending: type[BaseException] | None
) -> None:
    seen: dict[str, Any] = {}

    def use_link() -> None:
        with wanlink.WanLink(PROFILES["poor"]) as made:
            seen["names"] = {made.client_ns, made.server_ns}
            made.connect(9)  # a proxy, to a port where nothing listens
            # A process the test started in the server's namespace, as a service would be.
            seen["stray"] = subprocess.Popen(made.command("server", ["sleep", "600"]))
            assert seen["names"] <= _namespaces()
            if ending is not None:
                raise ending("the block fails")

    if ending is None:
        use_link()
    else:
        with pytest.raises(ending):
            use_link()
    assert not seen["names"] & _namespaces()
    assert seen["stray"].wait(timeout=10) == -signal.SIGTERM


def test_namespaces_left_by_a_dead_process_are_deleted(available: None, link: Any) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    # One of a process gone, and one of an earlier process that had this pid.
    names = [f"{wanlink.NS_PREFIX}{finished.pid}x0c", f"{wanlink.NS_PREFIX}{os.getpid()}x9999s"]
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert set(names) <= set(wanlink.cleanup_stale())  # others may be stale too
        assert not set(names) & _namespaces()
        # The open link of this process is not stale.
        assert {link.client_ns, link.server_ns} <= _namespaces()
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
