"""``splitfed demo`` / ``make demo``: the most complete end-to-end path the project has.

Today: mint a deployment CA, start a server (Diagnostics) in its own process on loopback
with mutual TLS, and have an enrolled client stream large activation-sized tensors through
it in every wire encoding; show that strangers are refused; shut down cleanly.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import grpc
import torch
from rich.console import Console
from rich.table import Table

from splitfed.clients.diagnostics import DiagnosticsClient
from splitfed.encodings import get_encoding
from splitfed.errors import rpc_status
from splitfed.launcher import ServiceProcess, ServiceStartError
from splitfed.retry import RetryPolicy
from splitfed.security.ca import CertificateAuthority
from splitfed.security.tls import TLSConfig
from splitfed.transport import create_channel
from splitfed.wire import MiB

SERVER_NAME = "backbone.splitfed.local"


class DemoError(RuntimeError):
    pass


def _mint(workdir: Path) -> tuple[TLSConfig, TLSConfig]:
    ca = CertificateAuthority.create("splitfed demo CA")
    ca.issue("backbone-0", "backbone", dns_names=[SERVER_NAME, "localhost"]).write(
        workdir / "backbone-0"
    )
    ca.issue("hospital-a", "client").write(workdir / "hospital-a")
    stranger_ca = CertificateAuthority.create("some other CA")
    stranger = stranger_ca.issue("mallory", "client")
    stranger_tls = TLSConfig(ca.cert_pem, stranger.cert_pem, stranger.key_pem)
    return TLSConfig.from_dir(workdir / "hospital-a"), stranger_tls


def _tensors(size_mib: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    hidden = 4096
    rows = max(1, size_mib * MiB // (hidden * 4))
    return [
        ("h1", torch.randn(rows, hidden, generator=gen)),
        ("h1_bf16", torch.randn(8, 128, hidden, generator=gen).to(torch.bfloat16)),
        ("attention_lengths", torch.tensor([128, 97, 64, 12, 128, 1, 33, 80])),
        ("loss", torch.tensor(2.718)),
        ("empty", torch.empty(0, hidden)),
    ]


def run_demo(size_mib: int = 256, workdir: Path | None = None) -> None:
    console = Console(width=max(Console().width, 110))
    with tempfile.TemporaryDirectory(prefix="splitfed-demo-") as tmp:
        root = workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        console.rule("[bold]splitfed demo: tensors over mutual TLS")
        client_tls, stranger_tls = _mint(root)
        console.print(f"minted a deployment CA and certificates in {root}")
        server = ServiceProcess(
            "diagnostics",
            [
                "serve",
                "diagnostics",
                "--listen",
                "127.0.0.1:0",
                "--tls-dir",
                str(root / "backbone-0"),
            ],
            log_path=root / "diagnostics.log",
        )
        try:
            address = server.start()
        except ServiceStartError as exc:
            raise DemoError(str(exc)) from None
        try:
            console.print(f"server process {server.pid} serving on {address}")
            _exchange(console, address, client_tls, size_mib)
            _strangers(console, address, client_tls, stranger_tls)
        finally:
            code = server.stop()
        console.print(f"server stopped gracefully (exit code {code})")
        if code != 0:
            raise DemoError(f"server exited with code {code}; see {root / 'diagnostics.log'}")
        console.rule("[bold green]demo finished")


def _exchange(console: Console, address: str, tls: TLSConfig, size_mib: int) -> None:
    with create_channel(address, tls, server_name=SERVER_NAME) as channel:
        client = DiagnosticsClient(channel)
        peer = client.who_am_i()
        console.print(
            f"health: {client.health()}; the server sees us as "
            f"[bold]{peer.role}/{peer.identity}[/] (server {peer.server_version})"
        )
        table = Table(title="client -> server -> client, verified by CRC-32C")
        columns = ("tensor", "dtype", "shape", "encoding", "MiB", "wire MiB", "MB/s", "max |error|")
        for column in columns:
            table.add_column(
                column, justify="right" if "MiB" in column or "/s" in column else "left"
            )
        tensors = _tensors(size_mib)
        for encoding in ("raw", "bf16", "int8"):
            enc = get_encoding(encoding)
            batch = [(n, t) for n, t in tensors if enc.supports(t.dtype)]
            start = time.perf_counter()
            echoed = client.echo(batch, encoding=encoding)
            seconds = time.perf_counter() - start
            total = sum(t.numel() * t.element_size() for _, t in batch)
            for (name, sent), (back_name, back, _) in zip(batch, echoed, strict=True):
                if back_name != name or back.shape != sent.shape or back.dtype != sent.dtype:
                    raise DemoError(f"echo of {name!r} came back as {back_name!r} {back.shape}")
                error = (back.double() - sent.double()).abs().max().item() if sent.numel() else 0.0
                if encoding == "raw" and not torch.equal(back, sent):
                    raise DemoError(f"raw echo of {name!r} is not bit-exact")
                table.add_row(
                    name,
                    str(sent.dtype).removeprefix("torch."),
                    str(tuple(sent.shape)),
                    encoding,
                    f"{sent.numel() * sent.element_size() / MiB:.1f}",
                    f"{enc.encoded_nbytes(sent.dtype, sent.shape) / MiB:.1f}",
                    f"{2 * total / seconds / 1e6:.0f}" if name == batch[0][0] else "",
                    "bit-exact" if encoding == "raw" else f"{error:.2e}",
                )
        console.print(table)
        console.print(
            "MB/s: tensor bytes of the whole batch, both directions, per second of wall time."
        )


def _strangers(console: Console, address: str, tls: TLSConfig, stranger: TLSConfig) -> None:
    once = RetryPolicy(max_attempts=1)
    # A stranger does not use our factory (which would refuse its certificate up front):
    # a plain gRPC channel presenting a certificate from another CA.
    plain = grpc.secure_channel(
        address,
        stranger.channel_credentials(),
        options=[("grpc.ssl_target_name_override", SERVER_NAME)],
    )
    cases = [
        ("a client whose certificate comes from another CA", plain),
        (
            "our client expecting a different server name",
            create_channel(address, tls, server_name="aggregator.splitfed.local"),
        ),
    ]
    for what, channel in cases:
        with channel:
            try:
                DiagnosticsClient(channel, retry=once, timeout_s=10).who_am_i()
            except grpc.RpcError as err:
                code = rpc_status(err)[0]
                console.print(f"refused, as it should be: {what} ({code.name if code else '?'})")
            else:
                raise DemoError(f"{what} was let in")
