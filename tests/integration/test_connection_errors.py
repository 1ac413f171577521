"""Every client command, when a connection or its TLS fails, says in one line what went
wrong and what to do (splitfed/failures.py), never a traceback: a server_name the
certificate lacks (backbone, federated aggregator, key manager, an IP address), a server
of another CA, an expired server certificate, a revoked client certificate, nothing
listening. And ``status`` as a client asks the key manager only what a client may ask.

The servers are cheap: a Diagnostics server stands in for the backbone and the aggregator
(the handshake fails before any call reaches a service), and one key manager serves the
module; nothing trains.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner, Result
from grpc_health.v1 import health, health_pb2_grpc
from helpers import tls_of
from prometheus_client import REGISTRY
from security_kit import SERVER_NAME as KM_NAME
from security_kit import KeyManagerKit, keymanager_kit

from splitfed.cli import cli
from splitfed.cli.configs import AggregatorConfig, BackboneConfig, KeyManagerConfig, load, load_as
from splitfed.models.tiny import BUNDLED_DATASET, make_tiny_checkpoint
from splitfed.security.ca import CertificateAuthority
from splitfed.services.diagnostics import binding
from splitfed.services.keymanager.server import server_tls
from splitfed.transport import Server, create_server

NAME = "backbone.splitfed.local"


@dataclass
class World:
    root: Path
    keys: KeyManagerKit
    client: Path  # an enrolled client's TLS directory
    revoked: Path  # an enrolled client, revoked since
    good: Server  # the deployment CA's certificate for NAME
    foreign: Server  # another CA's certificate for NAME
    expired: str  # address of a server whose certificate has expired
    server_tls: Path  # the deployment CA's certificate for NAME, as files


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("connection-errors")
    make_tiny_checkpoint(root / "model", ["Add 1 and 2.", "3"], layers=3, hidden_size=16)
    ca, other = CertificateAuthority.create("test CA"), CertificateAuthority.create("other CA")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    stale = ca.issue(
        "backbone-0", "backbone", dns_names=[NAME], not_before=long_ago, validity=dt.timedelta(1)
    )
    # The transport's factory refuses to serve an expired certificate: a bare grpc server.
    expired = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), expired)
    assert stale.key_pem is not None
    credentials = grpc.ssl_server_credentials(
        [(stale.key_pem, stale.cert_pem)], root_certificates=ca.cert_pem, require_client_auth=True
    )
    port = expired.add_secure_port("127.0.0.1:0", credentials)
    with pytest.MonkeyPatch.context() as monkeypatch:
        kit = keymanager_kit(root, monkeypatch, ca=ca)
        kit.start()
        client, revoked = kit.enroll("hospital-a"), kit.enroll("hospital-b")
        admin = kit.admin()
        admin.revoke(identity="hospital-b")
        admin.close()
        good = create_server(
            [binding()], tls_of(ca, ca.issue("backbone-0", "backbone", dns_names=[NAME]))
        )
        foreign = create_server(
            [binding()], tls_of(other, other.issue("backbone-0", "backbone", dns_names=[NAME]))
        )
        with good, foreign:
            expired.start()
            backbone = ca.issue("backbone-0", "backbone", dns_names=[NAME])
            backbone.write(root / "backbone-tls")
            expired_at = f"127.0.0.1:{port}"
            yield World(
                root, kit, client, revoked, good, foreign, expired_at, root / "backbone-tls"
            )
            expired.stop(0)
        kit.stop()


def config(world: World, backbone: str, server_name: str | None, extra: str = "") -> Path:
    name = f'server_name = "{server_name}"\n' if server_name else ""
    path = world.root / f"client-{abs(hash((backbone, server_name, extra)))}.toml"
    path.write_text(
        f'[backbone]\naddress = "{backbone}"\n{name}tls_dir = "{world.client}"\n'
        f'[training]\ndata = "{BUNDLED_DATASET}"\nmodel_path = "{world.root / "model"}"\n'
        "max_steps = 1\nbatch_size = 2\nmax_length = 32\n" + extra
    )
    return path


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def flat(result: Result) -> str:
    """The output with status's table borders and line breaks taken out."""
    return " ".join(re.sub(r"[│┃]", " ", result.output).split())


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def test_train_names_what_the_backbone_certificate_carries(world: World) -> None:
    result = run("train", "--config", str(config(world, world.good.address, "wrong.example")))
    assert one_line_error(result) == (
        f"error: the certificate of the backbone at {world.good.address} does not carry the "
        f"name 'wrong.example' (it has: {NAME}): set server_name to one of those names, or "
        "re-enroll the backbone with a token from "
        "`splitfed keys token create ... --dns wrong.example`"
    )


