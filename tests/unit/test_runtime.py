"""Allocator tuning: applied once per process, and can be turned off."""

from __future__ import annotations

import os
import subprocess
import sys

CHECK = """
from splitfed.runtime import tune_allocator
print(tune_allocator(), tune_allocator(), tune_allocator.cache_info().hits)
"""


def run(setting: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SPLITFED_MALLOC_TUNING"}
    if setting is not None:
        env["SPLITFED_MALLOC_TUNING"] = setting
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, env=env
    )
    return result.stdout.strip()


def test_tuning_applies_on_glibc_once() -> None:
    assert run(None) == "True True 1"


def test_tuning_can_be_turned_off() -> None:
    assert run("off") == "False False 1"
