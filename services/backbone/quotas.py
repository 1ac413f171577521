"""What the backbone's quotas count: the memory a training pass's autograd graph holds
until its gradient comes (estimated per pass), and one identity's usage of sessions,
pending passes and KV caches.

The graph estimate
------------------
A training forward keeps, for its backward, the activations autograd saves in every
block (normalised inputs, attention inputs and outputs, MLP intermediates, masks,
dropout masks), plus h1 and h2. For one row of ``T`` tokens these are tensors of sizes
``a``, ``b * T`` or ``c * T**2`` elements (attention over ``T`` keys, a 4-D mask, the
prefix of P-Tuning adding to the keys): the bytes a pass holds are, per row, a
polynomial of degree 2 in ``T``. :meth:`GraphCost.calibrate` measures what three probe
passes of one row (16, 32 and 64 tokens, one padded position so that the masked code
path runs) really save, through ``torch.autograd.graph.saved_tensors_hooks``, counting
every storage once and leaving out the model's own weights, and fits that polynomial
exactly; :meth:`GraphCost.estimate` is ``rows * (a + b*T + c*T**2)`` plus h2, with any
negative coefficient dropped. The probes run once per trainable adapter (its first
training pass), in train mode with the caller's random state left untouched.

Tested against real passes of the tiny llama, qwen2, mistral, glm, glm4 and gpt2 models,
LoRA and prefix adapters, on CPU (tests/unit/test_backbone_quotas.py): the estimate is
at least what the graph holds and within 25 % of it (tensors that do not grow with the
batch, e.g. a broadcast mask, are counted per row, hence above). On CUDA the caching
allocator rounds each block up (to 512 B, large ones to 2 MiB), which the estimate does
not count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from splitfed.models.quantization import compute_dtype, tensor_storages

# Probe lengths (tokens of one row): three points fit the degree-2 polynomial exactly.
PROBE_TOKENS = (16, 32, 64)


@contextmanager
def _saved_storages(module: nn.Module) -> Iterator[dict[int, int]]:
    """Storages (data pointer -> bytes) of the tensors autograd saves meanwhile, except
    ``module``'s parameters and buffers."""
    weights = {
        pointer
        for tensor in (*module.parameters(), *module.buffers())
        for pointer, _ in tensor_storages(tensor)
    }
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        for pointer, size in tensor_storages(tensor):
            if pointer not in weights:
                seen[pointer] = size
        return tensor

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield seen


def measure_graph(
    body: nn.Module, hidden: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """``body(hidden, mask)`` with its graph, and the bytes that graph and h2 hold."""
    with torch.enable_grad(), _saved_storages(body) as seen:
        output: torch.Tensor = body(hidden, mask)
    storage = output.untyped_storage()
    seen.setdefault(storage.data_ptr(), storage.nbytes())
    return output, sum(seen.values())


@dataclass(frozen=True)
class GraphCost:
    """Bytes a training pass holds until its backward: ``rows * (constant + per_token *
    tokens + per_token_pair * tokens**2)`` plus its output (see the module docstring)."""

    constant: float
    per_token: float
    per_token_pair: float
    output_per_token: int

    def estimate(self, rows: int, tokens: int) -> int:
        per_row = self.constant + self.per_token * tokens + self.per_token_pair * tokens**2
        return int(rows * per_row) + rows * tokens * self.output_per_token

    @classmethod
    def calibrate(cls, body: nn.Module, hidden_size: int) -> GraphCost:
        """Fit the cost of ``body``'s passes from three probe passes (see the module
        docstring). Leaves gradients, the graph and the random state as they were."""
        # The dtype it computes in (a quantized body's first weight is an integer one).
        device, dtype = next(body.parameters()).device, compute_dtype(body)
        output_per_token = hidden_size * dtype.itemsize
        measured = []
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for tokens in PROBE_TOKENS:
                hidden = torch.zeros(1, tokens, hidden_size, device=device, dtype=dtype)
                mask = torch.ones(1, tokens, dtype=torch.long, device=device)
                mask[0, 0] = 0
                output, held = measure_graph(body, hidden.requires_grad_(True), mask)
                del output
                measured.append(held - tokens * output_per_token)
        constant, per_token, per_token_pair = _fit(PROBE_TOKENS, measured)
        return cls(
            max(0.0, constant), max(0.0, per_token), max(0.0, per_token_pair), output_per_token
        )


def _fit(xs: tuple[int, int, int], ys: list[int]) -> tuple[float, float, float]:
    """Coefficients (a, b, c) of ``a + b*x + c*x**2`` through three points, exactly."""
    (x0, x1, x2), (y0, y1, y2) = xs, [Fraction(y) for y in ys]
    d01 = (y1 - y0) / (x1 - x0)
    d12 = (y2 - y1) / (x2 - x1)
    c = (d12 - d01) / (x2 - x0)
    b = d01 - c * (x0 + x1)
    a = y0 - b * x0 - c * x0 * x0
    return float(a), float(b), float(c)


@dataclass(frozen=True)
class Usage:
    """What one identity (or everyone) holds on a backbone now."""

    sessions: int = 0
    pending_passes: int = 0
    pending_bytes: int = 0
    cache_bytes: int = 0
