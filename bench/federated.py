"""Federated split training against centralized training on the union of the data.

One script of some 900 lines on purpose: a benchmark is one runnable file whose docstring
is its method; the task, the runs in processes and the report belong together, and what
they share with the other benches is in bench/common.py.

A synthetic task of four kinds of prompt/response examples (the number after n, copying
three words, reversing three words, a country's capital) is dealt to 4 clients non-IID:
client i holds mostly kind i (``--dominant``, default 80 %) and the rest spread evenly
over the other kinds, and the clients hold different amounts (``--sizes``). A held-out
eval set follows the union's mixture; no prompt occurs twice in all the data.

The base model is the tiny Llama-layout model of ``splitfed.models.tiny`` (6 layers, hidden
64), pretrained on plain sentences that use the task's words, numbers and names (never
its prompt formats). Every run fine-tunes the same LoRA adapter (r 8, alpha 16, on all
seven projections of the head's and tail's blocks, k = m = 2) with AdamW, batch 8,
global-norm clipping at 1.0, and a cosine schedule over the run's own steps; each run at
the peak learning rate it does best at (``--learning-rate`` centralized,
``--federated-learning-rate`` on the clients; docs/benchmarks.md has the sweep).

* federated: a backbone process (``splitfed serve backbone``, per-client adapters) and
  an aggregator process (``splitfed serve aggregator``, ``--strategy``: fedavg by
  default, ``--rounds`` rounds of ``--local-steps`` steps, min_clients 4), over mutual
  TLS on loopback; the 4 clients are processes of this script running
  ``FederatedTrainer``. Once the federation has finished, an evaluator joins it
  (members may read it) and downloads the global versions.
* centralized: one ``SplitTrainer`` on the union of the clients' data against the same
  backbone, for as many optimizer steps as all clients together take in the federated
  run (``--central-rounds``, default ``--rounds``: 4 x local steps x 240 = 4800 steps), so
  both see the same number of examples. Split training equals unsplit training
  (tests/integration/test_backbone_training.py), so this is centralized training.

Which examples a run draws when is random, and on this task it moves the final eval loss
by 10-20 % from run to run (a handful of held-out examples carry much of the loss), so
both runs are repeated for ``--orders`` data orders (the trainers' shuffling seeds) and
the headline ratio is of the mean final eval losses.

Both train the same tensors: the body adapter is held frozen on the backbone
(``FROZEN_BODY_LR``), as the aggregator here averages head and tail adapters only. Both
curves are measured by one evaluator (adapters loaded into a ``SplitTrainer``, its
``evaluate()`` over the whole eval set) against the examples processed: a round is
4 x local steps x batch examples, as many as 4 x local steps centralized steps.

    python bench/federated.py [--orders 3] [--rounds 240] [--local-steps 5]
        [--strategy fedavg] [--learning-rate 5e-3] [--federated-learning-rate 2e-2]
        [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from common import machine

from splitfed.cli.launcher import ServiceProcess
from splitfed.clients.backbone import BackboneClient
from splitfed.clients.data import Example, MicroBatches
from splitfed.clients.federated import AggregatorClient, FederatedTrainer
from splitfed.clients.trainer import SplitTrainer, TrainSettings
from splitfed.models.adapters import AdapterSettings
from splitfed.models.optim import OptimizerSettings
from splitfed.models.tiny import BUNDLED_DATASET, make_tiny_checkpoint
from splitfed.protocol.backbone import SessionRequest
from splitfed.security.ca import CertificateAuthority
from splitfed.services.aggregator.strategies import STRATEGIES
from splitfed.tls import TLSConfig
from splitfed.transport import create_channel

BACKBONE_NAME = "backbone.bench.local"
AGGREGATOR_NAME = "aggregator.bench.local"
FEDERATION = "bench"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PLOT = ROOT / "docs" / "federated-vs-centralized.png"

CLIENTS = 4
K = M = 2
ADAPTER = AdapterSettings(
    kind="lora",
    r=8,
    alpha=16,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    seed=7,
)
BATCH = 8
MAX_LENGTH = 32
MAX_GRAD_NORM = 1.0
EVAL_BATCH = 16
# The body adapter's learning rate on the backbone. OpenSession cannot ask for 0 (0 means
# the default), so it is a rate at which AdamW moves no weight by more than ~1e-12 per
# step: the body's LoRA B stays at zero to float precision, so the body is the frozen
# base in every run (checked: the clients' body adapters are exported and reported).
FROZEN_BODY_LR = 1e-12
# The federated run: the aggregator's strategy, rounds and the clients' peak learning
# rate. Averaging 4 clients' AdamW updates moves the global adapter less per example than
# one AdamW run on the union (what the non-IID clients disagree on cancels), so the
# clients do best at 4x the centralized rate (docs/benchmarks.md has the sweep, fedexp's
# extrapolated server step among it).
STRATEGY = "fedavg"
ROUNDS = 240
FEDERATED_LR = 2e-2

# --- the task ----------------------------------------------------------------------------

WORDS = ["red", "blue", "green", "cat", "dog", "fish", "sun", "moon", "tree", "bird", "milk",
         "rain", "star", "boat"]  # fmt: skip
CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin",
    "Japan": "Tokyo", "Egypt": "Cairo", "Peru": "Lima", "Chile": "Santiago",
    "Kenya": "Nairobi", "Norway": "Oslo", "Greece": "Athens", "Cuba": "Havana",
    "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin", "Portugal": "Lisbon",
    "Russia": "Moscow", "China": "Beijing", "India": "Delhi", "Canada": "Ottawa",
    "Mexico": "Mexico City", "Sweden": "Stockholm", "Finland": "Helsinki", "Ghana": "Accra",
    "Turkey": "Ankara", "Hungary": "Budapest", "Thailand": "Bangkok", "Iran": "Tehran",
    "Belgium": "Brussels", "Denmark": "Copenhagen",
}  # fmt: skip
CAPITAL_TEMPLATES = [
    "What is the capital of {}?",
    "Capital of {}?",
    "Name the capital city of {}.",
    "Which city is the capital of {}?",
    "Tell me the capital of {}.",
    "The capital of {} is which city?",
    "What city is the capital of {}?",
    "In which city is the government of {}?",
]
NEXT_TEMPLATES = ["What number comes after {}?", "Count on from {}.", "Which number follows {}?"]
KINDS = ["next", "copy", "reverse", "capital"]


def _all_examples(kind: str) -> list[dict[str, str]]:
    """Every example of one kind (the pools are drawn from without replacement)."""
    if kind == "next":
        return [
            {"prompt": t.format(n), "response": str(n + 1)}
            for n in range(150)
            for t in NEXT_TEMPLATES
        ]
    if kind == "capital":
        return [
            {"prompt": t.format(country), "response": city}
            for country, city in CAPITALS.items()
            for t in CAPITAL_TEMPLATES
        ]
    rows = []
    for a in WORDS:
        for b in WORDS:
            for c in WORDS:
                if len({a, b, c}) < 3:
                    continue
                # The words start a line, as in the response: a byte-level BPE token
                # of a word differs with and without the space in front.
                if kind == "copy":
                    rows.append(
                        {"prompt": f"Copy the words:\n{a} {b} {c}", "response": f"{a} {b} {c}"}
                    )
                else:
                    rows.append(
                        {"prompt": f"Reverse the words:\n{a} {b} {c}", "response": f"{c} {b} {a}"}
                    )
    return rows


@dataclass
class Task:
    clients: list[list[dict[str, str]]]
    eval: list[dict[str, str]]
    mixes: list[dict[str, int]]


def make_task(sizes: list[int], dominant: float, eval_size: int, seed: int) -> Task:
    """Client i holds mostly kind i; the eval set follows the union's mixture."""
    rng = random.Random(seed)
    pools = {kind: _all_examples(kind) for kind in KINDS}
    for pool in pools.values():
        rng.shuffle(pool)
    total = sum(sizes)

    def mix(size: int, main: int) -> dict[str, int]:
        counts = {kind: 0 for kind in KINDS}
        counts[KINDS[main]] = round(size * dominant)
        others = [k for k in KINDS if k != KINDS[main]]
        for index in range(size - counts[KINDS[main]]):
            counts[others[index % len(others)]] += 1
        return counts

    mixes = [mix(size, i) for i, size in enumerate(sizes)]
    clients = []
    for counts in mixes:
        rows = [pools[kind].pop() for kind, n in counts.items() for _ in range(n)]
        rng.shuffle(rows)
        clients.append(rows)
    eval_rows: list[dict[str, str]] = []
    for index, size in enumerate(sizes):  # each client's share of the union, same mixture
        share = round(eval_size * size / total) if index < len(sizes) - 1 else None
        share = eval_size - len(eval_rows) if share is None else share
        counts = mix(share, index)
        eval_rows += [pools[kind].pop() for kind, n in counts.items() for _ in range(n)]
    rng.shuffle(eval_rows)
    return Task(clients, eval_rows, mixes)


