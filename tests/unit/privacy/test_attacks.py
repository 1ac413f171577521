"""The attacks on a tiny model: real (they recover an unprotected client's tokens), and
defeated by enough noise; the in-process split trains and keeps each stage's releases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
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
    GENERATION,
    TRAIN_END,
    TRAIN_START,
    encoded,
    fine_tune,
    prompts,
    score_attacks,
)
from splitfed.privacy.observe import LocalSplit, Observation, SplitSetup, batches
from splitfed.privacy.records import Corpora, make_corpora
from splitfed.privacy.scoring import Scorer
from splitfed.security.perturbation import PerturbationSettings

MAX_LENGTH = 96


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Corpora]:
    corpora = make_corpora(120, 24, 8, seed=4)
    texts = [r.prompt + "\n" + r.response for r in corpora.public]
    path = make_tiny_checkpoint(
        tmp_path_factory.mktemp("model"), texts, layers=4, hidden_size=32, seed=1
    )
    return path, AutoTokenizer.from_pretrained(str(path)), corpora


def knowledge(world: Any, perturbation: PerturbationSettings, k: int = 1) -> Knowledge:
    path, tokenizer, corpora = world
    public = encoded(corpora.public, tokenizer, MAX_LENGTH, chat_template=False)
    return Knowledge(path, k, 1, perturbation, batches(public, 0, 16))


def releases(world: Any, perturbation: PerturbationSettings) -> list[Observation]:
    """What the backbone receives of the private notes under the public head."""
    path, tokenizer, corpora = world
    split = LocalSplit(SplitSetup(path, 1, 1, AdapterSettings(r=4), perturbation=perturbation))
    rows = encoded(corpora.train, tokenizer, MAX_LENGTH, chat_template=False)
    seen: list[Observation] = []
    for release, micro in enumerate(batches(rows, 0, 8), start=1):
        split.forward_backward([micro], seen.append, release=release)
    return seen


def recovered(world: Any, attack: Any, seen: list[Observation]) -> dict[str, Any]:
    _, tokenizer, corpora = world
    scorer = Scorer(tokenizer, corpora.train, MAX_LENGTH, chat_template=False)
    for o in seen:
        scorer.add(o.examples, o.input_ids, attack.predict(o))
    return scorer.score.summary()


def test_learned_inversion_recovers_an_unprotected_client(world: Any) -> None:
    attack = LearnedInversion(len(world[1]), epochs=4)
    attack.fit(knowledge(world, PerturbationSettings()))
    score = recovered(world, attack, releases(world, PerturbationSettings()))
    assert score["token_accuracy"] > 0.9
    assert score["field_exact_match"] > 0.5


def test_noise_defeats_the_learned_inversion(world: Any) -> None:
    noisy = PerturbationSettings(clip_norm=1.0, noise_multiplier=20.0, seed=3)
    attack = LearnedInversion(len(world[1]), epochs=4)
    attack.fit(knowledge(world, noisy))
    score = recovered(world, attack, releases(world, noisy))
    assert score["token_accuracy"] < 0.3  # about the most frequent tokens' share
    assert score["field_exact_match"] < 0.05


def test_nearest_embedding_inverts_the_embedding_output_exactly(world: Any) -> None:
    path = world[0]
    table = embedding_matrix(path, 1, 1)
    seen = releases(world, PerturbationSettings())
    as_embeddings = [
        Observation("k0", table[o.input_ids], o.mask, o.output, o.input_ids, o.labels, o.examples)
        for o in seen
    ]
    score = recovered(world, NearestEmbedding(table), as_embeddings)
    assert score["token_accuracy"] == 1.0 and score["field_exact_match"] == 1.0


def test_label_leakage_reads_the_targets_from_grad_h2(world: Any) -> None:
    attack = LabelLeakage(len(world[1]), epochs=4)
    attack.fit(knowledge(world, PerturbationSettings()))
    seen = releases(world, PerturbationSettings())
    prediction = attack.predict(seen[0])
    has_target = torch.zeros_like(seen[0].mask, dtype=torch.bool)
    has_target[:, 1:] = seen[0].labels[:, 1:] != -100
    assert bool((prediction[has_target] >= 0).all()) and bool((prediction[~has_target] < 0).all())
    score = recovered(world, attack, seen)
    assert score["token_accuracy"] > 0.5  # chance: about 1 / 10


def test_fine_tuning_keeps_each_stage_and_adapts_the_decoder(world: Any) -> None:
    path, tokenizer, corpora = world
    setup = SplitSetup(
        path, 1, 1, AdapterSettings(r=4, seed=2), OptimizerSettings(learning_rate=1e-2)
    )
    split = LocalSplit(setup)
    train = MicroBatches(
        [Example(r.prompt, r.response) for r in corpora.train],
        tokenizer,
        batch_size=8,
        max_length=MAX_LENGTH,
        chat_template=False,
    )
    evaluation = batches(encoded(corpora.eval, tokenizer, MAX_LENGTH, chat_template=False), 0, 8)
    generation = batches(prompts(corpora.eval, tokenizer, MAX_LENGTH, chat_template=False), 0, 8)
    run = fine_tune(split, train, evaluation, generation, steps=9)  # 3 epochs of 3 steps
    assert [len(run.observations[s]) for s in (TRAIN_START, TRAIN_END, GENERATION)] == [3, 3, 1]
    assert sorted(i for o in run.observations[TRAIN_START] for i in o.examples) == list(range(24))
    assert run.losses[-1] < run.losses[0]
    assert run.eval_loss == run.clean_eval_loss  # no perturbation: the same passes
    assert run.epsilon == float("inf")
    scorer = Scorer(tokenizer, corpora.train, MAX_LENGTH, chat_template=False)
    stages = {s: (run.observations[s], scorer) for s in (TRAIN_START, TRAIN_END)}
    results = score_attacks(
        [LearnedInversion(len(tokenizer), epochs=3)],
        knowledge(world, PerturbationSettings()),
        stages,
    )
    assert set(results) == {"learned_inversion", "learned_inversion_adapted"}
    for name in results:
        assert set(results[name]) == {TRAIN_START, TRAIN_END}
        assert results[name][TRAIN_START]["token_accuracy"] > 0.5


def test_the_attackers_own_noise_is_fresh_for_every_batch_and_draw(world: Any) -> None:
    path, tokenizer, corpora = world
    rows = encoded(corpora.public[:4], tokenizer, MAX_LENGTH, chat_template=False)
    twice = batches(rows, 0, 4) * 2  # the same batch twice, in each of two draws
    noisy = PerturbationSettings(clip_norm=1.0, noise_multiplier=1.0)
    seen = Knowledge(path, 1, 1, noisy, twice, noise_draws=2).observations()
    assert len(seen) == 4
    for i, first in enumerate(seen):
        for second in seen[i + 1 :]:
            assert not torch.equal(first.hidden, second.hidden)