def test_a_federation_member_gets_one_line_for_the_aggregator(world: World) -> None:
    federated = (
        f'[federated]\naggregator = "{world.good.address}"\nfederation = "fed"\n'
        'server_name = "wrong.example"\nmax_wait_s = 30\n'
    )
    path = config(world, world.good.address, NAME, federated)
    line = one_line_error(run("train", "--config", str(path)))
    assert line.startswith(f"error: the certificate of the aggregator at {world.good.address}")
    assert "does not carry the name 'wrong.example'" in line and "--dns wrong.example" in line


def test_an_ip_address_without_server_name_asks_for_ip(world: World) -> None:
    path = config(world, world.good.address, None)
    line = one_line_error(run("generate", "--config", str(path), "--prompt", "Hi"))
    assert "does not carry the IP address '127.0.0.1'" in line, line
    assert line.endswith("--ip 127.0.0.1`"), line


def test_a_server_of_another_ca(world: World) -> None:
    path = config(world, world.foreign.address, NAME)
    line = one_line_error(run("eval", "--config", str(path), "--data", str(BUNDLED_DATASET)))
    assert f"was not issued by the CA in {world.client / 'ca.pem'}" in line, line
    assert "use the deployment's ca.pem" in line


def test_an_expired_server_certificate(world: World) -> None:
    path = config(world, world.expired, NAME)
    line = one_line_error(run("generate", "--config", str(path), "--prompt", "Hi"))
    assert f"the certificate of the backbone at {world.expired} has expired" in line, line
    # status shows the same line in its table, and exits 1.
    result = run("status", "--config", str(path))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "TLS FAILED" in result.output and "has expired" in flat(result), result.output


def test_a_revoked_certificate_is_told_to_enroll_again(world: World) -> None:
    keymanager = ("--keymanager", world.keys.address, "--server-name", KM_NAME)
    line = one_line_error(run("keys", "renew", *keymanager, "--tls-dir", str(world.revoked)))
    assert line == (
        f"error: the key manager at {world.keys.address} refuses this party's certificate: it "
        "was revoked; enroll again with a new token (an admin runs `splitfed keys token "
        "create`, then `splitfed keys enroll`)"
    )


def test_the_key_manager_unreachable_or_misnamed(world: World) -> None:
    admin = str(world.root / "admin")
    address = f"127.0.0.1:{closed_port()}"
    line = one_line_error(run("keys", "list", "--keymanager", address, "--tls-dir", admin))
    assert line == (
        f"error: nothing answers at {address} (the key manager): check that the service runs "
        "and that the address and port are right"
    )
    result = run(
        "keys", "list", "--keymanager", world.keys.address, "--tls-dir", admin,
        "--server-name", "km.example",
    )  # fmt: skip
    line = one_line_error(result)
    assert "the certificate of the key manager at" in line and "'km.example'" in line, line
    assert line.endswith("make its certificate with `splitfed keys init ... --dns km.example`")


def _keymanager_denials() -> float:
    total = 0.0
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == "splitfed_authorization_denials_total" and "KeyManager" in str(
                sample.labels.get("service")
            ):
                total += sample.value
    return total


def test_status_as_a_client_asks_only_what_a_client_may(world: World) -> None:
    security = (
        f'[security]\nkeymanager = "{world.keys.address}"\nkeymanager_server_name = "{KM_NAME}"\n'
    )
    path = config(world, world.good.address, NAME, security)
    before = _keymanager_denials()
    result = run("status", "--config", str(path))
    output = flat(result)
    assert "PERMISSION_DENIED" not in output and "Traceback" not in output, output
    assert "this certificate not revoked" in output, output
    assert "role client" in output, output
    assert _keymanager_denials() == before


