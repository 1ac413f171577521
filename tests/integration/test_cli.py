"""The command line: exit codes, one-line errors, serving, the demo."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from helpers import SERVER_NAME, Pki, wait_until

from splitfed.cli import cli
from splitfed.cli.launcher import ServiceProcess
from splitfed.clients.diagnostics import DiagnosticsClient
from splitfed.models.tiny import BUNDLED_DATASET
from splitfed.transport import create_channel


@pytest.fixture
def server_dir(pki: Pki, tmp_path: Path) -> Path:
    pki.ca.issue("backbone-0", "backbone", dns_names=[SERVER_NAME]).write(tmp_path / "srv")
    return tmp_path / "srv"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "diagnostics"], "give tls_dir, or all of ca, cert and key"),
        (["serve", "diagnostics", "--tls-dir", "/nonexistent"], "does not exist"),
        (["serve", "diagnostics", "--insecure", "--tls-dir", "x"], "cannot be combined"),
        (["serve", "diagnostics", "--insecure", "--chunk-bytes", "0"], "chunk_bytes must be"),
        (["demo", "--size-mib", "0"], "--size-mib must be at least 1"),
        (["serve", "diagnostics", "--insecure", "--listen", "127.0.0.1:99999"], "not host:port"),
        (
            [
                "serve",
                "diagnostics",
                "--insecure",
                "--max-tensor-bytes",
                "100",
                "--max-buffered-bytes",
                "50",
            ],
            "must hold at least one largest tensor",
        ),
        (
            ["serve", "diagnostics", "--insecure", "--max-buffered-bytes", "0"],
            "max_bytes must be positive",
        ),
    ],
)
def test_configuration_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_port_in_use_exits_1(server_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        args = [
            "serve",
            "diagnostics",
            "--tls-dir",
            str(server_dir),
            "--listen",
            f"127.0.0.1:{port}",
        ]
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.output


def all_commands(group: click.Group = cli, path: tuple[str, ...] = ()) -> list[list[str]]:
    """Every command and group of the CLI, as the words that name it."""
    found = [list(path)]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += all_commands(command, (*path, name))
        else:
            found.append([*path, name])
    return found


def test_the_cli_has_the_commands_of_the_design() -> None:
    names = {" ".join(c) for c in all_commands()}
    assert {
        "demo", "train", "generate", "chat", "eval", "status", "serve keymanager",
        "serve aggregator", "serve backbone", "keys init", "keys token create", "keys enroll",
        "keys renew", "keys revoke", "keys list", "adapters export", "adapters inspect",
        "config validate",
    } <= names  # fmt: skip


@pytest.mark.parametrize("command", all_commands(), ids=lambda c: " ".join(c) or "splitfed")
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output
    assert "Show this message and exit." in result.output


def test_serve_answers_and_stops_cleanly_on_sigterm(
    pki: Pki, server_dir: Path, tmp_path: Path
) -> None:
    port_file = tmp_path / "port"
    args = ["serve", "diagnostics", "--tls-dir", str(server_dir), "--port-file", str(port_file)]
    server = ServiceProcess("diagnostics", args, log_path=tmp_path / "log")
    address = server.start()
    try:
        assert int(port_file.read_text()) == server.port
        with create_channel(address, pki.client, server_name=SERVER_NAME) as channel:
            assert DiagnosticsClient(channel).health() == "SERVING"
    finally:
        code = server.stop()
    assert code == 0
    log = (tmp_path / "log").read_text()
    assert "received SIGTERM, shutting down" in log


def processes_under(path: Path) -> list[int]:
    """Live processes whose command line names ``path`` (the demo's services do)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline and not process_gone(int(proc.name)):
            found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_make_demo_runs_end_to_end(tmp_path: Path) -> None:
    plot = tmp_path / "plots" / "loss.png"
    args = ["demo", "--size-mib", "4", "--steps", "20", "--workdir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-m", "splitfed", *args, "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "enrolled backbone-0, aggregator-0, hospital-a and hospital-b" in out
    assert "bit-exact" in out
    assert out.count("refused, as it should be") == 2
    assert "global version 3" in out
    # Held-out accuracy, base model and global adapter side by side: even these few steps
    # (the demo runs 90) put the adapter ahead; the demo itself fails otherwise.
    assert "held-out accuracy: 20 questions never trained on" in out
    row = next(line for line in out.splitlines() if line.startswith("│ accuracy"))
    base, adapter = (float(cell.strip().rstrip("%")) for cell in row.split("│")[2:4])
    assert adapter > base, out
    assert "│ Which is larger, " in out  # held-out questions with both models' answers
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and plot.stat().st_size > 10_000
    assert f"loss curves written to {plot}" in out
    assert "rounds closed" in out and "certificates issued" in out  # the metrics summary
    assert "stopped 3 services" in out
    assert (tmp_path / "hospital-a" / "key.pem").exists()
    assert (tmp_path / "aggregator-state" / "demo" / "versions" / "v3.body.safetensors").exists()
    assert processes_under(tmp_path) == []


@pytest.mark.slow
def test_ctrl_c_stops_the_demo_and_every_service(tmp_path: Path) -> None:
    """SIGINT to the demo alone (not its process group): it stops its services itself."""
    # Python leaves SIGINT ignored in a process started with it ignored (as a shell does
    # for background jobs, e.g. a CI runner's); the demo under test gets the default.
    interruptible = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from splitfed.cli import main; main()"
    )
    demo = subprocess.Popen(
        [sys.executable, "-c", interruptible, "demo", "--steps", "20", "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert demo.stdout is not None
    for line in demo.stdout:
        if line.startswith("key manager "):
            break
    assert wait_until(lambda: processes_under(tmp_path) != [], timeout_s=30)
    demo.send_signal(signal.SIGINT)
    _, err = demo.communicate(timeout=120)
    assert demo.returncode == 130, err
    assert "interrupted: every service was stopped" in err
    assert "Traceback" not in err
    assert wait_until(lambda: processes_under(tmp_path) == [], timeout_s=30)


@pytest.mark.slow
def test_train_and_generate_commands_with_a_config_file(tmp_path: Path) -> None:
    from backbone_kit import deployment

    dep = deployment(tmp_path)
    dep.start()
    try:
        dep.ca.issue("hospital-a", "client").write(tmp_path / "client-tls")
        config = tmp_path / "client.toml"
        config.write_text(
            "[backbone]\n"
            f'address = "{dep.address}"\n'
            'server_name = "backbone.splitfed.local"\n'
            f'tls_dir = "{tmp_path / "client-tls"}"\n'
            "[training]\n"
            f'data = "{BUNDLED_DATASET}"\n'
            f'model_path = "{dep.model_path}"\n'
            "max_steps = 3\nbatch_size = 2\nmax_length = 32\n"
            f'checkpoint_dir = "{tmp_path / "ckpt"}"\n'
            "[adapter]\nr = 4\nalpha = 8\n"
            "[generation]\nmax_new_tokens = 4\n"
        )
        result = CliRunner().invoke(cli, ["train", "--config", str(config)])
        assert result.exit_code == 0, result.output
        assert "trained to step 3" in result.output
        result = CliRunner().invoke(
            cli, ["generate", "--config", str(config), "--prompt", "Add 1 and 2."]
        )
        assert result.exit_code == 0, result.output
        assert "> Add 1 and 2." in result.output
        bad = tmp_path / "bad.toml"
        bad.write_text(config.read_text().replace("max_steps = 3", "max_stepz = 3"))
        result = CliRunner().invoke(cli, ["train", "--config", str(bad)])
        assert result.exit_code == 2
        assert "[training] has no field 'max_stepz'" in result.output
    finally:
        dep.stop()


PARENT = """
import sys, time
from splitfed.cli.launcher import ServiceProcess
from splitfed.models.tiny import BUNDLED_DATASET
child = ServiceProcess("diagnostics", ["serve", "diagnostics", "--insecure"])
child.start()
print(child.pid, flush=True)
time.sleep(600)
"""


def process_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}  # exited, not yet reaped


def test_a_killed_parent_leaves_no_orphaned_server() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    assert not process_gone(child_pid)
    parent.kill()
    parent.wait()
    assert wait_until(lambda: process_gone(child_pid), timeout_s=30)
