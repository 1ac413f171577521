"""The Node.js example client (examples/node) against a real backbone over mTLS: health,
model info equal to what the Python client reads, and strangers refused.

Skips, saying why, where Node.js or npm is missing or the npm registry cannot be reached.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backbone_kit import SERVER_NAME, Deployment, deployment
from google.protobuf.json_format import MessageToDict
from transformers import AutoConfig

from splitfed.security.ca import CertificateAuthority

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")
# What npm prints when it cannot reach the registry (DNS, refused, timed out, offline).
NETWORK_ERRORS = (
    "ENOTFOUND",
    "EAI_AGAIN",
    "ECONNREFUSED",
    "ECONNRESET",
    "ETIMEDOUT",
    "ENETUNREACH",
    "EHOSTUNREACH",
    "ENOTCACHED",
    "network",
)

pytestmark = pytest.mark.skipif(
    NODE is None or NPM is None,
    reason="Node.js and npm not found (Debian: apt-get install nodejs npm)",
)


def _node_version() -> tuple[int, ...]:
    assert NODE is not None
    out = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=True).stdout
    return tuple(int(part) for part in out.strip().lstrip("v").split(".")[:2])


def _installed() -> bool:
    """Whether node_modules holds exactly what package-lock.json pins."""
    hidden = EXAMPLE / "node_modules" / ".package-lock.json"
    if not hidden.is_file():
        return False
    wanted = json.loads((EXAMPLE / "package-lock.json").read_text())["packages"]
    wanted.pop("", None)
    have = json.loads(hidden.read_text())["packages"]
    version = {name: entry.get("version") for name, entry in have.items()}
    return version == {name: entry.get("version") for name, entry in wanted.items()}


@pytest.fixture(scope="module")
def node_client() -> Path:
    """The example with its pinned dependencies installed (npm ci, once; node_modules is
    ignored by git)."""
    version = _node_version()
    if version < (18, 3):
        shown = ".".join(map(str, version))
        pytest.skip(f"Node.js {shown} is older than 18.3, the example's minimum (util.parseArgs)")
    if not _installed():
        assert NPM is not None
        result = subprocess.run(
            [NPM, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=EXAMPLE,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            reached = [word for word in NETWORK_ERRORS if word in result.stderr]
            if reached:
                pytest.skip(f"npm ci could not reach the npm registry ({reached[0]})")
            pytest.fail(f"npm ci failed:\n{result.stdout}\n{result.stderr}")
    return EXAMPLE / "client.js"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = deployment(tmp_path_factory.mktemp("node"))
    dep.start()
    yield dep
    dep.stop()


def _tls_dir(directory: Path, ca: CertificateAuthority, trusted: bytes, identity: str) -> Path:
    """ca.pem (the CA the client trusts) plus a client certificate issued by ``ca``."""
    ca.issue(identity, "client").write(directory)
    (directory / "ca.pem").write_bytes(trusted)
    return directory


def _run(client: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run(
        [NODE, str(client), *args], capture_output=True, text=True, timeout=60, check=False
    )


def _status_name(result: subprocess.CompletedProcess[str]) -> str:
    """The gRPC status name the client reports: "NAME: details (method)", its last line."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    return result.stderr.strip().splitlines()[-1].split(":", 1)[0]


def test_node_client_reads_health_and_model_info(
    node_client: Path, backbone: Deployment, tmp_path: Path
) -> None:
    tls = _tls_dir(tmp_path / "hospital-a", backbone.ca, backbone.ca.cert_pem, "hospital-a")
    args = ["--address", backbone.address, "--tls-dir", str(tls), "--server-name", SERVER_NAME]
    result = _run(node_client, *args)
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    assert out["health"] == {"service": "splitfed.v1.Backbone", "status": "SERVING"}
    info = out["model_info"]
    # Every field as the Python client reads it over the same mTLS ...
    channel, client = backbone.connect("hospital-b")
    with channel:
        expected = MessageToDict(
            client.model_info().to_proto(),
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        )
    assert info == expected
    # ... and the model the backbone was given.
    config = AutoConfig.from_pretrained(str(backbone.model_path), local_files_only=True)
    assert info["family"] == "llama"
    assert info["num_layers"] == config.num_hidden_layers == 6
    assert info["hidden_size"] == config.hidden_size == 64
    assert info["vocab_size"] == config.vocab_size
    assert info["dtype"] == "DTYPE_FLOAT32"


def test_node_client_is_refused_without_a_deployment_certificate(
    node_client: Path, backbone: Deployment, tmp_path: Path
) -> None:
    base = ["--address", backbone.address, "--server-name", SERVER_NAME]
    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    (ca_only / "ca.pem").write_bytes(backbone.ca.cert_pem)
    no_cert = _run(node_client, *base, "--tls-dir", str(ca_only), "--no-client-cert")
    assert _status_name(no_cert) == "UNAVAILABLE", no_cert.stderr

    # A certificate from another CA, while trusting the deployment's CA for the server.
    other = CertificateAuthority.create("another CA")
    foreign = _tls_dir(tmp_path / "mallory", other, backbone.ca.cert_pem, "mallory")
    refused = _run(node_client, *base, "--tls-dir", str(foreign))
    assert _status_name(refused) == "UNAVAILABLE", refused.stderr

    # The client checks the server's name: the backbone's certificate does not name this.
    tls = _tls_dir(tmp_path / "hospital-a", backbone.ca, backbone.ca.cert_pem, "hospital-a")
    elsewhere = ["--address", backbone.address, "--server-name", "aggregator.splitfed.local"]
    wrong_name = _run(node_client, *elsewhere, "--tls-dir", str(tls))
    assert _status_name(wrong_name) == "UNAVAILABLE", wrong_name.stderr
    assert "aggregator.splitfed.local" in wrong_name.stderr  # the name check failed


def test_node_client_usage_errors_exit_2(node_client: Path, tmp_path: Path) -> None:
    missing = _run(node_client, "--address", "127.0.0.1:1", "--tls-dir", str(tmp_path))
    assert missing.returncode == 2
    assert "ca.pem" in missing.stderr
