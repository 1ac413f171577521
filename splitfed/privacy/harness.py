"""Run attacks on a client's releases and score them.

:func:`fine_tune` trains a client's split in process (:class:`LocalSplit`) and keeps what
the backbone saw, by stage: the notes under the public head (the attacker's copy of the
head is exact), the first epoch (the head starts public and drifts) and the last (the head
fine-tuned: the attacker's copy is stale), then what evaluation and generation prefills
release. :func:`score_attacks` fits each attack on the attacker's knowledge and scores it
on every kept stage; :func:`measure` is ``splitfed privacy attack``: one epoch of a
client's data and a prefill of each prompt, with its settings. ``bench/privacy.py`` sweeps
settings with :func:`fine_tune`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from splitfed.clients.data import Batch, Example, MicroBatches, encode, prompt_tokens
from splitfed.models.adapters import load_adapter_state
from splitfed.privacy.attacks import (
    Attack,
    Knowledge,
    LabelLeakage,
    LearnedInversion,
    NearestEmbedding,
    embedding_matrix,
)
from splitfed.privacy.observe import LocalSplit, Observation, SplitSetup, batches
from splitfed.privacy.records import PrivateRecord, chance_rate
from splitfed.privacy.scoring import Scorer

# Stages of a run, in the order they happen.
BASE = "base_head"  # the private notes under the public head (the first release of each)
TRAIN_START = "train_start"  # first epoch: the head starts as the public one
TRAIN_END = "train_end"  # last epoch: the head is fine-tuned
EVAL = "eval"  # evaluation forwards over held-out private records
GENERATION = "generation"  # generation prefills: the held-out records' prompts

ATTACK_NAMES = ("learned_inversion", "nearest_embedding", "label_leakage")


def examples_of(records: Iterable[PrivateRecord]) -> list[Example]:
    return [Example(r.prompt, r.response) for r in records]


def encoded(
    records: Sequence[PrivateRecord], tokenizer: Any, max_length: int, *, chat_template: bool
) -> list[tuple[list[int], list[int]]]:
    return [
        encode(e, tokenizer, max_length, chat_template=chat_template) for e in examples_of(records)
    ]


def prompts(
    records: Sequence[PrivateRecord], tokenizer: Any, max_length: int, *, chat_template: bool
) -> list[tuple[list[int], list[int]]]:
    """What a generation's prefill sends for each record: its prompt's tokens (the labels
    are the prompt's own next tokens, which no release depends on)."""
    rows = []
    for record in records:
        ids = prompt_tokens(tokenizer, record.prompt, chat_template=chat_template)[:max_length]
        rows.append((ids, [-100] * len(ids)))
    return rows


@dataclass
class Run:
    """A fine-tuning run and what the backbone saw of it."""

    losses: list[float]
    eval_loss: float
    clean_eval_loss: float
    epsilon: float
    observations: dict[str, list[Observation]] = field(default_factory=dict)


def fine_tune(
    split: LocalSplit,
    train: MicroBatches,
    evaluation: Sequence[tuple[list[int], Batch]],
    generation: Sequence[tuple[list[int], Batch]],
    *,
    steps: int,
) -> Run:
    """Train ``split`` for ``steps`` optimizer steps over ``train`` and keep the first and
    the last epoch's releases, then evaluate (perturbed as the client's evaluation is, and
    clean) and prefill the ``generation`` prompts. Before training, the training notes'
    releases under the public head (:data:`BASE`: what the backbone receives when the
    client evaluates or generates with the base model, and the first step's notes)."""
    base: list[Observation] = []
    split.forward_only(
        [(train.indices(i), train.batch(i)) for i in range(train.per_epoch)], base.append, BASE
    )
    per_step = train.accumulation
    epoch_steps = max(1, train.per_epoch // per_step)
    last_epoch_from = max(1, steps - epoch_steps + 1)
    kept: dict[str, list[Observation]] = {BASE: base, TRAIN_START: [], TRAIN_END: []}
    losses = []
    for step in range(1, steps + 1):
        first = (step - 1) * per_step
        micro = [(train.indices(first + i), train.batch(first + i)) for i in range(per_step)]
        stage = TRAIN_START if step <= epoch_steps else TRAIN_END
        keep = step <= epoch_steps or step >= last_epoch_from
        losses.append(split.train_step(micro, kept[stage].append if keep else None, stage))
    kept[EVAL] = []
    eval_loss = split.forward_only(evaluation, kept[EVAL].append, EVAL)
    clean = split.forward_only(evaluation, perturb=False)
    kept[GENERATION] = []
    split.forward_only(generation, kept[GENERATION].append, GENERATION)
    return Run(losses, eval_loss, clean, split.epsilon(), kept)


def score_stage(
    attack: Attack, observations: Sequence[Observation], scorer: Scorer
) -> dict[str, Any]:
    """The summary of what ``attack`` recovers from ``observations``."""
    scorer.reset()
    for o in observations:
        scorer.add(o.examples, o.input_ids, attack.predict(o))
    return scorer.score.summary()


def _score(
    attack: Attack, stages: Mapping[str, tuple[Sequence[Observation], Scorer]]
) -> dict[str, dict[str, Any]]:
    results = {}
    for stage, (observations, scorer) in stages.items():
        if not observations:
            continue
        if attack.name == "label_leakage" and observations[0].grad is None:
            continue
        results[stage] = score_stage(attack, observations, scorer)
    return results


def score_attacks(
    attacks: Sequence[Attack],
    knowledge: Knowledge,
    stages: Mapping[str, tuple[Sequence[Observation], Scorer]],
) -> dict[str, dict[str, dict[str, Any]]]:
    """{attack: {stage: score summary}}: each attack fitted once, scored on every stage it
    applies to (label leakage only where gradients were released); the learned inversion
    also after self-training on everything recorded (``learned_inversion_adapted``)."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for attack in attacks:
        attack.fit(knowledge)
        results[attack.name] = _score(attack, stages)
        if isinstance(attack, LearnedInversion):
            adapted = copy.deepcopy(attack)
            adapted.adapt([o for observations, _ in stages.values() for o in observations])
            results[f"{attack.name}_adapted"] = _score(adapted, stages)
    return results


def chance_tokens(rows: Sequence[tuple[list[int], list[int]]]) -> float:
    """Token accuracy of always guessing the most frequent token."""
    counts = torch.bincount(torch.tensor([t for ids, _ in rows for t in ids]))
    return float(counts.max()) / float(counts.sum()) if counts.numel() else math.nan


@dataclass
class Measurement:
    """What ``splitfed privacy attack`` reports."""

    results: dict[str, dict[str, dict[str, Any]]]
    chance_fields: float | None
    chance_tokens: float
    records: int
    perturbed: dict[str, bool]

    def to_json(self) -> dict[str, Any]:
        return {
            "attacks": self.results,
            "chance": {
                "field_exact_match": self.chance_fields,
                "token_accuracy": self.chance_tokens,
            },
            "records": self.records,
            "perturbed": self.perturbed,
        }


def measure(
    setup: SplitSetup,
    private: Sequence[PrivateRecord],
    public: Sequence[PrivateRecord],
    tokenizer: Any,
    *,
    adapter: Mapping[str, torch.Tensor] | None = None,
    batch_size: int = 8,
    max_length: int = 512,
    chat_template: bool = True,
    perturb_generation: bool = False,
    attacks: Sequence[str] = ATTACK_NAMES,
) -> Measurement:
    """What a curious backbone recovers from one epoch of training on ``private`` and one
    generation prefill of each of its prompts, with the client's ``setup`` (and its trained
    ``adapter``, if given: the attacker's copy of the head is then stale)."""
    split = LocalSplit(setup)
    if adapter:
        for part in (split.head, split.tail):
            load_adapter_state(part, adapter)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    rows = encoded(private, tokenizer, max_length, chat_template=chat_template)
    training: list[Observation] = []
    for release, micro in enumerate(batches(rows, pad, batch_size), start=1):
        split.forward_backward([micro], training.append, "training", release=release)
    generation: list[Observation] = []
    prefills = prompts(private, tokenizer, max_length, chat_template=chat_template)
    split.forward_only(
        batches(prefills, pad, batch_size),
        generation.append,
        GENERATION,
        perturb=perturb_generation,
    )
    public_rows = encoded(public, tokenizer, max_length, chat_template=chat_template)
    public_batches = batches(public_rows, pad, batch_size)
    knowledge = Knowledge(setup.model_path, setup.k, setup.m, setup.perturbation, public_batches)
    scorer = Scorer(tokenizer, private, max_length, chat_template=chat_template)
    stages = {"training": (training, scorer), GENERATION: (generation, scorer)}
    chosen = make_attacks(attacks, len(tokenizer), setup)
    results = score_attacks(chosen, knowledge, stages)
    marked = any(r.sensitive for r in public) and any(r.sensitive for r in private)
    return Measurement(
        results,
        chance_rate(public, private) if marked else None,
        chance_tokens(rows),
        len(private),
        {"training": setup.perturbation.hidden_enabled, GENERATION: perturb_generation},
    )


def make_attacks(names: Iterable[str], vocab_size: int, setup: SplitSetup) -> list[Attack]:
    """The attacks of ``names`` (see :data:`ATTACK_NAMES`) against ``setup``'s model."""
    made: list[Attack] = []
    for name in names:
        if name == "learned_inversion":
            made.append(LearnedInversion(vocab_size))
        elif name == "nearest_embedding":
            made.append(NearestEmbedding(embedding_matrix(setup.model_path, setup.k, setup.m)))
        elif name == "label_leakage":
            made.append(LabelLeakage(vocab_size))
        else:
            raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACK_NAMES)}")
    return made
