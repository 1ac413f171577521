"""Split training and generation over mTLS against the same work done centrally.

A Llama-layout model (hidden 512, 8 layers, vocab 32000) with LoRA r=16 on q, k, v, o.
The backbone runs in its own process (``splitfed serve backbone``) on loopback with
mutual TLS; this process is the client (head and tail, k = m = 1). Like two machines,
client and backbone each get half of the cores (one each here) and as many torch
threads; the centralized and local baselines run in the client's half.

* training step: forward + backward + AdamW step with global-norm clipping, batch 4 x
  256 tokens; split (head -> RemoteBody over the Train stream -> tail, norms exchanged,
  both sides step) against the unsplit model with the same adapters in this process;
  median of ``--rounds`` steps each, run in four alternating blocks per path; ratio
  split/centralized time (target <= 1.10).
* generation: greedy, 64 new tokens for 4 left-padded prompts of 32 tokens: split
  (SplitGenerator, body over the Generate stream with the backbone's KV cache) against
  ``model.generate`` here; ratio split tokens/s / local tokens/s (target >= 0.85).

    python bench/split_step.py [--rounds 12] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    greedy_generate,
    left_padded_prompts,
    llama_512x8,
    machine,
    report,
    save_random_llama,
    timing_figures,
)
from transformers import LlamaForCausalLM

from splitfed.cli.launcher import ServiceProcess
from splitfed.clients.backbone import (
    BackboneClient,
    GenerateStream,
    RemoteBody,
    RemoteBodyStage,
    TrainStream,
)
from splitfed.clients.pipeline import DEFAULT_WINDOW, pipelined_step
from splitfed.clients.trainer import causal_lm_loss
from splitfed.models.adapters import AdapterSettings
from splitfed.models.generation import SamplingOptions, SplitGenerator
from splitfed.models.loading import load_head, load_tail, load_trainable_ends
from splitfed.models.optim import (
    OptimizerSettings,
    build_optimizer,
    clip_factor,
    grad_sq_norm,
    init_adapter_tensors,
    scale_grads,
)
from splitfed.models.peft_import import inject_adapter_in_model
from splitfed.protocol.backbone import SessionRequest
from splitfed.runtime import tune_allocator
from splitfed.security.ca import CertificateAuthority
from splitfed.tls import TLSConfig
from splitfed.transport import create_channel

SERVER_NAME = "backbone.bench.local"
ADAPTER = AdapterSettings(kind="lora", r=16, alpha=32, seed=7)
OPTIMIZER = OptimizerSettings(learning_rate=1e-4)
MAX_NORM = 1.0


ALL_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def pin(pid: int, *, second_half: bool) -> int:
    """Pin ``pid`` to one half of the cores this benchmark started with; returns how
    many it got (all of them, unpinned, on a single core)."""
    if len(ALL_CORES) < 2:
        return max(1, len(ALL_CORES))
    half = len(ALL_CORES) // 2
    chosen = ALL_CORES[half:] if second_half else ALL_CORES[:half]
    os.sched_setaffinity(pid, chosen)
    return len(chosen)


def client_half(**described: Any) -> tuple[int, dict[str, Any]]:
    """Pin this process (the clients) to the first half of the cores, as many torch
    threads; the threads and the machine's description (with ``described``, the load
    average first)."""
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    threads = pin(os.getpid(), second_half=False)
    torch.set_num_threads(threads)
    return threads, machine(load=load, **described, threads=threads, cores=len(ALL_CORES))


def lora_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Inject ADAPTER's LoRA on q, k, v, o of the frozen ``model`` (initialised as the
    split parts' adapters are); its parameters."""
    model.requires_grad_(False)
    inject_adapter_in_model(
        ADAPTER.lora().peft_config(["q_proj", "k_proj", "v_proj", "o_proj"]), model
    )
    named = {n.replace(".default", ""): p for n, p in model.named_parameters() if ".lora_" in n}
    for parameter in named.values():
        parameter.requires_grad_(True)
    init_adapter_tensors({n: p.data for n, p in named.items()}, ADAPTER.seed)
    return list(named.values())


