"""Generation and evaluation releases against a real backbone (its own process, mTLS):
what generation sends over the Generate stream is perturbed with ``generation = true``
and exactly as before without it, and training steps, an evaluation pass and a
generation call add up in the client's one budget, as opacus computes it independently
(security/releases.py, docs/privacy.md)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from backbone_kit import Deployment, deployment
from helpers import opacus_epsilon

from splitfed.cli.status import privacy_line, privacy_spent
from splitfed.clients import backbone as backbone_module
from splitfed.clients.app import ClientConfig, generate
from splitfed.clients.trainer import SplitTrainer, TrainSettings
from splitfed.models.adapters import AdapterSettings
from splitfed.models.generation import SamplingOptions
from splitfed.models.optim import OptimizerSettings
from splitfed.models.tiny import BUNDLED_DATASET
from splitfed.security.perturbation import PerturbationSettings, composed_noise_multiplier
from splitfed.serving import ConnectSettings

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")

ADAPTER = AdapterSettings(kind="lora", r=2, alpha=4, seed=1)
PROMPTS = ["Add 1 and 2.", "What is the capital of a country that has a long name?"]
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = deployment(tmp_path_factory.mktemp("backbone"), layers=4, hidden_size=64)
    dep.start()
    yield dep
    dep.stop()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What generation sends over the Generate stream: (h1, attention mask) per forward."""
    forwards: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = backbone_module.GenerateStream.forward

    def forward(self: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        forwards.append((hidden.detach().clone(), mask.clone()))
        return original(self, hidden, mask)

    monkeypatch.setattr(backbone_module.GenerateStream, "forward", forward)
    return forwards


def config(dep: Deployment, checkpoint: Path, perturbation: PerturbationSettings) -> ClientConfig:
    training = TrainSettings(
        data=BUNDLED_DATASET,
        eval_data=BUNDLED_DATASET,
        model_path=dep.model_path,
        k=1,
        m=1,
        batch_size=4,
        max_steps=2,
        max_length=48,
        eval_batches=2,
        seed=5,
        checkpoint_dir=checkpoint,
        perturbation=perturbation,
    )
    return ClientConfig(
        backbone=ConnectSettings(address=dep.address),
        training=training,
        adapter=ADAPTER,
        optimizer=OptimizerSettings(learning_rate=1e-3),
        generation=SamplingOptions(max_new_tokens=NEW_TOKENS),
    )


def test_training_evaluation_and_generation_add_up_in_one_budget(
    backbone: Deployment, tmp_path: Path, sent: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    perturbation = PerturbationSettings(
        clip_norm=0.05,
        noise_multiplier=1.2,
        grad_clip_norm=0.01,
        grad_noise_multiplier=1.5,
        seed=9,
        generation=True,
    )
    client_config = config(backbone, tmp_path / "checkpoint", perturbation)
    channel, client = backbone.connect()
    with channel:
        trainer = SplitTrainer(client, client_config.training, ADAPTER, client_config.optimizer)
        trainer.run()
        first = trainer.evaluate()
        second = trainer.evaluate()  # a second pass: counted again, with fresh noise
        assert math.isfinite(first) and first != second
        trainer.close()
        sample_rate = trainer.sample_rate()
        outputs = generate(client, client_config, PROMPTS)
    assert len(outputs) == len(PROMPTS)
    # The prompt, then one new token per step until the last (which is never sent).
    assert 1 <= len(sent) <= NEW_TOKENS
    assert sent[0][0].shape[1] == sent[0][1].shape[1] > 1
    assert all(hidden.shape[1] == 1 for hidden, _ in sent[1:])
    # Left padding goes as zeros; the real positions carry noise of scale sigma * C.
    prompt, mask = sent[0]
    assert not bool(mask.all())
    assert bool((prompt[~mask.bool()] == 0).all())
    values = torch.cat([prompt[mask.bool()].flatten()] + [h.flatten() for h, _ in sent[1:]])
    assert float(values.std()) == pytest.approx(1.2 * 0.05, rel=0.15)

    sigma_eff = composed_noise_multiplier(1.2, 1.5)
    expected = opacus_epsilon(
        [(sigma_eff, sample_rate, 2), (1.2, 1.0, 2), (1.2, 1.0, len(sent))], 1e-5
    )
    summary = privacy_spent(tmp_path / "checkpoint", perturbation)
    assert summary["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert summary["steps"] == 4 + len(sent)
    generation = f"{len(sent)} in 1 call" if len(sent) > 1 else "1"
    assert privacy_line(summary) == (
        f"privacy spent: epsilon {expected:.4g} at delta 1e-05 over {4 + len(sent)} "
        f"releases (training 2, evaluation 2, generation {generation})"
    )


def test_generation_off_sends_what_it_always_did_and_says_so(
    backbone: Deployment, tmp_path: Path, sent: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    noisy = PerturbationSettings(clip_norm=0.05, noise_multiplier=1.2, seed=9)  # generation off
    channel, client = backbone.connect()
    with channel:
        plain = generate(
            client, config(backbone, tmp_path / "plain", PerturbationSettings()), PROMPTS
        )
        plain_sent = list(sent)
        sent.clear()
        off = generate(client, config(backbone, tmp_path / "off", noisy), PROMPTS)
    assert off == plain
    assert len(sent) == len(plain_sent)
    for (got, _), (want, _) in zip(sent, plain_sent, strict=True):
        assert torch.equal(got, want)
    assert privacy_spent(tmp_path / "plain", PerturbationSettings()) == {}
    summary = privacy_spent(tmp_path / "off", noisy)
    assert summary["epsilon"] == 0 and summary["steps"] == 0
    assert summary["releases"]["generation"]["clear"] == len(sent)
    assert privacy_line(summary) == (
        "privacy spent: epsilon 0 at delta 1e-05 over 0 releases; "
        "generation: 1 call sent without noise (not covered)"
    )
