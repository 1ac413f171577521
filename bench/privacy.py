"""Privacy, measured: what a curious backbone recovers, at which k and noise, for what loss.

One script of some 530 lines on purpose: a benchmark is one runnable file whose docstring
is its method; the attacks, the scoring and the in-process split are in splitfed.privacy,
what is left here is the sweep, the two rows outside it, the choice and the plot.

The task (``splitfed.privacy.records``): synthetic patient notes (name, date of birth,
admission date, diagnosis, medication, amount billed) and an extraction response that
repeats the name, diagnosis and amount. A public corpus of the same kind (``--public``
notes, none of the client's) is the attacker's; the client holds ``--train`` private
notes and ``--eval`` held-out ones. The base model is the tiny Llama-layout model of
``splitfed.models.tiny`` (6 layers, hidden 64, a byte-level BPE tokenizer trained on the
public notes), pretrained on the public notes as plain text (``--pretrain-steps``), so it
knows the words but not the extraction format: fine-tuning has something to learn.

Each point of the sweep fine-tunes the client's LoRA (r 8 on the head and tail, the body
frozen as the backbone holds it) for ``--steps`` optimizer steps of ``--batch`` notes in
process (``splitfed.privacy.observe.LocalSplit``: the same head, tail, perturbation code
and noise streams as ``SplitTrainer``; tests/integration/test_privacy.py checks it
releases the very tensors a real backbone receives), at k client blocks (``--ks``; the
tail keeps m = 1) and hidden-state noise multiplier sigma (``--sigmas``; clip norm C = the
median norm of the client's own h1 under the base head) or gradient noise (``--grad-sigmas``,
at k = 1 with no hidden noise; C_g = the median grad_h2 norm). It keeps what the backbone
saw: the notes under the public head (what it receives when the client evaluates or
generates with the base model: the attacker's copy of the head is exact), the training
releases of the first epoch (the head starts public and drifts) and of the last
(fine-tuned: the attacker's copy is stale), the held-out evaluation forwards, and
generation prefills of the held-out prompts (perturbed as ``[training.perturbation]
generation = true`` perturbs them).

The attacks (``splitfed.privacy.attacks``) are fitted on the attacker's own releases of
its public text through the public base model with the published settings (only the
noise seed is secret): learned inversion (an MLP over each h1 and its neighbours),
nearest-embedding inversion, and label leakage from grad_h2; the learned inversion is also
self-trained on everything it recorded (its answer to a stale head). Per point: the worst
stage's token recovery of the learned inversion (either decoder), the worst case over
attacks and stages of sensitive-field exact match, the label attack's recovery, the eval
loss (with the noise the client's evaluation adds, and without), and the epsilon of the
training releases (opacus' RDP accountant, sample rate batch / notes, delta 1e-5).

Two rows stand outside the sweep: k = 0 (the embedding output itself sent, which
splitfed refuses: its nearest-embedding inversion shows why), and activation encryption
seen from the wire (the learned inversion run on the sealed payloads a TLS-terminating
proxy would see: at chance; the backbone opens them and sees the k = 1 row).

The recommended point: the lowest worst-case sensitive-field recovery among the points
whose eval loss is at most ``--max-loss-cost`` (5 %) above the unprotected k = 1 run's,
ties broken by lower epsilon. Headline ratios at that point against unprotected k = 1:
learned-inversion token recovery and eval loss.

    python bench/privacy.py [--json PATH] [--plot PATH] [--ks 1,2,4]
        [--sigmas 0,0.05,0.1,0.2] [--grad-sigmas 0.5,2] [--steps 96]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import machine, report
from transformers import AutoTokenizer

from splitfed.clients.data import Example, MicroBatches
from splitfed.models.adapters import AdapterSettings
from splitfed.models.optim import OptimizerSettings
from splitfed.models.tiny import make_tiny_checkpoint
from splitfed.privacy.attacks import (
    Knowledge,
    LabelLeakage,
    LearnedInversion,
    NearestEmbedding,
    embedding_matrix,
)
from splitfed.privacy.harness import (
    BASE,
    EVAL,
    GENERATION,
    TRAIN_END,
    TRAIN_START,
    encoded,
    fine_tune,
    prompts,
    score_stage,
)
from splitfed.privacy.observe import LocalSplit, Observation, SplitSetup, batches
from splitfed.privacy.records import Corpora, chance_rate, make_corpora
from splitfed.privacy.scoring import Scorer
from splitfed.protocol.backbone import TRAIN_REQUEST
from splitfed.security.perturbation import PerturbationSettings
from splitfed.security.sealing import TO_BACKBONE, DataKey, FrameContext, Sealer
from splitfed.v1 import backbone_pb2
from splitfed.wire import iter_frames

M = 1
LAYERS = 6
HIDDEN = 64
MAX_LENGTH = 128
ADAPTER = AdapterSettings(kind="lora", r=8, alpha=16, seed=3)
DELTA = 1e-5
SEED = 7
# The options (--name) and their defaults.
DEFAULTS: dict[str, Any] = {
    "public": 800,
    "train": 256,
    "eval": 64,
    "pretrain-steps": 300,
    "steps": 96,
    "batch": 8,
    "learning-rate": 5e-3,
    "attack-epochs": 5,
    "ks": "1,2,4",
    "sigmas": "0,0.05,0.1,0.2",
    "grad-sigmas": "0.5,2",
    "max-loss-cost": 0.05,
}


def base_model(workdir: Path, corpora: Corpora, pretrain_steps: int) -> Path:
    """The tiny base model pretrained on the public notes (cached in ``workdir``)."""
    path = workdir / f"model-{len(corpora.public)}-{pretrain_steps}"
    if not (path / "config.json").is_file():
        texts = [r.prompt for r in corpora.public]
        make_tiny_checkpoint(
            path,
            texts,
            layers=LAYERS,
            hidden_size=HIDDEN,
            seed=0,
            pretrain_texts=texts,
            pretrain_steps=pretrain_steps,
        )
    return path


@dataclass
class Bench:
    args: argparse.Namespace
    path: Path
    tokenizer: Any
    corpora: Corpora
    train: MicroBatches
    evaluation: list[Any]
    generation: list[Any]
    public: list[Any]
    scorers: dict[str, Scorer]
    clip: dict[int, tuple[float, float]] = field(default_factory=dict)
    inversions: dict[tuple[int, float], LearnedInversion] = field(default_factory=dict)

    def clip_norms(self, k: int) -> tuple[float, float]:
        """(C, C_g): median norms of h1 and grad_h2 of the client's own notes under the
        base model, the client's choice of clip norms."""
        if k not in self.clip:
            split = LocalSplit(SplitSetup(self.path, k, M, ADAPTER))
            seen: list[Observation] = []
            for index in range(4):
                split.forward_backward(
                    [(self.train.indices(index), self.train.batch(index))], seen.append
                )
            hidden = torch.cat([o.hidden[o.mask.bool()] for o in seen]).norm(dim=-1)
            grads = torch.cat([o.grad[o.mask.bool()] for o in seen if o.grad is not None])
            self.clip[k] = (float(hidden.median()), float(grads.norm(dim=-1).median()))
        return self.clip[k]

    def knowledge(self, k: int, perturbation: PerturbationSettings) -> Knowledge:
        return Knowledge(self.path, k, M, perturbation, self.public)

    def inversion(self, k: int, perturbation: PerturbationSettings) -> LearnedInversion:
        key = (k, perturbation.noise_multiplier)
        if key not in self.inversions:
            attack = LearnedInversion(len(self.tokenizer), epochs=self.args.attack_epochs)
            attack.fit(self.knowledge(k, perturbation))
            self.inversions[key] = attack
        return self.inversions[key]

    def score(self, attack: Any, observations: list[Observation], stage: str) -> dict[str, Any]:
        return score_stage(attack, observations, self.scorers[stage])


