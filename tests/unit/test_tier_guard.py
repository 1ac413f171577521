"""The unit tier's guard (tests/unit/conftest.py) refuses what a unit test must not use."""

from __future__ import annotations

import socket
import subprocess
import sys

import grpc
import pytest


def test_a_subprocess_is_refused() -> None:
    with pytest.raises(AssertionError, match="unit tests are pure Python"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)


def test_a_socket_is_refused() -> None:
    with socket.socket() as sock, pytest.raises(AssertionError, match="a socket"):
        sock.bind(("127.0.0.1", 0))
    with pytest.raises(AssertionError, match="a socket"):
        socket.create_connection(("127.0.0.1", 9))


def test_grpc_servers_and_channels_are_refused() -> None:
    with pytest.raises(AssertionError, match="a gRPC server"):
        grpc.server(None)  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="a gRPC channel"):
        grpc.insecure_channel("127.0.0.1:9")