def pretrain_texts(seed: int) -> list[str]:
    """Plain sentences with the task's words, numbers and names, never in its formats."""
    rng = random.Random(seed + 1)
    texts = []
    for line in BUNDLED_DATASET.read_text().splitlines():
        row = json.loads(line)
        texts.append(row.get("text") or f"{row['prompt']}\n{row['response']}")
    for _ in range(160):
        a, b = rng.sample(WORDS, 2)
        texts.append(f"The {a} {b} is near the {rng.choice(WORDS)}.")
    for _ in range(160):  # repeating what was said, as any pretrained model can
        words = " ".join(rng.sample(WORDS, 3))
        texts.append(f"I say {words}. You say {words}.\n{words}\n{words}")
    for n in range(150):
        texts.append(f"The number {n} is a number. {n} comes before {n + 1}.")
    for country, city in CAPITALS.items():
        texts.append(f"{country} is a country. {city} is a city.")
    return texts


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- training ----------------------------------------------------------------------------


class FrozenBodyTrainer(SplitTrainer):
    """A SplitTrainer whose session asks the backbone to hold the body adapter still."""

    def _open_request(self, session_id: str = "") -> SessionRequest:
        request = super()._open_request(session_id)
        assert request.optimizer is not None
        optimizer = dataclasses.replace(request.optimizer, learning_rate=FROZEN_BODY_LR)
        return dataclasses.replace(request, optimizer=optimizer)


