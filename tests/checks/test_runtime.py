"""Allocator tuning: applied once per process, and can be turned off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from splitfed.runtime import tune_allocator

CHECK = """
from splitfed import runtime
print(runtime.tune_allocator(), runtime.tune_allocator(), runtime.applied_profile())
"""
LEAN = """
from splitfed import runtime
print(runtime.tune_allocator("lean"), runtime.tune_allocator(), runtime.applied_profile())
"""


def run(setting: str | None, check: str = CHECK) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SPLITFED_MALLOC_TUNING"}
    if setting is not None:
        env["SPLITFED_MALLOC_TUNING"] = setting
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True, env=env
    )
    return result.stdout.strip()


def test_tuning_applies_on_glibc_once() -> None:
    assert run(None) == "True True throughput"


def test_a_lean_profile_asked_first_stays() -> None:
    assert run(None, LEAN) == "True True lean"


def test_tuning_can_be_turned_off() -> None:
    assert run("off") == "False False None"


def test_an_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown allocator profile 'huge'"):
        tune_allocator("huge")


def test_server_memory_options() -> None:
    from splitfed.transport import TransportOptions

    default = dict(TransportOptions().server_options())
    assert "grpc.experimental.tcp_max_read_buffer_size" not in default
    assert "grpc.http2.bdp_probe" not in default
    lean = dict(TransportOptions(max_read_buffer_bytes=1 << 18, bdp_probe=False).server_options())
    assert lean["grpc.experimental.tcp_max_read_buffer_size"] == 1 << 18
    assert lean["grpc.http2.bdp_probe"] == 0
    with pytest.raises(ValueError, match="max_read_buffer_bytes must be >= 4096"):
        TransportOptions(max_read_buffer_bytes=10)