def perturbation_for(bench: Bench, k: int, sigma: float, grad_sigma: float) -> PerturbationSettings:
    clip, grad_clip = bench.clip_norms(k)
    return PerturbationSettings(
        clip_norm=clip if sigma > 0 else 0.0,
        noise_multiplier=sigma,
        grad_clip_norm=grad_clip if grad_sigma > 0 else 0.0,
        grad_noise_multiplier=grad_sigma,
        delta=DELTA,
        seed=SEED,
    )


def run_point(
    bench: Bench, k: int, sigma: float, grad_sigma: float, *, labels: bool
) -> dict[str, Any]:
    """Fine-tune at (k, sigma, grad_sigma), attack what the backbone saw, and score."""
    args = bench.args
    started = time.monotonic()
    perturbation = perturbation_for(bench, k, sigma, grad_sigma)
    optimizer = OptimizerSettings(
        learning_rate=args.learning_rate, schedule="cosine", total_steps=args.steps
    )
    setup = SplitSetup(bench.path, k, M, ADAPTER, optimizer, perturbation, 1.0)
    sample_rate = args.batch / len(bench.corpora.train)
    split = LocalSplit(setup, sample_rate=sample_rate)
    run = fine_tune(split, bench.train, bench.evaluation, bench.generation, steps=args.steps)
    scores: dict[str, dict[str, Any]] = {}
    inversion = bench.inversion(k, perturbation)
    kept = {stage: seen for stage, seen in run.observations.items() if seen}
    training = [stage for stage in (TRAIN_START, TRAIN_END) if stage in kept]
    released = [stage for stage in (BASE, *training) if stage in kept]
    scores["learned_inversion"] = {
        stage: bench.score(inversion, seen, stage) for stage, seen in kept.items()
    }
    adapted = copy.deepcopy(inversion)
    adapted.adapt([o for seen in kept.values() for o in seen])
    scores["learned_inversion_adapted"] = {
        stage: bench.score(adapted, seen, stage) for stage, seen in kept.items()
    }
    nearest = NearestEmbedding(embedding_matrix(bench.path, k, M))
    scores["nearest_embedding"] = {
        stage: bench.score(nearest, kept[stage], stage) for stage in released
    }
    if labels:
        label = LabelLeakage(len(bench.tokenizer), epochs=args.attack_epochs)
        label.fit(bench.knowledge(k, perturbation))
        scores["label_leakage"] = {
            stage: bench.score(label, kept[stage], stage) for stage in training
        }
    fields = [
        s["field_exact_match"]
        for stages in scores.values()
        for s in stages.values()
        if s["field_exact_match"] is not None
    ]
    point = {
        "k": k,
        "sigma": sigma,
        "grad_sigma": grad_sigma,
        "clip_norm": perturbation.clip_norm,
        "grad_clip_norm": perturbation.grad_clip_norm,
        "token_recovery": max(
            s["token_accuracy"]
            for name in ("learned_inversion", "learned_inversion_adapted")
            for s in scores[name].values()
        ),
        "token_recovery_base": scores["learned_inversion"][BASE]["token_accuracy"],
        "token_recovery_first_epoch": scores["learned_inversion"][TRAIN_START]["token_accuracy"],
        "token_recovery_stale": scores["learned_inversion"]
        .get(TRAIN_END, {})
        .get("token_accuracy"),
        "token_recovery_stale_adapted": scores["learned_inversion_adapted"]
        .get(TRAIN_END, {})
        .get("token_accuracy"),
        "field_recovery": max(fields),
        "label_recovery": (
            max(s["token_accuracy"] for s in scores["label_leakage"].values()) if labels else None
        ),
        "eval_loss": run.eval_loss,
        "clean_eval_loss": run.clean_eval_loss,
        "first_loss": run.losses[0],
        "last_loss": statistics.mean(run.losses[-8:]),
        "epsilon": run.epsilon,
        "seconds": time.monotonic() - started,
        "attacks": scores,
    }
    print(
        f"k={k} sigma={sigma:g} grad_sigma={grad_sigma:g}: tokens {point['token_recovery']:.1%} "
        f"(public head {point['token_recovery_base']:.1%}, "
        f"first epoch {point['token_recovery_first_epoch']:.1%}, "
        f"last epoch {point['token_recovery_stale'] or 0:.1%}, "
        f"adapted {point['token_recovery_stale_adapted'] or 0:.1%}), "
        f"fields {point['field_recovery']:.1%}"
        + (f", labels {point['label_recovery']:.1%}" if labels else "")
        + f", eval loss {run.eval_loss:.3f} (clean {run.clean_eval_loss:.3f}), "
        f"epsilon {run.epsilon:.4g}, {point['seconds']:.0f} s",
        flush=True,
    )
    return point