def train_settings(data: Path, model: Path, **overrides: Any) -> TrainSettings:
    values: dict[str, Any] = {
        "data": data,
        "model_path": model,
        "k": K,
        "m": M,
        "batch_size": BATCH,
        "max_length": MAX_LENGTH,
        "max_grad_norm": MAX_GRAD_NORM,
        "max_steps": 100_000,
        "seed": 1,
        **overrides,
    }
    return TrainSettings(**values)


def tls_config(directory: Path) -> TLSConfig:
    return TLSConfig(
        (directory / "ca.pem").read_bytes(),
        (directory / "cert.pem").read_bytes(),
        (directory / "key.pem").read_bytes(),
    )


def body_drift(client: BackboneClient, session_id: str) -> float:
    """Largest |value| of the session's body LoRA B tensors (zero at initialisation)."""
    tensors = client.export_adapter(session_id)
    return max((float(t.abs().max()) for n, t in tensors.items() if ".lora_B." in n), default=0.0)


def run_client(spec_path: Path) -> int:
    """One federation member (a child process of the benchmark)."""
    torch.set_num_threads(1)
    spec = json.loads(spec_path.read_text())
    tls = tls_config(Path(spec["tls_dir"]))
    optimizer = OptimizerSettings(**spec["optimizer"])
    backbone = create_channel(spec["backbone"], tls, server_name=BACKBONE_NAME)
    aggregator = create_channel(spec["aggregator"], tls, server_name=AGGREGATOR_NAME)
    with backbone, aggregator:
        client = BackboneClient(backbone)
        trainer = FrozenBodyTrainer(
            client,
            train_settings(Path(spec["data"]), Path(spec["model_path"]), seed=spec["seed"]),
            ADAPTER,
            optimizer,
        )
        federated = FederatedTrainer(
            trainer, AggregatorClient(aggregator), FEDERATION, identity=spec["name"]
        )
        started = time.monotonic()
        reports = federated.run(max_wait_s=1800.0)
        assert trainer.session is not None
        result = {
            "name": spec["name"],
            "seconds": time.monotonic() - started,
            "train_losses": [loss for r in reports for loss in r.losses],
            "body_drift": body_drift(client, trainer.session.session_id),
        }
        trainer.close(delete_session=True)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def kind_of(prompt: str) -> str:
    if prompt.startswith("Copy"):
        return "copy"
    if prompt.startswith("Reverse"):
        return "reverse"
    if any(prompt.startswith(t.split("{")[0]) for t in NEXT_TEMPLATES):
        return "next"
    return "capital"


