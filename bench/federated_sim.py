"""In-process simulation of bench/federated.py, for sweeps.

The same task, base model, LoRA, data orders, AdamW, schedule and clipping as
``bench/federated.py`` (imported from it), run in one process without services: the
head, body and tail modules are called directly and the clients' rounds are a loop, with
the aggregator's strategies (``make_strategy``) and FedExP's step size computed the way
the aggregator computes them. It is not a benchmark of splitfed (no gRPC, no TLS, no
processes); it takes about two thirds of the real run's time and holds one core, so two
sweeps run side by side on a 2-core machine, which is what makes sweeps over learning
rates, rounds and data orders affordable. Its results are not identical to the real
run's (another process layout, other float rounding), but within the run-to-run spread
(docs/benchmarks.md).

One run per call; its final and best eval loss are printed and, with ``--json PATH``,
appended to PATH as one JSON line (with the curve and the arguments).

    python bench/federated_sim.py --mode central --rounds 240 --lr 5e-3 --order 1
    python bench/federated_sim.py --mode fed --rounds 240 --lr 2e-2 --strategy fedavg
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from splitfed.clients.data import Example, MicroBatches
from splitfed.clients.trainer import causal_lm_loss
from splitfed.models.adapters import adapter_state, load_adapter_state
from splitfed.models.loading import load_body, load_head, load_tail
from splitfed.models.optim import OptimizerSettings, build_optimizer
from splitfed.models.tiny import make_tiny_checkpoint
from splitfed.services.aggregator.strategies import FedExP, make_strategy

_spec = importlib.util.spec_from_file_location(
    "splitfed_bench_federated", Path(__file__).with_name("federated.py")
)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)

Tensors = dict[str, torch.Tensor]


def base_model(workdir: Path, pretrain_steps: int, sizes: list[int], dominant: float) -> Any:
    """The bench's task and pretrained tiny model (cached in ``workdir``)."""
    task = bench.make_task(sizes, dominant, 256, 0)
    path = workdir / f"model-{pretrain_steps}-{'_'.join(map(str, sizes))}-{dominant}"
    if not (path / "config.json").is_file():
        rows = [f"{r['prompt']}\n{r['response']}" for rs in (*task.clients, task.eval) for r in rs]
        pretrain = bench.pretrain_texts(0)
        make_tiny_checkpoint(
            path,
            rows + pretrain,
            layers=6,
            hidden_size=64,
            seed=0,
            pretrain_texts=pretrain,
            pretrain_steps=pretrain_steps,
        )
    return task, path


class Model:
    """Head, frozen body and tail with the bench's LoRA; the body's LoRA is applied (and
    its gradients count in the clipping norm, as on the backbone) but never stepped."""

    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.head = load_head(path, bench.K, bench.M)
        self.body = load_body(path, bench.K, bench.M)
        self.tail = load_tail(path, bench.K, bench.M)
        for p in self.body.parameters():
            p.requires_grad_(False)
        bench.ADAPTER.apply(self.body)
        self.body_params = [p for p in self.body.parameters() if p.requires_grad]
        for part in (self.head, self.tail):
            bench.ADAPTER.apply(part)
            part.train()
        self.body.train()
        self.params = [
            p for part in (self.head, self.tail) for p in part.parameters() if p.requires_grad
        ]

    def state(self) -> Tensors:
        both = {**adapter_state(self.head), **adapter_state(self.tail)}
        return {k: v.detach().clone() for k, v in both.items()}

    def load(self, state: Tensors) -> None:
        for part in (self.head, self.tail):
            load_adapter_state(part, state)

    def loss(self, batch: Any) -> torch.Tensor:
        h = self.head(batch.input_ids, batch.attention_mask)
        h = self.body(h, batch.attention_mask)
        return causal_lm_loss(self.tail(h, batch.attention_mask), batch.labels)

    @torch.no_grad()
    def evaluate(self, data: MicroBatches) -> float:
        for part in (self.head, self.tail, self.body):
            part.eval()
        losses = [float(self.loss(data.batch(i))) for i in range(data.per_epoch)]
        for part in (self.head, self.tail, self.body):
            part.train()
        return sum(losses) / len(losses)

    def step(self, optimizer: Any, scheduler: Any, batch: Any, clip: float) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params + self.body_params, clip)
        for p in self.body_params:
            p.grad = None
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return float(loss)


def make_optimizer(params: list[torch.nn.Parameter], args: argparse.Namespace, steps: int) -> Any:
    """(optimizer, scheduler): AdamW as the trainers build it, or plain SGD."""
    if args.schedule == "constant":
        settings = OptimizerSettings(learning_rate=args.lr)
    else:
        settings = OptimizerSettings(
            learning_rate=args.lr, schedule=args.schedule, total_steps=max(steps, 1)
        )
    if args.client_optimizer == "adamw":
        return build_optimizer(params, settings)
    optimizer = torch.optim.SGD(params, lr=args.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, settings.factor)


def examples(rows: list[dict[str, str]]) -> list[Example]:
    return [Example(r["prompt"], r["response"]) for r in rows]


