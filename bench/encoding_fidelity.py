"""Fidelity of the wire encodings on the loss curve: split LoRA training, in process,
with each encoding's round trip applied to the four tensors that cross the wire.

The model is the bench model's geometry (``bench/split_step.py``: Llama layout, hidden
512, 8 layers of 8 heads, LoRA r=16 on q, k, v, o of every block) with a smaller vocabulary
by default (``--vocab 4096``; 32000 is the bench model's, whose lm head alone triples a
step's time on 2 cores); the encodings act on hidden states, whose rows (512 values per
token) are the same either way. Head (k = 1), body and tail (m = 1) run in this process,
the body with its own LoRA as the backbone trains it, all three clipped by one global norm
and stepped with AdamW, as a split step over the wire is. Between head and body, and body
and tail, an autograd function encodes and decodes with ``splitfed.encodings``:

* forward: h1 (client -> backbone) and h2 (backbone -> client) in the activation encoding;
* backward: dL/dh2 (client -> backbone) and dL/dh1 (backbone -> client) in the gradient
  encoding.

Every configuration starts from the same weights and adapters and sees the same batches
(random tokens with structure: a fixed Markov chain over ``--active`` ids, each id
followed by its successor under a fixed permutation 3 times in 4, so the loss falls as the
model learns which ids occur and which follows which), for ``--steps`` steps.
Printed per configuration (``raw``, ``bf16``, ``int8``: both kinds alike; else
``act-int8+grad-bf16`` and so on): the final loss (mean of the last
10 % of steps), the mean |loss - raw| over the curve, and the relative L2 error of the
whole adapter gradient at the first step against raw (same weights, same batch); the
ratio lines are ``ratio final loss <enc>/raw: v``. ``--json PATH`` writes the curves.

    python bench/encoding_fidelity.py [--steps 80] [--json PATH]
        [--encodings raw/raw,bf16/bf16,int8/int8,int8/raw,int8/bf16,bf16/int8]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import llama_512x8, machine, report
from transformers import LlamaForCausalLM

from splitfed.clients.trainer import causal_lm_loss
from splitfed.encodings import get_encoding
from splitfed.models.adapters import AdapterSettings
from splitfed.models.loading import load_body, load_trainable_ends
from splitfed.models.optim import (
    OptimizerSettings,
    build_optimizer,
    clip_factor,
    grad_sq_norm,
    scale_grads,
)

ADAPTER = AdapterSettings(kind="lora", r=16, alpha=32, seed=7)
MAX_NORM = 1.0
HEAD_SCALE = 4.0
DEFAULT_ENCODINGS = "raw/raw,bf16/bf16,int8/int8,int8/raw,int8/bf16,bf16/int8"


def round_trip(tensor: torch.Tensor, encoding: str) -> torch.Tensor:
    """``tensor`` as the receiver decodes it after ``encoding`` on the wire."""
    if encoding == "raw":
        return tensor
    codec = get_encoding(encoding)
    payload = codec.encode(tensor.detach())
    return codec.decode(payload, tensor.dtype, tuple(tensor.shape))


class Wire(torch.autograd.Function):
    """The identity, with the wire's encode/decode on the way forward (an activation)
    and on the way back (its gradient)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, forward: str, backward: str) -> torch.Tensor:
        ctx.backward_encoding = backward
        return round_trip(tensor, forward)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return round_trip(grad.contiguous(), ctx.backward_encoding), None, None


def wire(tensor: torch.Tensor, activations: str, gradients: str) -> torch.Tensor:
    out: torch.Tensor = Wire.apply(tensor, activations, gradients)  # type: ignore[no-untyped-call]
    return out


class Split:
    """Head, body and tail of the model at ``path``, each with its LoRA; one optimizer
    over all adapters (clipping by the global norm, as both sides of a split step do)."""

    def __init__(self, path: Path, learning_rate: float) -> None:
        self.head, self.tail, params = load_trainable_ends(path, ADAPTER)
        self.body = load_body(path)
        ADAPTER.apply(self.body)
        self.body.train()
        body_params = [p for p in self.body.parameters() if p.requires_grad]
        self.params = params + body_params
        self.optimizer, self.scheduler = build_optimizer(
            self.params, OptimizerSettings(learning_rate=learning_rate)
        )

    def gradients(self, ids: torch.Tensor, activations: str, gradients: str) -> float:
        """Forward and backward of one batch through the wire; the loss (gradients left
        in the parameters)."""
        mask = torch.ones_like(ids)
        self.optimizer.zero_grad(set_to_none=True)
        h1 = wire(self.head(ids, mask), activations, gradients)
        h2 = wire(self.body(h1, mask), activations, gradients)
        loss = causal_lm_loss(self.tail(h2, mask), ids)
        loss.backward()
        return float(loss.detach())

    def step(self, ids: torch.Tensor, activations: str, gradients: str) -> float:
        loss = self.gradients(ids, activations, gradients)
        scale_grads(self.params, clip_factor(grad_sq_norm(self.params), MAX_NORM))
        self.optimizer.step()
        self.scheduler.step()
        return loss

    def flat_grad(self) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.params if p.grad is not None])