def minimal(world: World, kind: str) -> Path:
    """The least a ``kind`` config holds; every service's TLS material in its default."""
    tls = f'[server]\ntls_dir = "{world.server_tls}"\n'
    texts = {
        "keymanager": f'[keymanager]\nstate_dir = "{world.keys.state_dir}"\n',
        "backbone": f'[backbone]\nmodel_path = "{world.root / "model"}"\n' + tls,
        "aggregator": f'[aggregator]\nstate_dir = "{world.root / "agg"}"\n'
        '[[aggregator.federations]]\nname = "fed"\nmembers = ["hospital-a"]\n'
        'schema = {"lora_A" = [4, 16]}\n' + tls,
    }
    if kind == "client":
        return config(world, world.good.address, NAME)
    path = world.root / f"minimal-{kind}.toml"
    path.write_text(texts[kind])
    return path


@pytest.mark.parametrize("kind", ["keymanager", "backbone", "aggregator", "client"])
def test_config_validate_accepts_what_serve_loads(world: World, kind: str) -> None:
    """What `serve` (or `train`) loads from a minimal file, `config validate` accepts:
    both load it through splitfed/cli/configs.py; the key manager's TLS material defaults
    to state_dir/server for both (services/keymanager/server.py server_tls)."""
    path = minimal(world, kind)
    if kind == "keymanager":
        loaded = load_as(path, KeyManagerConfig)
        server_tls(loaded.keymanager, loaded.server)
    elif kind in ("backbone", "aggregator"):
        service = load_as(path, BackboneConfig if kind == "backbone" else AggregatorConfig)
        service.server.tls().verify_own_certificate()  # what create_server checks
    else:
        assert load(path)[0] == "client"
    result = run("config", "validate", "--config", str(path))
    assert result.exit_code == 0, result.output
    assert f"a valid {kind} config" in result.output
    assert "warning" not in result.output


def test_config_validate_warns_where_a_server_name_cannot_match(world: World) -> None:
    bare_ip = config(world, world.good.address, None)
    result = run("config", "validate", "--config", str(bare_ip))
    assert result.exit_code == 0, result.output
    assert (
        f"warning: [backbone] {world.good.address} is an IP address and no server_name is "
        "set: the backbone's certificate must carry IP 127.0.0.1 (a token made with `--ip "
        "127.0.0.1`), or set server_name to a DNS name it carries"
    ) in result.output
    misnamed = config(world, world.good.address, "wrong.example")
    cert = world.server_tls / "cert.pem"
    result = run("config", "validate", "--config", str(misnamed), "--server-cert", str(cert))
    assert result.exit_code == 0, result.output
    assert (
        f"warning: [backbone] expects the name 'wrong.example' but the backbone certificate "
        f"{cert} carries {NAME}: set server_name to one of them"
    ) in result.output
    named = config(world, world.good.address, NAME)
    result = run("config", "validate", "--config", str(named), "--server-cert", str(cert))
    assert result.exit_code == 0 and "warning" not in result.output, result.output


def test_the_command_line_prints_one_line_and_no_grpc_core_log(world: World) -> None:
    # In a process of its own: gRPC's C core logs the refused handshake to stderr unless
    # GRPC_VERBOSITY was set before grpc was imported (splitfed/cli/__init__.py does).
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    args = [sys.executable, "-m", "splitfed.cli", "health", world.good.address]
    args += ["--tls-dir", str(world.client), "--server-name", "wrong.example"]
    done = subprocess.run(args, check=False, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: {world.good.address}: the certificate of the server at {world.good.address} "
        f"does not carry the name 'wrong.example' (it has: {NAME}): set server_name to one "
        "of those names, or re-enroll the server with a token from "
        "`splitfed keys token create ... --dns wrong.example`"
    ], done.stderr
