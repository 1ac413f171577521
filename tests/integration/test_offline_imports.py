"""Importing splitfed's model code never reaches for the network: bitsandbytes' CPU
backend asks the ``kernels`` package for a kernel on the Hugging Face Hub at import time
(on CPUs with AVX512-BF16); splitfed imports it with ``kernels`` out of reach."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
import kernels
calls = []
def get_kernel(*args, **kwargs):
    calls.append(args)
    raise RuntimeError("no network in this probe")
kernels.get_kernel = get_kernel
fake = kernels
import splitfed.models
import peft
import bitsandbytes
print(json.dumps({"calls": len(calls), "kernels_restored": sys.modules["kernels"] is fake}))
"""


def test_importing_the_models_and_peft_asks_the_hub_for_nothing() -> None:
    pytest.importorskip("kernels")
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"calls": 0, "kernels_restored": True}
    assert "kernels-community" not in done.stderr
