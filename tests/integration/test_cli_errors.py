"""Every command's error paths through the real entry point: a missing file, a bad
field, an unreachable service and an expired certificate, each with its exit code
(2: usage or config, 1: runtime) and one line of message, never a traceback."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from splitfed.cli import cli
from splitfed.models.tiny import BUNDLED_DATASET, make_tiny_checkpoint
from splitfed.security.ca import CertificateAuthority

CONFIG_COMMANDS = [
    ["train"],
    ["generate", "--prompt", "Hi"],
    ["chat"],
    ["eval", "--data", str(BUNDLED_DATASET)],
    ["status"],
    ["adapters", "export", "--output", "out"],
    ["config", "validate"],
    ["serve", "backbone"],
    ["serve", "aggregator"],
    ["serve", "keymanager"],
]
CLIENT_COMMANDS = CONFIG_COMMANDS[:5]
ENTRY = [sys.executable, "-m", "splitfed"]


def one_line_error(result: Result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CertificateAuthority]:
    root = tmp_path_factory.mktemp("cli-errors")
    make_tiny_checkpoint(root / "model", ["Add 1 and 2.", "3"], layers=3, hidden_size=16)
    ca = CertificateAuthority.create("test CA")
    ca.issue("hospital-a", "client").write(root / "good")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    ca.issue("hospital-a", "client", not_before=long_ago, validity=dt.timedelta(days=1)).write(
        root / "expired"
    )
    return root, ca


def client_config(root: Path, tls: str, *, address: str = "", extra: str = "") -> Path:
    path = root / f"client-{tls}-{len(extra)}.toml"
    path.write_text(
        "[backbone]\n"
        f'address = "{address or f"127.0.0.1:{closed_port()}"}"\n'
        'server_name = "backbone.splitfed.local"\n'
        f'tls_dir = "{root / tls}"\n'
        "[training]\n"
        f'data = "{BUNDLED_DATASET}"\n'
        f'model_path = "{root / "model"}"\n'
        "max_steps = 2\nbatch_size = 2\nmax_length = 32\n" + extra
    )
    return path


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_missing_config_file_exits_2(command: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, [*command, "--config", str(tmp_path / "gone.toml")])
    assert result.exit_code == 2, result.output
    assert "gone.toml does not exist" in one_line_error(result)


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_bad_field_is_named_and_exits_2(
    command: list[str], setup: tuple[Path, CertificateAuthority]
) -> None:
    root, _ = setup
    config = client_config(root, "good", extra="max_stepz = 3\n")
    if command[0] == "serve":
        section = {"backbone": "backbone", "aggregator": "aggregator"}.get(command[1], "keymanager")
        config = root / f"{section}.toml"
        config.write_text(f'[{section}]\nstate_dir = "s"\nmodel_path = "m"\nbogus = 1\n')
    result = CliRunner().invoke(cli, [*command, "--config", str(config)])
    assert result.exit_code == 2, result.output
    line = one_line_error(result)
    assert "has no field" in line and ("'max_stepz'" in line or "'bogus'" in line), line


@pytest.mark.parametrize("command", CLIENT_COMMANDS, ids=lambda c: c[0])
def test_an_unreachable_backbone_exits_1(
    command: list[str], setup: tuple[Path, CertificateAuthority]
) -> None:
    root, _ = setup
    config = client_config(root, "good")
    result = CliRunner().invoke(cli, [*command, "--config", str(config)], input="Hi\n/exit\n")
    assert result.exit_code == 1, result.output
    if command[0] == "status":
        assert "UNREACHABLE" in result.output and "Traceback" not in result.output
        return
    line = one_line_error(result)
    assert "nothing answers at 127.0.0.1:" in line and "check that the service runs" in line, line


@pytest.mark.parametrize("command", CLIENT_COMMANDS, ids=lambda c: c[0])
def test_an_expired_certificate_exits_1(
    command: list[str], setup: tuple[Path, CertificateAuthority]
) -> None:
    root, _ = setup
    config = client_config(root, "expired")
    result = CliRunner().invoke(cli, [*command, "--config", str(config)], input="Hi\n/exit\n")
    assert result.exit_code == 1, result.output
    if command[0] == "status":
        assert "EXPIRED" in result.output
        return
    assert "expired" in one_line_error(result)


# make test-long: the README session test runs every command through the installed entry
# point, and test_connection_errors.py checks its one-line error in a process of its own.
@pytest.mark.long
def test_the_installed_entry_point_reports_the_same(
    setup: tuple[Path, CertificateAuthority],
) -> None:
    """Through ``python -m splitfed``: the process's exit code and stderr."""
    root, _ = setup
    bad = client_config(root, "good", extra="max_stepz = 3\n")
    result = subprocess.run(
        [*ENTRY, "train", "--config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: [training] has no field")
    unreachable = client_config(root, "good")
    result = subprocess.run(
        [*ENTRY, "generate", "--config", str(unreachable), "--prompt", "Hi"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
