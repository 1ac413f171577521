"""The README's "A session, start to end", run as written: its shell block, verbatim, in
a fresh directory inside a network namespace of its own (so its fixed ports on localhost
meet nothing else; the parties find each other there as they would on one machine).

A reader who follows the README alone must reach a trained, evaluated and exported
adapter with no traceback and no guess; this test is that reader.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- the README session: tests/integration/test_readme_session.py runs this block -->"


def session_block(readme: str) -> str:
    """The shell block right after the marker comment in the README."""
    start = readme.index(MARKER)
    found = re.search(r"```sh\n(.*?)```", readme[start:], re.S)
    assert found is not None, "no ```sh block after the README session marker"
    return found[1]


def test_the_readme_session_block_is_found() -> None:
    block = session_block((ROOT / "README.md").read_text())
    for command in ("keys init", "serve backbone", "train", "eval", "adapters export"):
        assert f"splitfed {command}" in block


def _namespaces_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make a network namespace (unshare -n)"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux / iproute2) for a network namespace"
    return None


# About 90 s on 2 cores: make test-long runs it (make test keeps the check above that the
# block is there and names every command).
@pytest.mark.long
@pytest.mark.skipif(_namespaces_available() is not None, reason=str(_namespaces_available()))
def test_the_readme_session_runs_as_written(tmp_path: Path) -> None:
    block = session_block((ROOT / "README.md").read_text())
    # bash -e: the first failing command fails the session (a reader would stop there);
    # on the way out, whatever the session left in the background is stopped.
    script = tmp_path / "session.sh"
    script.write_text(
        "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
        "ip link set lo up\n" + block
    )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "COLUMNS": "120",
    }
    process = subprocess.Popen(
        ["unshare", "-n", "bash", str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the README session did not finish:\n{output[-6000:]}")
    assert process.returncode == 0, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    session = tmp_path / "session"
    # A trained, evaluated, exported adapter, and a merged model evaluated locally.
    assert (session / "adapter" / "adapter_config.json").is_file()
    assert (session / "model-ft" / "config.json").is_file()
    scores = json.loads((session / "eval.json").read_text())
    assert scores
    assert json.loads((session / "eval-merged.json").read_text())
    # The client's status saw what its role may see, and asked for nothing else.
    assert "PERMISSION_DENIED" not in output
    assert "denied" not in (session / "keymanager.log").read_text()