def batches(steps: int, batch: int, tokens: int, active: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches of ``batch`` rows of ``tokens`` from a fixed Markov chain over the
    ``active`` ids 3 .. active + 2: the next id follows the current one by a fixed random
    permutation with probability 3/4, else it is uniform."""
    gen = torch.Generator().manual_seed(seed)
    successor = torch.randperm(active, generator=gen)
    out = []
    for _ in range(steps):
        ids = torch.empty(batch, tokens, dtype=torch.long)
        ids[:, 0] = torch.randint(0, active, (batch,), generator=gen)
        for t in range(1, tokens):
            follow = torch.rand(batch, generator=gen) < 0.75
            uniform = torch.randint(0, active, (batch,), generator=gen)
            ids[:, t] = torch.where(follow, successor[ids[:, t - 1]], uniform)
        out.append(ids + 3)
    return out


def save_model(path: Path, config: Any) -> None:
    """The random model (seed 0) with its lm head scaled by :data:`HEAD_SCALE`: a frozen
    random head at the usual init (std 0.02) cannot tell one token from the others by more
    than a nat or two whatever the hidden state, so the adapters would have nothing to
    learn; a pretrained head can, and so can this one."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    model.save_pretrained(path)


def label(activations: str, gradients: str) -> str:
    """``raw``, ``bf16``, ``int8`` (both kinds alike), else ``act-int8+grad-bf16``."""
    if activations == gradients:
        return activations
    return f"act-{activations}+grad-{gradients}"


def run(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    configs = [tuple(c.split("/")) for c in args.encodings.split(",")]
    for config in configs:
        if len(config) != 2:
            raise SystemExit(f"--encodings: {'/'.join(config)!r} is not activations/gradients")
        for name in config:
            get_encoding(name)
    data = batches(args.steps, args.batch, args.tokens, args.active, args.seed)
    # The adapter gradient at the first step under each encoding (same weights, batch).
    first: dict[str, torch.Tensor] = {}
    curves: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for activations, gradients in configs:
        name = label(activations, gradients)
        torch.manual_seed(args.seed)
        split = Split(path, args.learning_rate)
        split.gradients(data[0], activations, gradients)
        first[name] = split.flat_grad()
        started = time.perf_counter()
        curves[name] = [split.step(ids, activations, gradients) for ids in data]
        seconds[name] = time.perf_counter() - started
        print(
            f"{name:18} loss {curves[name][0]:.4f} -> {curves[name][-1]:.4f} "
            f"({seconds[name]:.1f} s)",
            flush=True,
        )
    reference = "raw"
    if reference not in curves:
        raise SystemExit("--encodings must include raw/raw, the reference")
    tail = max(1, args.steps // 10)
    raw_curve, raw_grad = curves[reference], first[reference]
    rows: dict[str, dict[str, float]] = {}
    for name, curve in curves.items():
        rows[name] = {
            "final_loss": sum(curve[-tail:]) / tail,
            "mean_abs_diff": sum(abs(a - b) for a, b in zip(curve, raw_curve, strict=True))
            / len(curve),
            "grad_rel_error": float((first[name] - raw_grad).norm() / raw_grad.norm()),
            "seconds": seconds[name],
        }
    print(f"\n{'encoding':18} {'final loss':>10} {'mean |diff|':>12} {'grad rel err':>13}")
    for name, row in rows.items():
        print(
            f"{name:18} {row['final_loss']:>10.4f} {row['mean_abs_diff']:>12.5f} "
            f"{row['grad_rel_error']:>13.2e}"
        )
    print()
    return {"rows": rows, "curves": curves}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--active", type=int, default=64, help="token ids the data uses")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--encodings", default=DEFAULT_ENCODINGS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if (
        args.steps < 2
        or args.tokens < 17
        or args.layers < 3
        or not 2 <= args.active < args.vocab - 3
    ):
        parser.error("--steps >= 2, --tokens >= 17, --layers >= 3, 2 <= --active < --vocab - 3")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    described = machine(threads=threads)
    config = llama_512x8()
    config.vocab_size = args.vocab
    config.num_hidden_layers = args.layers
    with tempfile.TemporaryDirectory(prefix="splitfed-bench-") as tmp:
        save_model(Path(tmp) / "model", config)
        figures = run(args, Path(tmp) / "model")
    rows = figures["rows"]
    raw = rows["raw"]["final_loss"]
    ratios = {
        f"final loss {name}/raw": row["final_loss"] / raw
        for name, row in rows.items()
        if name != "raw"
    }
    settings = {
        k: getattr(args, k)
        for k in ("steps", "batch", "tokens", "vocab", "active", "layers", "learning_rate", "seed")
    }
    assert all(math.isfinite(v) for v in ratios.values())
    report(args.json, "encodings", ratios, machine=described, settings=settings, **figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
