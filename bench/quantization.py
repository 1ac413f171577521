"""Quantized bodies (int8, NF4 through bitsandbytes) against full precision: memory,
fidelity and speed, every figure against a baseline measured in the same run.

* memory: a body of a Llama-2-7B-shaped model (hidden 4096, intermediate 11008, 32 heads,
  vocab 32000, random bf16 weights) split 2 head + ``--body-layers`` (4) body + 1 tail
  layers. The checkpoint is written one tensor at a time (a shard per layer, an index:
  the full model never exists in memory). Each mode loads the body in a fresh process
  with ``load_part(path, "body", 2, 1, dtype=..., quantization=...)``: ``fp32`` and
  ``bf16`` unquantized, ``int8`` and ``nf4`` computing in bf16. Then one forward pass of
  8 tokens (a bf16 body stays backed by the checkpoint's pages until it is used) and
  ``malloc_trim`` (what glibc keeps of freed temporaries is not the body's); the body of
  a small model is loaded and used first in the same mode, so that library code pages
  touched by a first load and forward are not counted. Reported
  per mode: growth of resident memory (VmRSS; anonymous and file-backed apart), peak
  growth (VmHWM, reset before the load where the kernel allows), and
  ``weight_bytes(body)``. With ``--device cuda``: ``torch.cuda.max_memory_allocated``
  growth instead of VmRSS. Ratio lines: ``body memory <mode>/bf16`` (targets int8 <=
  0.55, nf4 <= 0.35).
* fidelity: a tiny Llama-layout model (``--fid-hidden`` 128, ``--fid-layers`` 6; nf4
  needs hidden sizes that are multiples of 64) pretrained on plain sentences
  (bench/federated.py's ``pretrain_texts``), split k = m = 1 with the body in each
  mode (head and tail unquantized, as a client with a quantized backbone). Logits on the
  held-out examples of bench/federated.py's task against the unquantized body: max and
  mean absolute error, mean KL(none || mode), top-1 agreement. Then the same LoRA
  fine-tuning (r 8 on the seven projections of head, body and tail, AdamW with a cosine
  schedule to zero, global-norm clipping 1.0; same seeds, data and steps) per mode,
  locally in this process, ``--seeds`` (5) runs each (data order and adapter init), and
  the mean held-out eval loss: ``eval loss <mode>/none`` (targets int8 within 2 %, nf4 within
  5 %). Each quantized run's adapters are then merged into the unquantized checkpoint
  the way ``splitfed adapters export --format peft --merged`` does (write_peft,
  merge_into_checkpoint) and the merged plain model evaluated on the same examples:
  ``eval loss merged <mode>/<mode>`` (what merging into full precision shifts).
* speed: a random Llama-layout model (hidden 512, 6 layers of 8 heads, intermediate 1408:
  a multiple of 64 for nf4; vocab 4096), head, body and tail in this process (no
  backbone service: the body is what differs). A split training step (LoRA r 16 on q,
  k, v, o; batch 4 x 128; forward, backward, clipping, AdamW), median of ``--rounds``
  run in alternating blocks over the modes; greedy generation of ``--new-tokens`` for 4
  left-padded prompts through ``SplitGenerator`` with a local body. ``fp32`` is the
  baseline (the quantized bodies compute in fp32 too): ``step time <mode>/fp32`` and
  ``generation tokens/s <mode>/fp32``. On a CPU int8 and nf4 dequantize each weight per
  matmul: slower than fp32 is expected.

``--tiny``: small shapes for every part (a smoke test, not a figure); ``--quick``: few
steps and tokens.

    python bench/quantization.py [--parts memory,fidelity,speed] [--body-layers 4]
        [--steps 200] [--rounds 6] [--device cpu] [--tiny] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from common import machine, report, save_random_llama
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from splitfed.clients.data import Example, MicroBatches, collate, encode, left_padded
from splitfed.clients.trainer import causal_lm_loss
from splitfed.models.adapters import AdapterSettings, adapter_state
from splitfed.models.export import merge_into_checkpoint, write_peft
from splitfed.models.generation import LocalStage, SamplingOptions, SplitGenerator
from splitfed.models.loading import load_body, load_config, load_part, load_trainable_ends
from splitfed.models.masks import positions_from_mask
from splitfed.models.optim import (
    OptimizerSettings,
    build_optimizer,
    clip_factor,
    grad_sq_norm,
    scale_grads,
)
from splitfed.models.quantization import prepare_imports, weight_bytes
from splitfed.models.tiny import llama_config, make_tiny_checkpoint

QUANTIZED = ("int8", "nf4")
# Memory modes: (dtype the body is loaded in, quantization).
MEMORY_MODES = {
    "fp32": (torch.float32, "none"),
    "bf16": (torch.bfloat16, "none"),
    "int8": (torch.bfloat16, "int8"),
    "nf4": (torch.bfloat16, "nf4"),
}
FIDELITY_ADAPTER = AdapterSettings(
    kind="lora",
    r=8,
    alpha=16,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    seed=7,
)
SPEED_ADAPTER = AdapterSettings(kind="lora", r=16, alpha=32, seed=7)
MAX_NORM = 1.0
STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


# --- memory -------------------------------------------------------------------------------


def llama7b_config(body_layers: int, *, tiny: bool) -> tuple[LlamaConfig, int, int]:
    """The memory part's model: Llama-2-7B's shape (tiny: hidden 256) with 2 head and 1
    tail layers around ``body_layers``; (config, k, m)."""
    k, m = (1, 1) if tiny else (2, 1)
    if tiny:
        config = llama_config(1000, 256, k + body_layers + m, intermediate_size=704, heads=4)
    else:
        config = llama_config(
            32000, 4096, k + body_layers + m, intermediate_size=11008, heads=32, kv_heads=32
        )
    config.dtype = torch.bfloat16
    config.tie_word_embeddings = False
    return config, k, m


def write_bf16_checkpoint(path: Path, config: LlamaConfig, seed: int = 0) -> None:
    """A random bf16 checkpoint of ``config`` (normal, std 0.02; norms 1), written a
    layer at a time: one safetensors shard per layer (the embeddings and the final norm
    and LM head in their own) and the index. The model is built on the meta device for
    its tensor names and shapes only."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in LlamaForCausalLM(config).state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        group = f"layer-{int(parts[2]):03d}" if parts[1:2] == ["layers"] else "ends"
        groups.setdefault(group, []).append(name)
    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    for number, (_, names) in enumerate(sorted(groups.items())):
        file = f"model-{number + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            tensor = torch.empty(shapes[name], dtype=torch.bfloat16)
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, 0.02, generator=gen)
            tensors[name] = tensor
            total += tensor.numel() * tensor.element_size()
            weight_map[name] = file
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(path)


