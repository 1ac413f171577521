"""Which library quantizes splitfed's projections: one frozen projection per backend,
forward and backward to the input, against the dense projection in the same dtype.

Backends: torchao's int8 weight-only tensor (``Int8WeightOnlyConfig``: what splitfed's
``quantized_linear`` makes for int8 on a CPU), bitsandbytes' int8 in training mode (on a
CPU: dequantize, then a float matmul) and in eval mode (LLM.int8: the inputs quantized
to int8 too), bitsandbytes NF4 (what splitfed makes for nf4). Shapes: Llama-2-7B's attention
projection (4096 x 4096) and MLP projection (11008 x 4096), for a decode step (1 row)
and a training micro-batch (128 rows), float32 and bfloat16 inputs. Median of
``--rounds`` forward(+backward) calls after one warm-up.

    python bench/quantization_backends.py [--rounds 10] [--json PATH]

Prints ``ratio <backend> <dtype> <rows> rows/dense: <time ratio>`` lines (>1: slower than
the dense projection) and the mean absolute output error against the dense output.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import machine, report
from torch import nn

from splitfed.models.quantization import bitsandbytes, prepare_imports, quantized_linear

SHAPES = {"attention": (4096, 4096), "mlp": (11008, 4096)}


def backends(dense: nn.Linear, dtype: torch.dtype) -> dict[str, Callable[[], nn.Module]]:
    bnb = bitsandbytes()
    weight = dense.weight.detach()

    def bnb_int8(training: bool) -> nn.Module:
        module = bnb.nn.Linear8bitLt(
            weight.shape[1], weight.shape[0], bias=False, has_fp16_weights=False, threshold=0.0
        )
        module.weight = bnb.nn.Int8Params(
            weight.clone(), requires_grad=False, has_fp16_weights=False
        )
        module = module.to("cpu")
        module.train(training)
        return module

    return {
        # What splitfed runs for int8 on a CPU (torchao's int8 weight-only tensor).
        "torchao-int8": lambda: quantized_linear(weight, None, "int8", compute_dtype=dtype),
        # bitsandbytes' CPU int8: training mode dequantizes the weight (weight-only);
        # eval mode is LLM.int8 (the inputs quantized to int8 too).
        "bnb-int8-train": lambda: bnb_int8(True),
        "bnb-int8-eval": lambda: bnb_int8(False),
        # What splitfed runs for nf4 (bitsandbytes).
        "bnb-nf4": lambda: quantized_linear(weight, None, "nf4", compute_dtype=dtype),
    }


def timed(module: nn.Module, x: torch.Tensor, rounds: int) -> float:
    def once() -> None:
        inputs = x.detach().requires_grad_(True)
        module(inputs).float().sum().backward()

    once()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        once()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    prepare_imports()
    torch.manual_seed(0)
    described = machine()
    rows: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    for shape_name, (out_features, in_features) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            dense = nn.Linear(in_features, out_features, bias=False)
            dense.requires_grad_(False)
            dense.to(dtype)
            for tokens in (1, 128):
                x = torch.randn(tokens, in_features, dtype=dtype)
                base = timed(dense, x, args.rounds)
                with torch.no_grad():
                    expected = dense(x).float()
                for name, build in backends(dense, dtype).items():
                    module = build()
                    seconds = timed(module, x, args.rounds)
                    with torch.no_grad():
                        error = float((module(x).float() - expected).abs().mean())
                    dtype_name = str(dtype).removeprefix("torch.")
                    row = {
                        "shape": shape_name,
                        "dtype": dtype_name,
                        "rows": tokens,
                        "backend": name,
                        "seconds": seconds,
                        "dense_seconds": base,
                        "mean_abs_error": error,
                    }
                    rows.append(row)
                    print(
                        f"{shape_name:9} {dtype_name:8} {tokens:3} rows {name:26} "
                        f"{seconds * 1e3:8.2f} ms (dense {base * 1e3:6.2f})  |err| {error:.2e}",
                        flush=True,
                    )
                    if shape_name == "mlp":
                        ratios[f"{name} {dtype_name} {tokens} rows/dense"] = seconds / base
    report(args.json, "quantization_backends", ratios, machine=described, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