class Evaluator:
    """Eval loss of given head/tail adapters, through the backbone: a SplitTrainer that
    never trains (its body adapter is the seeded initial one, a no-op like every run's
    frozen body) and its ``evaluate()`` over the whole eval set."""

    def __init__(
        self, client: BackboneClient, eval_path: Path, model: Path, rows: list[dict[str, str]]
    ) -> None:
        settings = train_settings(
            eval_path,
            model,
            eval_data=eval_path,
            batch_size=EVAL_BATCH,
            eval_batches=1_000_000,
            shuffle=False,
        )
        self.trainer = FrozenBodyTrainer(client, settings, ADAPTER, OptimizerSettings())
        self.trainer.start()
        self.initial = {k: v.clone() for k, v in self.trainer.adapter_tensors().items()}
        self.everything = self.trainer.eval_data
        # One example per batch, so every example of a kind counts, once.
        self.kinds = {
            kind: MicroBatches(
                [Example(r["prompt"], r["response"]) for r in rows if kind_of(r["prompt"]) == kind],
                self.trainer.tokenizer,
                batch_size=1,
                max_length=MAX_LENGTH,
                shuffle=False,
            )
            for kind in KINDS
        }

    def loss(self, adapter: dict[str, torch.Tensor]) -> float:
        self.trainer.load_adapter_tensors(adapter)
        self.trainer.eval_data = self.everything
        return self.trainer.evaluate()

    def by_kind(self, adapter: dict[str, torch.Tensor]) -> dict[str, float]:
        self.trainer.load_adapter_tensors(adapter)
        try:
            out = {}
            for kind, batches in self.kinds.items():
                self.trainer.eval_data = batches
                out[kind] = self.trainer.evaluate()
            return out
        finally:
            self.trainer.eval_data = self.everything

    def close(self) -> None:
        self.trainer.close(delete_session=True)


def order_seed(order: int, index: int) -> int:
    """The shuffling seed of trainer ``index`` (the centralized one is 0) in data order
    ``order``: order 0 is seeds 1, 2, ...; each further order shifts them by 10."""
    return 1 + index + 10 * order


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The pointwise mean of curves evaluated at the same steps."""
    steps = [step for step, _ in curves[0]]
    if any([step for step, _ in curve] != steps for curve in curves):
        raise ValueError("the curves were evaluated at different steps")
    return [
        (step, sum(curve[i][1] for curve in curves) / len(curves)) for i, step in enumerate(steps)
    ]


def optimizer_for(args: argparse.Namespace, steps: int, learning_rate: float) -> OptimizerSettings:
    """AdamW at ``learning_rate``; a decaying schedule spans the run's own ``steps``."""
    if args.schedule == "constant":
        return OptimizerSettings(learning_rate=learning_rate)
    return OptimizerSettings(learning_rate=learning_rate, schedule=args.schedule, total_steps=steps)


def centralized(
    client: BackboneClient,
    evaluator: Evaluator,
    union: Path,
    model: Path,
    args: argparse.Namespace,
    eval_rounds: list[int],
    order: int,
) -> dict[str, Any]:
    per_round = CLIENTS * args.local_steps
    steps = per_round * args.central_rounds
    trainer = FrozenBodyTrainer(
        client,
        train_settings(union, model, seed=order_seed(order, 0)),
        ADAPTER,
        optimizer_for(args, steps, args.learning_rate),
    )
    trainer.start()
    points = [(0, evaluator.loss(evaluator.initial))]
    losses = []
    seconds = 0.0
    while trainer.step < steps:
        started = time.monotonic()
        losses.append(trainer.train_step().loss)
        seconds += time.monotonic() - started
        at_eval = trainer.step % per_round == 0 and trainer.step // per_round in eval_rounds
        if at_eval or trainer.step == steps:
            points.append((trainer.step, evaluator.loss(trainer.adapter_tensors())))
            print(
                f"  order {order}, centralized step {trainer.step:5d}: "
                f"eval loss {points[-1][1]:.4f}"
            )
    assert trainer.session is not None
    final = {n: t.clone() for n, t in trainer.adapter_tensors().items()}
    drift = body_drift(client, trainer.session.session_id)
    trainer.close(delete_session=True)
    return {
        "points": points,
        "train_losses": losses,
        "seconds": seconds,
        "body_drift": drift,
        "by_kind": evaluator.by_kind(final),
    }


