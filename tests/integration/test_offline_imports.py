"""Importing splitfed's model code never reaches for the network: bitsandbytes' CPU
backend asks the ``kernels`` package for a kernel on the Hugging Face Hub at import time
(on CPUs with AVX512-BF16), and peft imports bitsandbytes; splitfed imports peft only
through models/peft_import.py, which imports bitsandbytes first with ``kernels`` out of
reach."""

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
import splitfed.models.adapters
import splitfed.models.loading
lazy = "peft" not in sys.modules and "bitsandbytes" not in sys.modules
from splitfed.models.adapters import LoraSettings
LoraSettings().peft_config(["q_proj"])  # imports peft, through models/peft_import.py
import splitfed.models.multi_adapter
import peft, bitsandbytes
print(json.dumps({"calls": len(calls), "kernels_restored": sys.modules["kernels"] is fake,
                  "lazy": lazy}))
"""


def test_importing_the_models_and_peft_asks_the_hub_for_nothing() -> None:
    pytest.importorskip("kernels")
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Reading and averaging adapters (the aggregator) loads neither peft nor bitsandbytes.
    assert result == {"calls": 0, "kernels_restored": True, "lazy": True}
    assert "kernels-community" not in done.stderr