def centralized(path: Path) -> tuple[Any, list[torch.nn.Parameter], Any, Any]:
    model = LlamaForCausalLM.from_pretrained(str(path), local_files_only=True)
    params = lora_params(model)
    optimizer, scheduler = build_optimizer(params, OPTIMIZER)
    return model.train(), params, optimizer, scheduler


def centralized_step(
    model: Any,
    params: list[Any],
    optimizer: Any,
    scheduler: Any,
    ids: Any,
    mask: Any,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """One unsplit training step with the same clipping and AdamW; its seconds on
    ``clock`` (bench/gpu_scale.py passes one that synchronizes the GPU)."""
    start = clock()
    optimizer.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    causal_lm_loss(logits, ids).backward()
    scale_grads(params, clip_factor(grad_sq_norm(params), MAX_NORM))
    optimizer.step()
    scheduler.step()
    return clock() - start


@dataclass(frozen=True)
class Rows:
    """A micro-batch of a pipelined step: some rows of the batch (labels: the ids)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class SplitClient:
    def __init__(
        self, path: Path, client: BackboneClient, adapter: AdapterSettings = ADAPTER
    ) -> None:
        self.head, self.tail, self.params = load_trainable_ends(path, adapter)
        self.optimizer, self.scheduler = build_optimizer(self.params, OPTIMIZER)
        self.open(client, adapter)

    def open(self, client: BackboneClient, adapter: AdapterSettings) -> None:
        """The session, its Train stream and the body over it (``self.body``: what the
        head's output goes through, the remote body itself here)."""
        self.client = client
        request = SessionRequest(k=1, m=1, adapter=adapter)
        self.session = client.open_session(request).session_id
        self.stream = TrainStream(client, self.session, "raw")
        self.remote = RemoteBody(self.stream).train()
        self.body: torch.nn.Module = self.remote
        self.step_number = 0

    def step(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        *,
        pipelined: bool = False,
        micro_batches: int | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> float:
        """One split training step (forward, backward, the norm exchange, AdamW on both
        sides); its seconds. The batch goes as ``micro_batches`` micro-batches of its rows
        (default: one pass, or four ``pipelined``): one after another through the remote
        body, or ``pipelined`` with up to ``window`` in flight (clients/pipeline.py: the
        SDK's pipelined step)."""
        start = time.perf_counter()
        self.step_number += 1
        self.optimizer.zero_grad(set_to_none=True)
        count = micro_batches or (4 if pipelined else 1)
        batches = [
            Rows(rows, rows_mask)
            for rows, rows_mask in zip(ids.chunk(count), mask.chunk(count), strict=True)
        ]
        if pipelined:
            pipelined_step(
                self.stream,
                self.step_number,
                batches,
                head=self.head,
                tail=self.tail,
                loss=lambda logits, rows: causal_lm_loss(logits, rows.input_ids),
                window=window,
            )
        else:
            self.remote.begin_step(self.step_number)
            for rows in batches:
                hidden = self.body(
                    self.head(rows.input_ids, rows.attention_mask), rows.attention_mask
                )
                logits = self.tail(hidden, rows.attention_mask)
                (causal_lm_loss(logits, rows.input_ids) / len(batches)).backward()
        client_sq = grad_sq_norm(self.params)
        result = self.stream.step(self.step_number, client_sq, MAX_NORM)
        scale_grads(self.params, clip_factor(client_sq + result.backbone_grad_sq_norm, MAX_NORM))
        self.optimizer.step()
        self.scheduler.step()
        return time.perf_counter() - start

    def close(self) -> None:
        self.stream.close()
        self.client.close_session(self.session)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.new_tokens < 1:
        parser.error("--rounds must be >= 2 and --new-tokens >= 1")
    # Client and backbone as two machines: each half of the cores (one each on a 2-core
    # host) and as many torch threads; the centralized and local baselines get the
    # client's half.
    threads = pin(os.getpid(), second_half=False)
    torch.set_num_threads(threads)
    described = machine(threads=threads)
    tune_allocator()
    with tempfile.TemporaryDirectory(prefix="splitfed-bench-") as tmp:
        root = Path(tmp)
        save_random_llama(root / "model", llama_512x8())
        ca = CertificateAuthority.create("bench CA")
        ca.issue("backbone-0", "backbone", dns_names=[SERVER_NAME]).write(root / "tls")
        me = ca.issue("bench", "client")
        assert me.key_pem is not None
        (root / "backbone.yaml").write_text(
            f"backbone:\n  model_path: {json.dumps(str(root / 'model'))}\n"
            f"server:\n  tls_dir: {json.dumps(str(root / 'tls'))}\n"
        )
        server = ServiceProcess(
            "backbone", ["serve", "backbone", "--config", str(root / "backbone.yaml")]
        )
        address = server.start(timeout_s=300)
        try:
            tls = TLSConfig(ca.cert_pem, me.cert_pem, me.key_pem)
            with create_channel(address, tls, server_name=SERVER_NAME) as channel:
                client = BackboneClient(channel)
                figures = run(root / "model", client, args)
        finally:
            server.stop()
    ratios = {
        "split/centralized train step time": figures["train_step_s"]["split"]
        / figures["train_step_s"]["centralized"],
        "split/local generation tokens/s": figures["generation_tokens_per_s"]["split"]
        / figures["generation_tokens_per_s"]["local"],
    }
    train, gen = figures["train_step_s"], figures["generation_tokens_per_s"]
    print(f"\n{'':30} {'centralized/local':>18} {'split':>10}")
    print(f"{'train step (s, median)':30} {train['centralized']:>18.3f} {train['split']:>10.3f}")
    print(f"{'generation (tokens/s)':30} {gen['local']:>18.1f} {gen['split']:>10.1f}\n")
    report(args.json, "split_step", ratios, machine=described, figures=figures)
    return 0


def run(path: Path, client: BackboneClient, args: argparse.Namespace) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (4, 256), generator=gen)
    mask = torch.ones_like(ids)
    model, params, optimizer, scheduler = centralized(path)
    split = SplitClient(path, client)
    central_times: list[float] = []
    split_times: list[float] = []
    centralized_step(model, params, optimizer, scheduler, ids, mask)  # warm-ups
    split.step(ids, mask)
    blocks = 4  # centralized, split, centralized, split, ...: drifts of the machine hit both
    per_block = max(1, args.rounds // blocks)
    for _ in range(blocks):
        central_times += [
            centralized_step(model, params, optimizer, scheduler, ids, mask)
            for _ in range(per_block)
        ]
        split_times += [split.step(ids, mask) for _ in range(per_block)]
    split.stream.close()

    model.eval()
    prompts, prompt_mask = left_padded_prompts(gen)
    session = client.open_session(SessionRequest(k=1, m=1, adapter=ADAPTER)).session_id
    stream = GenerateStream(client, session, "raw")
    head, tail = load_head(path), load_tail(path)
    generator = SplitGenerator(head, RemoteBodyStage(stream), tail)
    options = SamplingOptions(max_new_tokens=args.new_tokens)
    local_model = copy.deepcopy(model)

    def local() -> float:
        start = time.perf_counter()
        greedy_generate(local_model, prompts, prompt_mask, args.new_tokens)
        return time.perf_counter() - start

    def remote() -> float:
        start = time.perf_counter()
        generator.generate(prompts, prompt_mask, options)
        return time.perf_counter() - start

    local()
    remote()
    local_times, remote_times = [], []
    for _ in range(max(3, args.rounds // 3)):
        local_times.append(local())
        remote_times.append(remote())
    stream.close()
    figures = timing_figures(
        {"centralized": central_times, "split": split_times},
        {"local": local_times, "split": remote_times},
        tokens=prompts.shape[0] * args.new_tokens,
    )
    return {
        **figures,
        "raw": {
            "centralized": central_times,
            "split": split_times,
            "local": local_times,
            "remote": remote_times,
        },
    }


if __name__ == "__main__":
    sys.exit(main())
