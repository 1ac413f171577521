"""Helpers shared by tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from splitfed.security.ca import CertificateAuthority, IssuedCertificate
from splitfed.tls import TLSConfig
from splitfed.transport import TransportOptions

ROOT = Path(__file__).resolve().parents[1]
SERVER_NAME = "backbone.splitfed.local"
SMALL_CHUNKS = TransportOptions(chunk_bytes=64 * 1024)


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``bench/<script>`` with ``args``; fails the test (with its output) unless it
    exits 0."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def bench_module(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` as the scripts import each other (bench/ on sys.path,
    as when ``run_bench`` runs one): e.g. ``bench_module("wanlink").WanLink``."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.append(str(ROOT / "bench"))
    return importlib.import_module(name)


def save_random_llama_450mb(path: Path) -> Any:
    """A Llama checkpoint of ~450 MB in float32 with random weights (12 blocks of ~25 MB,
    hidden 768, 4 of 12 heads for keys and values, vocab 32000) at ``path``, in shards
    of 100 MB, built without holding it twice; returns its config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="100MB")
    return config


def tls_of(ca: CertificateAuthority, issued: IssuedCertificate) -> TLSConfig:
    assert issued.key_pem is not None
    return TLSConfig(ca.cert_pem, issued.cert_pem, issued.key_pem)


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    server: TLSConfig
    client: TLSConfig
    other_ca_client: TLSConfig
    expired_client: TLSConfig
    # A whole other deployment's client: its own CA, its own certificate.
    other_deployment: TLSConfig


def fresh_log(path: Path) -> Path:
    """``path`` if it does not exist yet, else ``<stem>.<n><suffix>`` with the first free
    n: a restarted service writes a new log and keeps the one of its killed predecessor."""
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        n += 1
    return candidate


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout_s`` passes (state in another thread)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def opacus_epsilon(entries: list[tuple[float, float, int]], delta: float) -> float:
    """opacus' RDP accountant, fed each release one by one in the order given: the
    independent reference the accounting tests compare against."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for sigma, rate, steps in entries:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return float(accountant.get_epsilon(delta))