def k0_row(bench: Bench) -> dict[str, Any]:
    """Nearest-embedding inversion of the embedding output itself (k = 0, no noise)."""
    head = LocalSplit(SplitSetup(bench.path, 1, M, ADAPTER)).head
    table = head.base.get_input_embeddings()
    observations = []
    with torch.no_grad():
        for index in range(bench.train.per_epoch):
            batch = bench.train.batch(index)
            hidden = table(batch.input_ids) * batch.attention_mask.unsqueeze(-1)
            observations.append(
                Observation(
                    "k0",
                    hidden,
                    batch.attention_mask,
                    hidden,
                    batch.input_ids,
                    batch.labels,
                    bench.train.indices(index),
                )
            )
    score = bench.score(NearestEmbedding(table.weight.detach()), observations, TRAIN_START)
    print(
        f"k=0 nearest embedding: tokens {score['token_accuracy']:.1%}, "
        f"fields {score['field_exact_match']:.1%}"
    )
    return score


def sealed(observation: Observation) -> Observation:
    """What a TLS-terminating proxy sees of h1 with activation encryption: the sealed
    payload (AES-256-GCM ciphertext), read as the float32 tensor it replaces."""
    key = DataKey(1, os.urandom(32), os.urandom(4))
    sealer = Sealer("privacy-bench", TO_BACKBONE, key)
    hidden = observation.hidden.float().contiguous()
    context = FrameContext(op=backbone_pb2.TRAIN_OP_FORWARD, step=1)
    frames = sealer.seal_frames(iter_frames(hidden, "h1", TRAIN_REQUEST), context)
    payload = b"".join(bytes(frame.data) for frame in frames)[: hidden.numel() * 4]
    garbage = torch.frombuffer(bytearray(payload), dtype=torch.float32).reshape(hidden.shape)
    garbage = torch.nan_to_num(garbage, nan=0.0, posinf=0.0, neginf=0.0).clamp(-1e3, 1e3)
    return Observation(
        "sealed",
        garbage,
        observation.mask,
        observation.output,
        observation.input_ids,
        observation.labels,
        observation.examples,
    )