def _proc_status() -> dict[str, int]:
    """This process's VmRSS, VmHWM, RssAnon and RssFile, in bytes."""
    values: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in STATUS_FIELDS:
                values[key] = int(rest.split()[0]) * 1024
    return values


def _trim() -> None:
    """Give glibc's freed memory back to the kernel (nothing elsewhere)."""
    name = ctypes.util.find_library("c")
    if name is not None and "libc" in name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def _reset_peak() -> bool:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0); whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def _load_and_use(path: Path, mode: str, k: int, m: int, device: str) -> Any:
    dtype, quantization = MEMORY_MODES[mode]
    hidden = int(load_config(path).hidden_size)
    x = torch.randn(1, 8, hidden, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    mask = torch.ones(1, 8, dtype=torch.long, device=device)
    body = load_part(path, "body", k, m, dtype=dtype, device=device, quantization=quantization)
    with torch.no_grad():
        body(x, mask)
    return body


def memory_child(path: Path, warm: Path, mode: str, k: int, m: int, device: str) -> dict[str, Any]:
    """In a fresh process: load the body of ``path`` in ``mode``, use it once, and
    measure what it holds. The body of the small model at ``warm`` is loaded and used
    first, so that the code pages and lazy state of the libraries a first load and
    forward touch (torch's and bitsandbytes' kernels) are not counted as the body's."""
    prepare_imports()  # bitsandbytes' import is not the body's memory
    _load_and_use(warm, mode, 1, 1, device)  # the warm-up; its body is dropped
    dtype, quantization = MEMORY_MODES[mode]
    hidden = int(load_config(path).hidden_size)
    x = torch.randn(1, 8, hidden, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    mask = torch.ones(1, 8, dtype=torch.long, device=device)
    cuda = device.startswith("cuda")
    _trim()
    peak_reset = _reset_peak()
    before = _proc_status()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    body = load_part(path, "body", k, m, dtype=dtype, device=device, quantization=quantization)
    load_s = time.perf_counter() - started
    _trim()
    loaded = _proc_status()
    with torch.no_grad():
        body(x, mask)
    _trim()
    used = _proc_status()
    row: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": quantization,
        "load_s": load_s,
        "rss_growth": used["VmRSS"] - before["VmRSS"],
        "anon_growth": used["RssAnon"] - before["RssAnon"],
        "file_growth": used["RssFile"] - before["RssFile"],
        "rss_growth_after_load": loaded["VmRSS"] - before["VmRSS"],
        "peak_growth": used["VmHWM"] - before["VmRSS"],
        # The peak while loading alone (the forward's dequantized weights excluded).
        "load_peak_growth": loaded["VmHWM"] - before["VmRSS"],
        "peak_reset": peak_reset,
        "weight_bytes": weight_bytes(body),
    }
    if cuda:
        torch.cuda.synchronize()
        row["cuda_growth"] = torch.cuda.memory_allocated() - cuda_before
        row["cuda_peak_growth"] = torch.cuda.max_memory_allocated() - cuda_before
    return row


def measure_memory(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    config, k, m = llama7b_config(args.body_layers, tiny=args.tiny)
    path, warm = root / "llama7b-shape", root / "warm-up"
    started = time.perf_counter()
    write_bf16_checkpoint(path, config)
    write_bf16_checkpoint(warm, llama7b_config(1, tiny=True)[0])
    print(f"memory: wrote the bf16 checkpoint ({time.perf_counter() - started:.0f} s)", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for mode in MEMORY_MODES:
        command = [sys.executable, __file__, "--memory-child", mode, "--model", str(path)]
        command += ["--warm", str(warm)]
        command += ["--k", str(k), "--m", str(m), "--device", args.device]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"memory child ({mode}) failed:\n{result.stderr[-3000:]}")
        rows[mode] = json.loads(result.stdout.strip().splitlines()[-1])
        row = rows[mode]
        print(
            f"memory {mode:5} rss +{row['rss_growth'] / 2**20:8.1f} MiB "
            f"(anon {row['anon_growth'] / 2**20:.1f}, file {row['file_growth'] / 2**20:.1f}) "
            f"peak +{row['peak_growth'] / 2**20:8.1f} MiB "
            f"(load +{row['load_peak_growth'] / 2**20:.1f})  "
            f"weights {row['weight_bytes'] / 2**20:8.1f} MiB  load {row['load_s']:.1f} s",
            flush=True,
        )
    shutil_rmtree(path)
    shutil_rmtree(warm)
    headline = "cuda_peak_growth" if args.device.startswith("cuda") else "rss_growth"
    return {
        "model": {
            "hidden": config.hidden_size,
            "intermediate": config.intermediate_size,
            "layers": config.num_hidden_layers,
            "k": k,
            "m": m,
            "body_layers": args.body_layers,
        },
        "headline": headline,
        "modes": rows,
    }


def shutil_rmtree(path: Path) -> None:
    """Free the disk early (the checkpoint is GBs)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# --- fidelity ----------------------------------------------------------------------------


def federated_bench() -> ModuleType:
    """bench/federated.py, for its task and pretraining sentences."""
    spec = importlib.util.spec_from_file_location(
        "splitfed_bench_federated", Path(__file__).with_name("federated.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Split:
    """Head and tail (unquantized, with ``adapter``) and the body in ``quantization`` with
    its own adapter, as the backbone gives a session; one AdamW over all adapters,
    clipped by the global norm."""

    def __init__(
        self,
        path: Path,
        quantization: str,
        adapter: AdapterSettings,
        learning_rate: float,
        device: str,
        steps: int = 0,
    ) -> None:
        """``steps``: a cosine schedule to zero over that many steps (0: constant)."""
        self.head, self.tail, params = load_trainable_ends(path, adapter)
        self.head.to(device)
        self.tail.to(device)
        self.body = load_body(path, device=device, quantization=quantization)
        adapter.apply(self.body)
        self.body.to(device)
        self.body.train()
        self.params = params + [p for p in self.body.parameters() if p.requires_grad]
        schedule = {"schedule": "cosine", "total_steps": steps} if steps else {}
        self.optimizer, self.scheduler = build_optimizer(
            self.params, OptimizerSettings(learning_rate=learning_rate, **schedule)
        )

    def parts(self) -> tuple[torch.nn.Module, ...]:
        return (self.head, self.body, self.tail)

    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.tail(self.body(self.head(ids, mask), mask), mask)
        return logits

    def step(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = causal_lm_loss(self.logits(ids, mask), labels)
        loss.backward()
        scale_grads(self.params, clip_factor(grad_sq_norm(self.params), MAX_NORM))
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    def eval_loss(self, batches: list[Any]) -> float:
        """Mean cross-entropy per labelled token over ``batches``."""
        for part in self.parts():
            part.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                labelled = int((batch.labels[:, 1:] != -100).sum())
                loss = causal_lm_loss(
                    self.logits(batch.input_ids, batch.attention_mask), batch.labels
                )
                total += float(loss) * labelled
                count += labelled
        for part in self.parts():
            part.train()
        return total / count


def logit_errors(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Errors of ``other`` against ``reference`` (``[positions, vocab]``)."""
    diff = (other - reference).abs()
    ref_log = torch.log_softmax(reference.double(), dim=-1)
    other_log = torch.log_softmax(other.double(), dim=-1)
    kl = (ref_log.exp() * (ref_log - other_log)).sum(-1)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "mean_kl": float(kl.mean()),
        "top1_agreement": float((reference.argmax(-1) == other.argmax(-1)).double().mean()),
        "reference_mean_abs": float(reference.abs().mean()),
    }


def merged_eval_loss(
    split: Split, path: Path, adapter: AdapterSettings, root: Path, batches: list[Any]
) -> float:
    """The held-out loss of ``split``'s adapters (head, body, tail) merged into the
    unquantized checkpoint at ``path`` through the export path of ``splitfed adapters
    export --merged`` (write_peft, merge_into_checkpoint), run as one plain model."""
    tensors = {
        name: tensor.detach().cpu()
        for part in split.parts()
        for name, tensor in adapter_state(part).items()  # type: ignore[arg-type]
    }
    write_peft(root / "adapter", tensors, adapter, path)
    merge_into_checkpoint(path, root / "adapter", root / "model")
    model = LlamaForCausalLM.from_pretrained(str(root / "model"), local_files_only=True)
    model = model.to(batches[0].input_ids.device).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            labelled = int((batch.labels[:, 1:] != -100).sum())
            positions = positions_from_mask(batch.attention_mask, batch.input_ids.shape[1])
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=positions,
            ).logits
            total += float(causal_lm_loss(logits, batch.labels)) * labelled
            count += labelled
    return total / count


