"""``splitfed health``: the exec probe the Kubernetes manifests run (k8s/base). A pod
checks itself over mutual TLS with its own certificate; the exit code is the verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2
from helpers import SERVER_NAME, Pki

from splitfed.cli import cli
from splitfed.tls import TLSConfig
from splitfed.transport import Server


def write_tls(directory: Path, tls: TLSConfig) -> Path:
    directory.mkdir()
    assert tls.ca_cert is not None and tls.cert_chain is not None
    assert tls.private_key is not None
    (directory / "ca.pem").write_bytes(tls.ca_cert)
    (directory / "cert.pem").write_bytes(tls.cert_chain)
    (directory / "key.pem").write_bytes(tls.private_key)
    return directory


def health(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["health", *args])
    return result.exit_code, result.output


def test_serving_server_exits_0(diagnostics_server: Server, pki: Pki, tmp_path: Path) -> None:
    tls_dir = write_tls(tmp_path / "own", pki.server)  # a server probing itself
    code, output = health(
        diagnostics_server.address, "--tls-dir", str(tls_dir), "--server-name", SERVER_NAME
    )
    assert (code, output.strip()) == (0, f"{diagnostics_server.address}: SERVING")


def test_not_serving_exits_1(diagnostics_server: Server, pki: Pki, tmp_path: Path) -> None:
    tls_dir = write_tls(tmp_path / "own", pki.client)
    diagnostics_server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        code, output = health(
            diagnostics_server.address, "--tls-dir", str(tls_dir), "--server-name", SERVER_NAME
        )
    finally:
        diagnostics_server.health.set("", health_pb2.HealthCheckResponse.SERVING)
    assert (code, output.strip()) == (1, f"{diagnostics_server.address}: NOT_SERVING")


@pytest.mark.parametrize("which", ["other_ca_client", "other_deployment"])
def test_foreign_certificate_exits_1(
    diagnostics_server: Server, pki: Pki, tmp_path: Path, which: str
) -> None:
    tls_dir = write_tls(tmp_path / "own", getattr(pki, which))
    code, output = health(
        diagnostics_server.address,
        "--tls-dir",
        str(tls_dir),
        "--server-name",
        SERVER_NAME,
        "--timeout",
        "2",
    )
    assert code == 1
    assert output.startswith("error: ")


def test_wrong_server_name_exits_1(diagnostics_server: Server, pki: Pki, tmp_path: Path) -> None:
    tls_dir = write_tls(tmp_path / "own", pki.client)
    code, output = health(
        diagnostics_server.address,
        "--tls-dir",
        str(tls_dir),
        "--server-name",
        "someone-else.local",
        "--timeout",
        "2",
    )
    assert code == 1
    assert "does not carry the name 'someone-else.local'" in output


def test_expired_own_certificate_exits_1(
    diagnostics_server: Server, pki: Pki, tmp_path: Path
) -> None:
    tls_dir = write_tls(tmp_path / "own", pki.expired_client)
    code, output = health(diagnostics_server.address, "--tls-dir", str(tls_dir))
    assert code == 1
    assert "expired" in output


def test_probe_does_not_import_torch(pki: Pki, tmp_path: Path) -> None:
    """An exec probe runs every few seconds: it must not pay for importing torch."""
    tls_dir = write_tls(tmp_path / "own", pki.client)
    code = (
        "import sys; from click.testing import CliRunner; from splitfed.cli import cli; "
        "r = CliRunner().invoke(cli, ['health', '127.0.0.1:1', '--timeout', '0.5', "
        f"'--tls-dir', {str(tls_dir)!r}]); "
        "print(r.exit_code, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False"]