def centralized(model: Model, task: Any, args: argparse.Namespace, curve: list[Any]) -> None:
    union = [r for rows in task.clients for r in rows]
    data = MicroBatches(
        examples(union),
        model.tokenizer,
        batch_size=args.batch,
        max_length=bench.MAX_LENGTH,
        seed=bench.order_seed(args.order, 0),
    )
    steps = bench.CLIENTS * args.local_steps * args.rounds
    optimizer, scheduler = make_optimizer(model.params, args, steps)
    every = max(1, steps // args.evals)
    for step in range(1, steps + 1):
        model.step(optimizer, scheduler, data.for_step(step)[0], args.clip)
        if step % every == 0 or step == steps:
            curve.append((step, model.evaluate(args.eval_data)))
            print(f"centralized step {step}: {curve[-1][1]:.4f}", flush=True)


def federated(model: Model, task: Any, args: argparse.Namespace, curve: list[Any]) -> Tensors:
    datas = [
        MicroBatches(
            examples(rows),
            model.tokenizer,
            batch_size=bench.BATCH,
            max_length=bench.MAX_LENGTH,
            seed=bench.order_seed(args.order, index),
        )
        for index, rows in enumerate(task.clients)
    ]
    samples = [len(rows) for rows in task.clients]
    total = sum(samples)
    client_steps = args.rounds * args.local_steps
    if args.shared_optimizer:  # a diagnostic, not a federated algorithm
        shared = make_optimizer(model.params, args, bench.CLIENTS * client_steps)
        optimizers = [shared] * len(datas)
    else:
        optimizers = [make_optimizer(model.params, args, client_steps) for _ in datas]
    options = json.loads(args.strategy_options)
    strategy = make_strategy(args.strategy, options)
    initial = model.state()
    offset: Tensors = {}
    state: Tensors = {}
    current = initial
    done = [0] * len(datas)
    every = max(1, args.rounds // args.evals)
    scales: list[float] = []
    for round_ in range(1, args.rounds + 1):
        deltas = []
        for index, data in enumerate(datas):
            model.load(current)
            optimizer, scheduler = optimizers[index]
            if args.reset_optimizer:
                optimizer.state.clear()
            for _ in range(args.local_steps):
                done[index] += 1
                model.step(optimizer, scheduler, data.for_step(done[index])[0], args.clip)
            trained = model.state()
            deltas.append({n: trained[n] - current[n] for n in current})
        average = {
            n: sum(d[n] * (w / total) for d, w in zip(deltas, samples, strict=True))
            for n in current
        }
        if isinstance(strategy, FedExP):  # as the aggregator computes it
            update_sq = sum(
                w / total * sum(float((t**2).sum()) for t in d.values())
                for d, w in zip(deltas, samples, strict=True)
            )
            average_sq = sum(float((t**2).sum()) for t in average.values())
            scales.append(strategy.scale(update_sq, average_sq))
            state["scale"] = torch.tensor([scales[-1]], dtype=torch.float64)
        if args.server_cosine and "server_lr" in options:
            factor = 0.5 * (1 + math.cos(math.pi * (round_ - 1) / args.rounds))
            strategy = make_strategy(
                args.strategy, {**options, "server_lr": options["server_lr"] * factor}
            )
        offset = strategy.step(offset, average, state)
        current = {n: initial[n] + offset[n] for n in initial}
        if round_ % every == 0 or round_ == args.rounds:
            model.load(current)
            curve.append(
                (round_ * bench.CLIENTS * args.local_steps, model.evaluate(args.eval_data))
            )
            scale = f", step scale {sum(scales[-every:]) / every:.2f}" if scales else ""
            print(f"federated round {round_}: {curve[-1][1]:.4f}{scale}", flush=True)
    return current


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", choices=["central", "fed"], default="fed")
    parser.add_argument("--rounds", type=int, default=240, help="central: rounds' worth")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-2, help="peak rate (clients in fed)")
    parser.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="cosine")
    parser.add_argument("--client-optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--strategy-options", default="{}", help="JSON, e.g. '{\"momentum\": 0.5}'")
    parser.add_argument("--server-cosine", action="store_true", help="cosine-decay server_lr")
    parser.add_argument("--reset-optimizer", action="store_true", help="clear moments per round")
    parser.add_argument("--shared-optimizer", action="store_true", help="one AdamW state")
    parser.add_argument("--clip", type=float, default=bench.MAX_GRAD_NORM)
    parser.add_argument("--batch", type=int, default=bench.BATCH, help="centralized batch")
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--sizes", default="256,96,160,128")
    parser.add_argument("--dominant", type=float, default=0.8)
    parser.add_argument("--order", type=int, default=0, help="data order, as the bench's")
    parser.add_argument("--evals", type=int, default=12)
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "splitfed-fedsim"
    )
    parser.add_argument("--json", type=Path, help="append the result to this JSON-lines file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = [int(size) for size in args.sizes.split(",")]
    task, path = base_model(args.workdir, args.pretrain_steps, sizes, args.dominant)
    model = Model(path)
    args.eval_data = MicroBatches(
        examples(task.eval),
        model.tokenizer,
        batch_size=bench.EVAL_BATCH,
        max_length=bench.MAX_LENGTH,
        shuffle=False,
    )
    started = time.monotonic()
    curve = [(0, model.evaluate(args.eval_data))]
    if args.mode == "central":
        centralized(model, task, args, curve)
    else:
        federated(model, task, args, curve)
    final, best = curve[-1][1], min(loss for _, loss in curve)
    seconds = time.monotonic() - started
    print(f"{args.tag or args.mode}: final eval loss {final:.4f}, best {best:.4f}, {seconds:.0f} s")
    if args.json is not None:
        setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        del setup["eval_data"]
        with args.json.open("a") as out:
            record = {"args": setup, "curve": curve, "final": final, "best": best}
            out.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