def encryption_row(bench: Bench) -> dict[str, Any]:
    """The k = 1 unprotected decoder against the sealed payloads of fresh releases."""
    split = LocalSplit(SplitSetup(bench.path, 1, M, ADAPTER))
    seen: list[Observation] = []
    split.forward_only(
        batches(
            encoded(bench.corpora.train, bench.tokenizer, MAX_LENGTH, chat_template=False),
            0,
            bench.args.batch,
        ),
        seen.append,
    )
    attack = bench.inversion(1, PerturbationSettings())
    score = bench.score(attack, [sealed(o) for o in seen], TRAIN_START)
    print(
        f"encryption, seen from the wire: tokens {score['token_accuracy']:.1%}, "
        f"fields {score['field_exact_match']:.1%}"
    )
    return score


def recommend(points: list[dict[str, Any]], baseline: float, max_cost: float) -> dict[str, Any]:
    """The lowest worst-case field recovery within the loss budget (then lowest epsilon)."""
    within = [p for p in points if p["eval_loss"] <= baseline * (1 + max_cost)]
    return min(within, key=lambda p: (p["field_recovery"], p["token_recovery"], p["epsilon"]))


def plot(path: Path, figures: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = figures["baseline_eval_loss"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = {1: "tab:blue", 2: "tab:orange", 4: "tab:green"}
    hidden = [p for p in figures["points"] if p["grad_sigma"] == 0]
    for k in sorted({p["k"] for p in hidden}):
        pts = sorted((p for p in hidden if p["k"] == k), key=lambda p: p["sigma"])
        colour = colours.get(k)
        for what, style, label in (
            ("token_recovery", "o-", "tokens (worst stage)"),
            ("field_recovery", "s--", "sensitive fields"),
        ):
            left.plot(
                [p["sigma"] for p in pts],
                [100 * p[what] for p in pts],
                style,
                color=colour,
                label=f"k={k} {label}",
            )
        right.plot(
            [p["eval_loss"] / baseline for p in pts],
            [100 * p["field_recovery"] for p in pts],
            "o-",
            color=colour,
            label=f"k={k}",
        )
        for p in pts:
            right.annotate(
                f"s={p['sigma']:g}",
                (p["eval_loss"] / baseline, 100 * p["field_recovery"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    chance = 100 * figures["chance"]["field_exact_match"]
    for axis in (left, right):
        axis.axhline(chance, color="grey", linestyle=":", label="sensitive fields: chance")
    left.set_xlabel("hidden-state noise multiplier sigma")
    left.set_ylabel("recovered by the backbone (%)")
    left.set_title("learned inversion")
    left.legend(fontsize=7)
    rec = figures["recommended"]
    right.plot(
        [rec["eval_loss"] / baseline],
        [100 * rec["field_recovery"]],
        "*",
        markersize=16,
        color="red",
        label="recommended",
    )
    right.axvline(1 + figures["max_loss_cost"], color="red", linestyle=":", label="loss budget")
    right.set_xscale("log")
    right.set_xlabel("eval loss / unprotected k=1 eval loss")
    right.set_ylabel("sensitive fields recovered (%, worst attack and stage)")
    right.set_title("privacy-utility frontier")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.monotonic()
    info = machine()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        corpora = make_corpora(args.public, args.train, args.eval, seed=0)
        path = base_model(workdir, corpora, args.pretrain_steps)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        examples = [Example(r.prompt, r.response) for r in corpora.train]
        train = MicroBatches(
            examples,
            tokenizer,
            batch_size=args.batch,
            max_length=MAX_LENGTH,
            seed=0,
            chat_template=False,
        )
        rows = {
            "public": encoded(corpora.public, tokenizer, MAX_LENGTH, chat_template=False),
            "eval": encoded(corpora.eval, tokenizer, MAX_LENGTH, chat_template=False),
            "prompts": prompts(corpora.eval, tokenizer, MAX_LENGTH, chat_template=False),
        }
        train_scorer = Scorer(tokenizer, corpora.train, MAX_LENGTH, chat_template=False)
        eval_scorer = Scorer(tokenizer, corpora.eval, MAX_LENGTH, chat_template=False)
        bench = Bench(
            args,
            path,
            tokenizer,
            corpora,
            train,
            batches(rows["eval"], 0, 16),
            batches(rows["prompts"], 0, 16),
            batches(rows["public"], 0, 16),
            {
                BASE: train_scorer,
                TRAIN_START: train_scorer,
                TRAIN_END: train_scorer,
                EVAL: eval_scorer,
                GENERATION: eval_scorer,
            },
        )
        print(f"base model and data ready in {time.monotonic() - started:.0f} s", flush=True)
        points = []
        for k in (int(x) for x in args.ks.split(",")):
            for sigma in floats(args.sigmas):
                points.append(run_point(bench, k, sigma, 0.0, labels=sigma == 0))
        for grad_sigma in floats(args.grad_sigmas):
            points.append(run_point(bench, 1, 0.0, grad_sigma, labels=True))
        unprotected = next(p for p in points if (p["k"], p["sigma"], p["grad_sigma"]) == (1, 0, 0))
        baseline = unprotected["eval_loss"]
        chosen = recommend(points, baseline, args.max_loss_cost)
        chance = chance_rate(corpora.public, corpora.train)
        figures = {
            "points": points,
            "baseline_eval_loss": baseline,
            "max_loss_cost": args.max_loss_cost,
            "chance": {"field_exact_match": chance},
            "k0_nearest_embedding": k0_row(bench),
            "encryption_wire_view": encryption_row(bench),
            "recommended": {key: v for key, v in chosen.items() if key != "attacks"},
            "seconds": time.monotonic() - started,
        }
    print(
        f"recommended: k={chosen['k']} sigma={chosen['sigma']:g} "
        f"grad_sigma={chosen['grad_sigma']:g}: sensitive fields {chosen['field_recovery']:.1%} "
        f"(chance {chance:.1%}), tokens {chosen['token_recovery']:.1%}, eval loss "
        f"{chosen['eval_loss']:.3f} vs {baseline:.3f}, epsilon {chosen['epsilon']:.4g}"
    )
    near_chance = chosen["field_recovery"] <= chance + 0.02
    print(
        "the recommended point is "
        + ("at or near chance" if near_chance else "NOT near chance: see the frontier")
        + f" within a {args.max_loss_cost:.0%} eval-loss budget"
    )
    if args.plot is not None:
        plot(args.plot, figures)
    ratios = {
        "attack recovery protected/unprotected": chosen["token_recovery"]
        / unprotected["token_recovery"],
        "eval loss protected/unprotected": chosen["eval_loss"] / baseline,
    }
    print(f"total {time.monotonic() - started:.0f} s")
    arguments = {key: str(v) if isinstance(v, Path) else v for key, v in vars(args).items()}
    report(args.json, "privacy", ratios, machine=info, args=arguments, figures=figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