def federated(
    root: Path,
    ca: CertificateAuthority,
    backbone: str,
    model: Path,
    data: list[Path],
    evaluator: Evaluator,
    args: argparse.Namespace,
    eval_rounds: list[int],
    order: int,
) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    ca.issue("aggregator-0", "aggregator", dns_names=[AGGREGATOR_NAME]).write(root / "agg-tls")
    settings = {
        "name": FEDERATION,
        "rounds": args.rounds,
        "min_clients": len(data),
        "local_steps": args.local_steps,
        "strategy": args.strategy,
        "strategy_options": args.strategy_options,
        "deadline_s": 600.0,
        "adapter_seed": ADAPTER.seed,
        "members": [f"client-{index}" for index in range(len(data))],
        "schema": {n: list(t.shape) for n, t in evaluator.initial.items()},
    }
    config = root / "aggregator.yaml"
    config.write_text(
        "aggregator:\n"
        f"  state_dir: {json.dumps(str(root / 'aggregator-state'))}\n"
        f"  federations: [{json.dumps(settings)}]\n"
        f"server:\n  tls_dir: {json.dumps(str(root / 'agg-tls'))}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    aggregator = ServiceProcess(
        "aggregator",
        ["serve", "aggregator", "--config", str(config)],
        log_path=root / "aggregator.log",
        env=env,
    )
    address = aggregator.start(timeout_s=120)
    optimizer = optimizer_for(args, args.rounds * args.local_steps, args.federated_learning_rate)
    processes: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        started = time.monotonic()
        for index, path in enumerate(data):
            name = f"client-{index}"
            ca.issue(name, "client").write(root / name)
            spec = {
                "name": name,
                "tls_dir": str(root / name),
                "backbone": backbone,
                "aggregator": address,
                "data": str(path),
                "model_path": str(model),
                "seed": order_seed(order, index),
                "optimizer": asdict(optimizer),
                "result": str(root / f"{name}.json"),
            }
            (root / f"{name}.spec.json").write_text(json.dumps(spec))
            with (root / f"{name}.log").open("w") as log:
                command = [sys.executable, __file__, "--client", str(root / f"{name}.spec.json")]
                processes.append(
                    (name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
                )
        for name, process in processes:
            if process.wait(timeout=1800) != 0:
                tail = (root / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"{name} failed:\n{tail}")
        seconds = time.monotonic() - started
        clients = [json.loads((root / f"{name}.json").read_text()) for name, _ in processes]
        # An evaluator reads the finished federation's versions (an admin may).
        ca.issue("evaluator", "admin").write(root / "evaluator")
        channel = create_channel(
            address, tls_config(root / "evaluator"), server_name=AGGREGATOR_NAME
        )
        with channel:
            reader = AggregatorClient(channel)
            points = [(0, evaluator.loss(evaluator.initial))]
            per_round = len(data) * args.local_steps
            adapter: dict[str, torch.Tensor] = evaluator.initial
            for version in eval_rounds:
                got, offset = reader.download(FEDERATION, version)
                if got != version:
                    raise RuntimeError(f"asked for version {version}, got {got}")
                adapter = {
                    n: t + offset[n].to(t.dtype) if n in offset else t
                    for n, t in evaluator.initial.items()
                }
                points.append((version * per_round, evaluator.loss(adapter)))
                print(
                    f"  order {order}, federated round {version:4d}: eval loss {points[-1][1]:.4f}"
                )
    finally:
        for _, process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        aggregator.stop()
    return {
        "points": points,
        "seconds": seconds,
        "clients": clients,
        "by_kind": evaluator.by_kind(adapter),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean curves, final losses and ratios over the data orders. The headline ratio is
    the mean federated final eval loss over the mean centralized one."""
    out: dict[str, Any] = {}
    for key in ("centralized", "federated"):
        curves = [run[key]["points"] for run in runs]
        finals = [curve[-1][1] for curve in curves]
        points = mean_curve(curves)
        out[key] = {
            "points": points,
            "finals": finals,
            "final_mean": statistics.fmean(finals),
            "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "best": min(loss for _, loss in points),
            "by_kind": {
                kind: statistics.fmean(run[key]["by_kind"][kind] for run in runs) for kind in KINDS
            },
        }
    central, fed = out["centralized"], out["federated"]
    out["ratios"] = {
        "federated/centralized eval loss": fed["final_mean"] / central["final_mean"],
        "federated/centralized best eval loss": fed["best"] / central["best"],
        "by order": [
            run["federated"]["points"][-1][1] / run["centralized"]["points"][-1][1] for run in runs
        ],
    }
    return out


def plot(path: Path, figures: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = figures["setup"]
    orders = setup["orders"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for key, label, marker in (
        (
            "centralized",
            f"centralized (one client, union of the data, lr {setup['learning_rate']:g})",
            "o",
        ),
        (
            "federated",
            f"federated ({CLIENTS} clients, {setup['strategy']}, "
            f"lr {setup['federated_learning_rate']:g})",
            "s",
        ),
    ):
        stats = figures[key]
        xs = [step * BATCH for step, _ in stats["points"]]
        (line,) = ax.plot(
            xs,
            [loss for _, loss in stats["points"]],
            marker=marker,
            markersize=2.5,
            label=f"{label}: final {stats['final_mean']:.3f}",
        )
        if orders > 1:
            curves = [[loss for _, loss in run[key]["points"]] for run in figures["runs"]]
            ax.fill_between(
                xs,
                [min(values) for values in zip(*curves, strict=True)],
                [max(values) for values in zip(*curves, strict=True)],
                color=line.get_color(),
                alpha=0.18,
                linewidth=0,
            )
    target = figures["centralized"]["final_mean"] * 1.05
    ax.axhline(
        target,
        color="grey",
        linestyle=":",
        linewidth=1,
        label=f"centralized final x 1.05: {target:.3f}",
    )
    ax.set_yscale("log")
    examples_per_round = CLIENTS * setup["local_steps"] * BATCH
    top = ax.secondary_xaxis(
        "top",
        functions=(lambda x: x / examples_per_round, lambda r: r * examples_per_round),
    )
    top.set_xlabel("federated rounds", fontsize=8.5)
    ax.set_xlabel(
        f"training examples processed (one round = {CLIENTS} x {setup['local_steps']} "
        f"steps x batch {BATCH})"
    )
    spread = " (band: min to max)" if orders > 1 else ""
    ax.set_ylabel(f"eval loss, mean of {orders} data order(s){spread}", fontsize=8.5)
    ratios = figures["ratios"]
    ax.set_title(
        f"Split LoRA fine-tuning, tiny model, {setup['rounds']} rounds: federated/centralized "
        f"eval loss {ratios['federated/centralized eval loss']:.3f} (final, mean of {orders})",
        fontsize=9.5,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--central-rounds",
        type=int,
        help="the centralized run's length in rounds' worth of steps (4 x local steps "
        "each; default and at most --rounds: as many examples as the federated run)",
    )
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument(
        "--learning-rate", type=float, default=5e-3, help="the centralized run's peak rate"
    )
    parser.add_argument(
        "--federated-learning-rate",
        type=float,
        default=FEDERATED_LR,
        help="the clients' peak rate (each run at the rate it does best at)",
    )
    parser.add_argument(
        "--strategy-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option of --strategy, e.g. server_lr=1.0 (repeatable)",
    )
    parser.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="cosine")
    parser.add_argument(
        "--strategy", choices=sorted(STRATEGIES), default=STRATEGY, help="with its defaults"
    )
    parser.add_argument("--sizes", default="256,96,160,128", help="examples of clients 0-3")
    parser.add_argument("--dominant", type=float, default=0.8)
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--evals", type=int, default=20, help="eval points per curve")
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0, help="the task's and base model's seed")
    parser.add_argument(
        "--orders",
        type=int,
        default=3,
        help="data orders (trainers' shuffling seeds) to repeat both runs with; the ratio "
        "is of the mean final eval losses",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--workdir", type=Path, help="keep model, data and logs here")
    parser.add_argument("--client", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client is not None:
        return run_client(args.client)
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) != CLIENTS or min(sizes) < BATCH:
        parser.error(f"--sizes needs {CLIENTS} sizes of at least {BATCH}")
    if args.central_rounds is None:
        args.central_rounds = args.rounds
    args.central_rounds = min(args.central_rounds, args.rounds)
    if min(args.rounds, args.local_steps, args.evals, args.central_rounds, args.orders) < 1:
        parser.error("--rounds, --central-rounds, --local-steps, --evals and --orders must be >= 1")
    try:
        args.strategy_options = {
            name: float(value)
            for name, value in (option.split("=", 1) for option in args.strategy_option)
        }
    except ValueError:
        parser.error("--strategy-option takes NAME=VALUE with a number as VALUE")
    if args.eval_size < EVAL_BATCH or args.eval_size % EVAL_BATCH:
        parser.error(f"--eval-size must be a multiple of {EVAL_BATCH}")
    if not 1 / CLIENTS <= args.dominant <= 1:
        parser.error(f"--dominant must be in [{1 / CLIENTS}, 1]")
    torch.set_num_threads(1)
    described = machine()
    try:
        task = make_task(sizes, args.dominant, args.eval_size, args.seed)
    except IndexError:
        parser.error("--sizes / --eval-size ask for more examples of a kind than exist")
    every = max(1, args.rounds // args.evals)
    eval_rounds = sorted({*range(every, args.rounds + 1, every), args.rounds})
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            root = args.workdir
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="splitfed-fed-")))
        data = [write_jsonl(root / f"data-{i}.jsonl", rows) for i, rows in enumerate(task.clients)]
        union = write_jsonl(root / "union.jsonl", [r for rows in task.clients for r in rows])
        eval_path = write_jsonl(root / "eval.jsonl", task.eval)
        every_text = [
            f"{r['prompt']}\n{r['response']}" for rows in (*task.clients, task.eval) for r in rows
        ]
        pretrain = pretrain_texts(args.seed)
        model = make_tiny_checkpoint(
            root / "model",
            every_text + pretrain,
            layers=6,
            hidden_size=64,
            seed=args.seed,
            pretrain_texts=pretrain,
            pretrain_steps=args.pretrain_steps,
        )
        print(f"pretrained the tiny base model ({time.monotonic() - began:.0f} s)")
        ca = CertificateAuthority.create("bench CA")
        ca.issue("backbone-0", "backbone", dns_names=[BACKBONE_NAME]).write(root / "bb-tls")
        (root / "backbone.yaml").write_text(
            f"backbone:\n  model_path: {json.dumps(str(model))}\n"
            "  adapter_mode: per-client\n  idle_timeout_s: 7200\n"
            f"server:\n  tls_dir: {json.dumps(str(root / 'bb-tls'))}\n"
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        backbone = ServiceProcess(
            "backbone",
            ["serve", "backbone", "--config", str(root / "backbone.yaml")],
            log_path=root / "backbone.log",
            env=env,
        )
        address = backbone.start(timeout_s=120)
        try:
            ca.issue("bench", "client").write(root / "bench-tls")
            channel = create_channel(
                address, tls_config(root / "bench-tls"), server_name=BACKBONE_NAME
            )
            with channel:
                client = BackboneClient(channel)
                evaluator = Evaluator(client, eval_path, model, task.eval)
                per_round = CLIENTS * args.local_steps
                runs = []
                for order in range(args.orders):
                    print(
                        f"data order {order}: centralized, {per_round * args.central_rounds} "
                        f"steps of batch {BATCH} on the union ({sum(sizes)} examples)"
                    )
                    central = centralized(client, evaluator, union, model, args, eval_rounds, order)
                    print(
                        f"data order {order}: federated, {args.rounds} rounds x "
                        f"{args.local_steps} local steps, {CLIENTS} clients of {sizes} examples"
                    )
                    fed = federated(
                        root / f"order-{order}",
                        ca,
                        address,
                        model,
                        data,
                        evaluator,
                        args,
                        eval_rounds,
                        order,
                    )
                    runs.append({"order": order, "centralized": central, "federated": fed})
                evaluator.close()
        except BaseException:
            for log in ("backbone.log", "aggregator.log", "client-0.log"):
                for found in sorted(root.glob(f"**/{log}"))[-1:]:
                    print(f"--- {found} (end)\n{found.read_text()[-2000:]}", file=sys.stderr)
            raise
        finally:
            backbone.stop()
    figures: dict[str, Any] = {
        "machine": described,
        "setup": {
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "central_rounds": args.central_rounds,
            "clients": CLIENTS,
            "batch_size": BATCH,
            "learning_rate": args.learning_rate,
            "federated_learning_rate": args.federated_learning_rate,
            "strategy_options": args.strategy_options,
            "schedule": args.schedule,
            "strategy": args.strategy,
            "sizes": sizes,
            "dominant": args.dominant,
            "mixes": task.mixes,
            "eval_size": len(task.eval),
            "eval_mix": {k: sum(kind_of(r["prompt"]) == k for r in task.eval) for k in KINDS},
            "adapter": ADAPTER.to_dict(),
            "k": K,
            "m": M,
            "pretrain_steps": args.pretrain_steps,
            "frozen_body_lr": FROZEN_BODY_LR,
            "seed": args.seed,
            "orders": args.orders,
            "trainer_seeds": {
                "centralized": [order_seed(o, 0) for o in range(args.orders)],
                "federated": [
                    [order_seed(o, i) for i in range(CLIENTS)] for o in range(args.orders)
                ],
            },
        },
        "runs": runs,
    }
    summary = summarize(runs)
    figures.update(summary)
    central, fed = summary["centralized"], summary["federated"]
    print()
    print(f"eval loss, mean of {args.orders} data order(s):")
    print(f"{'examples':>9} {'centralized':>12} {'federated':>10}")
    central_at = dict(central["points"])
    for step, f_loss in fed["points"]:
        c_loss = f"{central_at[step]:>12.4f}" if step in central_at else f"{'':>12}"
        print(f"{step * BATCH:>9} {c_loss} {f_loss:>10.4f}")
    print("final eval loss by data order:")
    for run in runs:
        c_final = run["centralized"]["points"][-1][1]
        f_final = run["federated"]["points"][-1][1]
        print(
            f"  order {run['order']}: centralized {c_final:.4f}, federated {f_final:.4f}, "
            f"federated/centralized {f_final / c_final:.4f}"
        )
    for key in ("centralized", "federated"):
        stats = summary[key]
        print(
            f"{key}: final {stats['final_mean']:.4f} +- {stats['final_std']:.4f} "
            f"(min {min(stats['finals']):.4f}, max {max(stats['finals']):.4f}), "
            f"best of the mean curve {stats['best']:.4f}"
        )
    print("final eval loss by kind, mean of the orders (one example per batch):")
    for kind in KINDS:
        print(
            f"  {kind:>8}: centralized {central['by_kind'][kind]:.4f}, "
            f"federated {fed['by_kind'][kind]:.4f}"
        )
    drift = max(
        max(
            [run["centralized"]["body_drift"]]
            + [c["body_drift"] for c in run["federated"]["clients"]]
        )
        for run in runs
    )
    print(f"largest body LoRA B value after training (frozen body, 0 at start): {drift:.3g}")
    figures["setup"]["seconds"] = time.monotonic() - began
    print(
        f"time: centralized {sum(r['centralized']['seconds'] for r in runs):.0f} s of training, "
        f"federated {sum(r['federated']['seconds'] for r in runs):.0f} s (client processes "
        f"start to end), total {figures['setup']['seconds']:.0f} s"
    )
    plot(args.plot, figures)
    print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    ratios = figures["ratios"]
    print(
        "ratio federated/centralized best eval loss: "
        f"{ratios['federated/centralized best eval loss']:.4f}"
    )
    print(f"ratio federated/centralized eval loss: {ratios['federated/centralized eval loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