def measure_fidelity(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    fed = federated_bench()
    per_kind = max(1, args.train_examples // 4)
    task = fed.make_task([per_kind] * 4, 0.25, args.eval_examples, args.seed)
    train = [Example(r["prompt"], r["response"]) for rows in task.clients for r in rows]
    held_out = [Example(r["prompt"], r["response"]) for r in task.eval]
    every_text = [f"{e.prompt}\n{e.response}" for e in (*train, *held_out)]
    pretrain = fed.pretrain_texts(args.seed)
    started = time.perf_counter()
    path = make_tiny_checkpoint(
        root / "tiny",
        every_text + pretrain,
        layers=args.fid_layers,
        hidden_size=args.fid_hidden,
        seed=args.seed,
        pretrain_texts=pretrain,
        pretrain_steps=args.pretrain_steps,
    )
    print(f"fidelity: pretrained the tiny model ({time.perf_counter() - started:.0f} s)")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    pad = int(tokenizer.pad_token_id)
    encoded = [encode(e, tokenizer, 256) for e in held_out]
    eval_batches = [collate(encoded[i : i + 16], pad) for i in range(0, len(encoded), 16)]
    device = args.device
    moved = [
        type(b)(b.input_ids.to(device), b.attention_mask.to(device), b.labels.to(device))
        for b in eval_batches
    ]
    modes = ("none", *QUANTIZED)
    logits: dict[str, torch.Tensor] = {}
    for mode in modes:
        split = Split(path, mode, FIDELITY_ADAPTER, args.learning_rate, device)
        for part in split.parts():
            part.eval()
        with torch.no_grad():
            logits[mode] = torch.cat(
                [
                    split.logits(b.input_ids, b.attention_mask)[b.attention_mask.bool()].float()
                    for b in moved
                ]
            ).cpu()
        del split
    # One fine-tuning run is a noisy figure (runs that differ only by rounding end a few
    # per cent apart): every mode runs the same seeds (data order, adapter init), and the
    # ratio compares the means.
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    curves: dict[str, list[list[float]]] = {mode: [] for mode in modes}
    for seed in range(args.seed, args.seed + args.seeds):
        adapter = dataclasses.replace(FIDELITY_ADAPTER, seed=FIDELITY_ADAPTER.seed + seed)
        for mode in modes:
            data = MicroBatches(train, tokenizer, batch_size=args.batch, seed=seed)
            torch.manual_seed(seed)
            split = Split(path, mode, adapter, args.learning_rate, device, args.steps)
            before = split.eval_loss(moved)
            started = time.perf_counter()
            curve = []
            for step in range(1, args.steps + 1):
                (batch,) = data.for_step(step)
                curve.append(
                    split.step(
                        batch.input_ids.to(device),
                        batch.attention_mask.to(device),
                        batch.labels.to(device),
                    )
                )
            run: dict[str, Any] = {
                "seed": seed,
                "eval_loss_before": before,
                "eval_loss": split.eval_loss(moved),
                "train_s": time.perf_counter() - started,
            }
            if mode != "none":
                # What `splitfed adapters export --format peft --merged` gives: the
                # adapter folded into the unquantized checkpoint, run as a plain model.
                run["eval_loss_merged"] = merged_eval_loss(
                    split, path, adapter, root / f"merged-{mode}-{seed}", moved
                )
            runs[mode].append(run)
            curves[mode].append(curve)
            merged = run.get("eval_loss_merged")
            print(
                f"fidelity {mode:4} seed {seed} eval loss {before:.4f} -> "
                f"{run['eval_loss']:.4f} ({args.steps} steps, {run['train_s']:.1f} s)"
                + (f"; merged into the unquantized model {merged:.4f}" if merged else ""),
                flush=True,
            )
            del split
    rows: dict[str, dict[str, Any]] = {}
    for mode in modes:
        losses = [run["eval_loss"] for run in runs[mode]]
        rows[mode] = {
            "eval_loss": statistics.mean(losses),
            "eval_loss_min": min(losses),
            "eval_loss_max": max(losses),
            "runs": runs[mode],
        }
        if mode != "none":
            rows[mode]["eval_loss_merged"] = statistics.mean(
                run["eval_loss_merged"] for run in runs[mode]
            )
        print(
            f"fidelity {mode:4} eval loss over {len(losses)} seeds: mean "
            f"{rows[mode]['eval_loss']:.4f} (min {min(losses):.4f}, max {max(losses):.4f})",
            flush=True,
        )
    for mode in QUANTIZED:
        rows[mode]["logits"] = logit_errors(logits["none"], logits[mode])
        errors = rows[mode]["logits"]
        print(
            f"fidelity {mode:4} logits max |err| {errors['max_abs']:.4f} mean |err| "
            f"{errors['mean_abs']:.5f} (|logit| {errors['reference_mean_abs']:.3f}) "
            f"KL {errors['mean_kl']:.2e} top-1 {errors['top1_agreement']:.4f}",
            flush=True,
        )
    return {
        "model": {"hidden": args.fid_hidden, "layers": args.fid_layers, "k": 1, "m": 1},
        "positions": int(logits["none"].shape[0]),
        "modes": rows,
        "curves": curves,
    }


# --- speed -------------------------------------------------------------------------------


def speed_config(tiny: bool) -> LlamaConfig:
    config: LlamaConfig = (
        llama_config(256, 128, 3, intermediate_size=256, heads=4, kv_heads=4)
        if tiny
        else llama_config(4096, 512, 6, intermediate_size=1408, heads=8, kv_heads=8)
    )
    return config


def measure_speed(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    config = speed_config(args.tiny)
    path = root / "speed"
    save_random_llama(path, config)
    device = args.device
    cuda = device.startswith("cuda")

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    gen = torch.Generator().manual_seed(args.seed + 1)
    vocab = int(config.vocab_size)
    ids = torch.randint(3, vocab, (4, args.tokens), generator=gen).to(device)
    mask = torch.ones_like(ids)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (16, 11, 16, 5)]
    prompt_ids, prompt_mask = left_padded(prompts, 0)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    options = SamplingOptions(max_new_tokens=args.new_tokens)
    baseline = "fp32"
    modes = {baseline: "none", "int8": "int8", "nf4": "nf4"}
    splits = {
        name: Split(path, quantization, SPEED_ADAPTER, 1e-4, device)
        for name, quantization in modes.items()
    }

    def step(split: Split) -> float:
        start = clock()
        split.step(ids, mask, ids)
        return clock() - start

    steps: dict[str, list[float]] = {name: [] for name in splits}
    for split in splits.values():
        step(split)  # warm-up
    blocks = 2  # fp32, int8, nf4, fp32, ...: drifts of the machine hit every mode
    for _ in range(blocks):
        for name, split in splits.items():
            steps[name] += [step(split) for _ in range(max(1, args.rounds // blocks))]
    generators: dict[str, Callable[[], float]] = {}
    for name, split in splits.items():
        for part in split.parts():
            part.eval()
        generator = SplitGenerator(split.head, LocalStage(split.body), split.tail)

        def generate(generator: SplitGenerator = generator) -> float:
            start = clock()
            with torch.no_grad():
                generator.generate(prompt_ids, prompt_mask, options)
            return clock() - start

        generators[name] = generate
    generations: dict[str, list[float]] = {name: [] for name in splits}
    for timed in generators.values():
        timed()  # warm-up
    for _ in range(args.generations):
        for name, timed in generators.items():
            generations[name].append(timed())
    tokens = len(prompts) * args.new_tokens
    step_s = {name: statistics.median(times) for name, times in steps.items()}
    tokens_per_s = {name: tokens / statistics.median(t) for name, t in generations.items()}
    for name in splits:
        print(
            f"speed {name:4} step {step_s[name]:.3f} s  generation {tokens_per_s[name]:.1f} "
            "tokens/s",
            flush=True,
        )
    return {
        "baseline": baseline,
        "model": {
            "hidden": config.hidden_size,
            "layers": config.num_hidden_layers,
            "intermediate": config.intermediate_size,
            "vocab": vocab,
            "batch": [4, args.tokens],
            "new_tokens": args.new_tokens,
        },
        "train_step_s": step_s,
        "generation_tokens_per_s": tokens_per_s,
        "raw": {"steps": steps, "generations": generations},
    }


# --- main --------------------------------------------------------------------------------


def ratios_of(figures: dict[str, Any]) -> dict[str, float]:
    ratios: dict[str, float] = {}
    if "memory" in figures:
        memory = figures["memory"]
        rows, key = memory["modes"], memory["headline"]
        for mode in ("fp32", *QUANTIZED):
            ratios[f"body memory {mode}/bf16"] = rows[mode][key] / rows["bf16"][key]
    if "fidelity" in figures:
        rows = figures["fidelity"]["modes"]
        for mode in QUANTIZED:
            ratios[f"eval loss {mode}/none"] = rows[mode]["eval_loss"] / rows["none"]["eval_loss"]
        for mode in QUANTIZED:
            ratios[f"eval loss merged {mode}/{mode}"] = (
                rows[mode]["eval_loss_merged"] / rows[mode]["eval_loss"]
            )
    if "speed" in figures:
        speed = figures["speed"]
        base = speed["baseline"]
        step, tokens = speed["train_step_s"], speed["generation_tokens_per_s"]
        for mode in QUANTIZED:
            ratios[f"step time {mode}/{base}"] = step[mode] / step[base]
        for mode in QUANTIZED:
            ratios[f"generation tokens/s {mode}/{base}"] = tokens[mode] / tokens[base]
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--parts", default="memory,fidelity,speed")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--body-layers", type=int, default=4, help="memory: blocks in the body")
    parser.add_argument("--fid-hidden", type=int, default=128)
    parser.add_argument("--fid-layers", type=int, default=6)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--train-examples", type=int, default=256)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200, help="fidelity: fine-tuning steps")
    parser.add_argument("--seeds", type=int, default=5, help="fidelity: fine-tuning runs per mode")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--rounds", type=int, default=6, help="speed: timed steps per mode")
    parser.add_argument("--tokens", type=int, default=128, help="speed: tokens per row")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--tiny", action="store_true", help="small shapes (a smoke test)")
    parser.add_argument("--quick", action="store_true", help="few steps and tokens")
    parser.add_argument("--json", type=Path)
    # A memory measurement's own process (see measure_memory).
    parser.add_argument("--memory-child", choices=sorted(MEMORY_MODES), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--warm", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--m", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        row = memory_child(args.model, args.warm, args.memory_child, args.k, args.m, args.device)
        print(json.dumps(row))
        return 0
    parts = [p for p in args.parts.split(",") if p]
    if not parts or set(parts) - {"memory", "fidelity", "speed"}:
        parser.error("--parts: a comma-separated subset of memory,fidelity,speed")
    if args.tiny:
        args.body_layers = min(args.body_layers, 2)
        args.fid_hidden, args.fid_layers = 64, 3
        args.pretrain_steps = min(args.pretrain_steps, 20)
        args.train_examples, args.eval_examples = 32, 16
        args.tokens = min(args.tokens, 32)
    if args.quick:
        args.steps, args.seeds = min(args.steps, 4), 1
        args.rounds, args.generations = 2, 1
        args.new_tokens = min(args.new_tokens, 4)
    if min(args.body_layers, args.steps, args.seeds, args.rounds, args.new_tokens) < 1:
        parser.error("--body-layers, --steps, --seeds, --rounds and --new-tokens must be >= 1")
    if args.fid_hidden % 64 or args.fid_layers < 3:
        parser.error("--fid-hidden must be a multiple of 64 (nf4) and --fid-layers >= 3")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    described = machine(threads=threads, device=args.device)
    prepare_imports()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="splitfed-bench-") as tmp:
        root = Path(tmp)
        for part in parts:
            measure = {"memory": measure_memory, "fidelity": measure_fidelity}.get(
                part, measure_speed
            )
            figures[part] = measure(root, args)
    ratios = ratios_of(figures)
    assert all(math.isfinite(v) for v in ratios.values())
    settings = {
        k: getattr(args, k)
        for k in (
            "parts",
            "body_layers",
            "fid_hidden",
            "fid_layers",
            "pretrain_steps",
            "train_examples",
            "eval_examples",
            "steps",
            "batch",
            "learning_rate",
            "rounds",
            "tokens",
            "new_tokens",
            "generations",
            "seed",
            "tiny",
            "quick",
        )
    }
    print()
    report(args.json, "quantization", ratios, machine=described, settings=settings, **figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
