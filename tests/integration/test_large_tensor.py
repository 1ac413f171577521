"""A 256 MiB tensor through a server in its own process; the receiver's memory stays bounded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import SERVER_NAME, Pki

from splitfed.cli.launcher import ServiceProcess
from splitfed.clients.diagnostics import DiagnosticsClient
from splitfed.transport import create_channel
from splitfed.wire import MiB

SIZE = 256 * MiB
# Interpreter, gRPC buffers and flow-control windows, thread stacks touched under load.
SLACK = 96 * MiB


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} missing from /proc/{pid}/status")


@pytest.mark.slow
def test_256_mib_tensor_streams_with_bounded_receiver_memory(pki: Pki, tmp_path: Path) -> None:
    ca = pki.ca
    ca.issue("backbone-0", "backbone", dns_names=[SERVER_NAME]).write(tmp_path / "server")
    args = ["serve", "diagnostics", "--tls-dir", str(tmp_path / "server")]
    with ServiceProcess("diagnostics", args, log_path=tmp_path / "server.log") as server:
        with create_channel(server.address or "", pki.client, server_name=SERVER_NAME) as channel:
            client = DiagnosticsClient(channel)
            # Warm up: threads, TLS session, first buffers, so the baseline includes them.
            client.echo([("warm", torch.ones(4 * MiB // 4))])
            baseline_kib = memory_kib(server.pid, "VmRSS")
            tensor = torch.randn(SIZE // 4, generator=torch.Generator().manual_seed(1))
            (received,) = client.echo([("h1", tensor)])
            peak_kib = memory_kib(server.pid, "VmHWM")
        assert torch.equal(received.tensor, tensor)
    growth = (peak_kib - baseline_kib) * 1024
    print(f"server memory growth: {growth / MiB:.0f} MiB for a {SIZE // MiB} MiB tensor")
    assert growth < 2 * SIZE + SLACK, f"server grew by {growth / MiB:.0f} MiB"
    # It must at least have held the tensor once: the measurement measures something.
    assert growth > SIZE // 2
