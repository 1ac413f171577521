"""The unit tier is pure Python: no subprocess, no network, no server. A test that needs
one belongs in tests/integration (real services) or tests/checks (tools); these guards
make a unit test that tries fail with a message saying so."""

from __future__ import annotations

import socket
import subprocess
from typing import Any

import grpc
import pytest


def _refuse(what: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(
            f"a unit test used {what}: unit tests are pure Python (no subprocess, network "
            "or server); move it to tests/integration or tests/checks"
        )

    return refuse


@pytest.fixture(autouse=True)
def _pure_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("a subprocess"))
    monkeypatch.setattr(socket.socket, "bind", _refuse("a socket (bind)"))
    monkeypatch.setattr(socket.socket, "connect", _refuse("a socket (connect)"))
    monkeypatch.setattr(socket, "create_connection", _refuse("a socket (connect)"))
    monkeypatch.setattr(grpc, "server", _refuse("a gRPC server"))
    monkeypatch.setattr(grpc, "secure_channel", _refuse("a gRPC channel"))
    monkeypatch.setattr(grpc, "insecure_channel", _refuse("a gRPC channel"))
