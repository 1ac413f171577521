"""Releases by kind (training, evaluation, generation) in the client's one privacy budget:
the settings, the ledger and its file, the perturbed generation stage against a body run
in this process, and the status line (security/releases.py, docs/privacy.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from backbone_kit import tiny_checkpoint
from helpers import opacus_epsilon

from splitfed.cli.status import privacy_line
from splitfed.clients.app import ClientConfig, ReleasedStage
from splitfed.models.generation import LocalStage, SamplingOptions, SplitGenerator
from splitfed.models.loading import load_body, load_head, load_tail
from splitfed.models.tiny import BUNDLED_DATASET
from splitfed.security.perturbation import (
    GENERATION_STREAM,
    PerturbationSettings,
    Perturber,
    composed_noise_multiplier,
    perturb_hidden,
)
from splitfed.security.releases import (
    EVALUATION,
    GENERATION,
    TRAINING,
    PrivacyLedger,
    load_summary,
    perturbs,
    protects,
)

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")

NOISY = PerturbationSettings(
    clip_norm=0.5, noise_multiplier=1.1, grad_clip_norm=0.1, grad_noise_multiplier=2.0
)


# --- settings ----------------------------------------------------------------------------


def test_defaults_perturb_evaluation_and_not_generation() -> None:
    settings = PerturbationSettings(clip_norm=1.0, noise_multiplier=1.0)
    assert settings.evaluation and not settings.generation
    assert perturbs(settings, TRAINING) and perturbs(settings, EVALUATION)
    assert not perturbs(settings, GENERATION)
    assert protects(settings, EVALUATION) and not protects(settings, GENERATION)
    generating = PerturbationSettings(clip_norm=1.0, noise_multiplier=1.0, generation=True)
    assert protects(generating, GENERATION)
    # Clipped but not noised: perturbed, yet nothing is protected.
    clipped = PerturbationSettings(clip_norm=1.0, generation=True)
    assert perturbs(clipped, GENERATION) and not protects(clipped, GENERATION)
    # Gradients only: the hidden states of evaluation travel as they are.
    gradients = PerturbationSettings(grad_clip_norm=1.0, grad_noise_multiplier=1.0)
    assert not perturbs(gradients, EVALUATION)
    with pytest.raises(ValueError, match="unknown kind of release 'chat'"):
        perturbs(settings, "chat")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"generation": True}, "generation = true needs clip_norm > 0"),
        ({"clip_norm": 1.0, "evaluation": "yes"}, "evaluation must be true or false"),
        ({"clip_norm": 1.0, "generation": 1}, "generation must be true or false"),
    ],
)
def test_invalid_release_settings(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PerturbationSettings(**values)


def client_config(path: Path, text: str) -> ClientConfig:
    path.write_text(text.replace("DATA", str(BUNDLED_DATASET)))
    return ClientConfig.load(path)


def test_toml_and_yaml_configs_set_the_release_kinds(tmp_path: Path) -> None:
    toml = client_config(
        tmp_path / "client.toml",
        '[backbone]\naddress = "127.0.0.1:50051"\ninsecure = true\n'
        '[training]\ndata = "DATA"\nmodel_path = "model"\n'
        "[training.perturbation]\nclip_norm = 1.0\nnoise_multiplier = 0.5\n"
        "evaluation = false\ngeneration = true\n",
    )
    yaml = client_config(
        tmp_path / "client.yaml",
        "backbone:\n  address: 127.0.0.1:50051\n  insecure: true\n"
        "training:\n  data: DATA\n  model_path: model\n"
        "  perturbation:\n    clip_norm: 1.0\n    noise_multiplier: 0.5\n"
        "    evaluation: false\n    generation: true\n",
    )
    expected = PerturbationSettings(
        clip_norm=1.0, noise_multiplier=0.5, evaluation=False, generation=True
    )
    assert toml.training.perturbation == yaml.training.perturbation == expected


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('generation = "yes"\n', r"\[training\] \[perturbation\] generation: expected true or"),
        ("evaluation = 1\n", r"\[training\] \[perturbation\] evaluation: expected true or"),
        ("generation = true\n", r"\[training\] \[perturbation\] generation = true needs clip_"),
    ],
)
def test_config_errors_name_the_release_field(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        client_config(
            tmp_path / "client.toml",
            '[backbone]\naddress = "127.0.0.1:50051"\ninsecure = true\n'
            '[training]\ndata = "DATA"\nmodel_path = "model"\n'
            f"[training.perturbation]\n{section}",
        )


# --- the ledger --------------------------------------------------------------------------


def test_every_kind_composes_into_one_epsilon_as_opacus_computes_it() -> None:
    settings = PerturbationSettings(
        clip_norm=0.5,
        noise_multiplier=1.1,
        grad_clip_norm=0.1,
        grad_noise_multiplier=2.0,
        generation=True,
    )
    ledger = PrivacyLedger(settings, sample_rate=0.05)
    for _ in range(6):
        ledger.record(TRAINING)
    assert ledger.record(EVALUATION) == 1
    for index in range(4):  # one generation call: the prompt, then three new tokens
        assert ledger.record(GENERATION, call=index == 0) == 1
    ledger.record(TRAINING)
    sigma_eff = composed_noise_multiplier(1.1, 2.0)
    # Interleaved as they happened: composition does not depend on the order.
    expected = opacus_epsilon(
        [(sigma_eff, 0.05, 6), (1.1, 1.0, 1), (1.1, 1.0, 4), (sigma_eff, 0.05, 1)], 1e-5
    )
    spent = ledger.spent()
    assert spent.epsilon == pytest.approx(expected, rel=1e-9)
    assert spent.steps == 12
    # One training step is what it cost before (the step of the training mechanism).
    assert spent.step_epsilon == pytest.approx(opacus_epsilon([(sigma_eff, 0.05, 1)], 1e-5))
    assert ledger.counts == {
        TRAINING: {"protected": 7, "clear": 0, "protected_calls": 7, "clear_calls": 0},
        EVALUATION: {"protected": 1, "clear": 0, "protected_calls": 1, "clear_calls": 0},
        GENERATION: {"protected": 4, "clear": 0, "protected_calls": 1, "clear_calls": 0},
    }


def test_releases_without_noise_are_counted_apart_and_leave_epsilon_alone() -> None:
    settings = PerturbationSettings(clip_norm=0.5, noise_multiplier=1.1, evaluation=False)
    ledger = PrivacyLedger(settings, sample_rate=0.1)
    for _ in range(3):
        ledger.record(TRAINING)
    ledger.record(EVALUATION)
    for _ in range(2):
        for index in range(5):
            ledger.record(GENERATION, call=index == 0)
    # A sender that does not perturb (splitfed evaluate) is clear whatever the settings.
    ledger.record(TRAINING)
    assert PrivacyLedger(settings).record(EVALUATION, perturbed=True) == 1
    assert ledger.spent().epsilon == pytest.approx(opacus_epsilon([(1.1, 0.1, 4)], 1e-5))
    assert ledger.counts[EVALUATION] == {
        "protected": 0,
        "clear": 1,
        "protected_calls": 0,
        "clear_calls": 1,
    }
    assert ledger.counts[GENERATION]["clear"] == 10
    assert ledger.counts[GENERATION]["clear_calls"] == 2
    assert ledger.covered() == {TRAINING: 4, EVALUATION: 0, GENERATION: 0}


def test_training_without_noise_stays_infinite() -> None:
    ledger = PrivacyLedger(PerturbationSettings(clip_norm=1.0), sample_rate=0.1)
    ledger.record(TRAINING)
    assert math.isinf(ledger.spent().epsilon)
    assert ledger.counts[TRAINING]["clear"] == 1


def test_processes_of_one_client_add_up_in_its_file(tmp_path: Path) -> None:
    settings = PerturbationSettings(clip_norm=0.5, noise_multiplier=1.5, generation=True)
    trainer = PrivacyLedger(settings, sample_rate=0.1, directory=tmp_path)
    generator = PrivacyLedger(settings, directory=tmp_path)  # another process
    trainer.record(TRAINING)
    assert generator.record(GENERATION) == 1
    generator.record(GENERATION, call=False)
    trainer.record(TRAINING)
    assert generator.record(GENERATION) == 2  # a second call never reuses the first's number
    expected = opacus_epsilon([(1.5, 0.1, 2), (1.5, 1.0, 3)], 1e-5)
    saved = json.loads((tmp_path / "privacy.json").read_text())
    assert sorted(map(tuple, saved["history"])) == [(1.5, 0.1, 2), (1.5, 1.0, 3)]
    assert saved["releases"][GENERATION] == {
        "protected": 3,
        "clear": 0,
        "protected_calls": 2,
        "clear_calls": 0,
    }
    summary = load_summary(tmp_path, settings)
    assert summary["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert summary["steps"] == 5
    # A restarted process reads it all back.
    assert PrivacyLedger(settings, directory=tmp_path).spent().epsilon == summary["epsilon"]
    assert load_summary(tmp_path / "none", settings) == {}


def test_a_file_from_before_the_counts_reads_as_training(tmp_path: Path) -> None:
    (tmp_path / "privacy.json").write_text(json.dumps({"history": [[1.2, 0.1, 7]]}))
    ledger = PrivacyLedger(NOISY, directory=tmp_path)
    assert ledger.counts[TRAINING] == {
        "protected": 7,
        "clear": 0,
        "protected_calls": 7,
        "clear_calls": 0,
    }
    assert ledger.spent().steps == 7
    (tmp_path / "privacy.json").write_text(
        json.dumps({"history": [], "releases": {"chat": {"clear": 1}}})
    )
    with pytest.raises(ValueError, match="unknown kind of release 'chat'"):
        PrivacyLedger(NOISY, directory=tmp_path)


# --- generation through a perturbing stage, the body in this process --------------------


class Recording:
    """A body stage in this process that keeps what it is sent."""

    def __init__(self, body: LocalStage) -> None:
        self.body = body
        self.sent: list[tuple[torch.Tensor, torch.Tensor]] = []

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.sent.append((hidden.clone(), attention_mask.clone()))
        return self.body.step(hidden, attention_mask)

    def reset(self) -> None:
        self.body.reset()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model"), layers=4, hidden_size=32)


IDS = torch.tensor([[0, 0, 5, 17, 42, 9], [3, 8, 13, 21, 34, 55]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
OPTIONS = SamplingOptions(max_new_tokens=6)


def split_generator(
    model_path: Path, settings: PerturbationSettings | None, ledger: PrivacyLedger | None = None
) -> tuple[SplitGenerator, list[tuple[torch.Tensor, torch.Tensor]], Any]:
    recording = Recording(LocalStage(load_body(model_path, 1, 1)))
    body: Any = recording
    if settings is not None:
        ledger = ledger or PrivacyLedger(settings)
        perturber = Perturber(settings) if perturbs(settings, GENERATION) else None
        body = ReleasedStage(recording, ledger, perturber, GENERATION)
    head, tail = load_head(model_path, 1, 1), load_tail(model_path, 1, 1)
    return SplitGenerator(head, body, tail), recording.sent, body


def test_generation_off_sends_exactly_what_it_did_and_counts_it_clear(model_path: Path) -> None:
    plain, plain_sent, _ = split_generator(model_path, None)
    settings = PerturbationSettings(clip_norm=1e-3, noise_multiplier=5.0, seed=1)
    off, off_sent, stage = split_generator(model_path, settings)
    expected = plain.generate(IDS, MASK, OPTIONS)
    assert torch.equal(off.generate(IDS, MASK, OPTIONS), expected)
    assert len(off_sent) == len(plain_sent) == OPTIONS.max_new_tokens
    for (got, _), (want, _) in zip(off_sent, plain_sent, strict=True):
        assert torch.equal(got, want)
    assert stage.ledger.counts[GENERATION] == {
        "protected": 0,
        "clear": OPTIONS.max_new_tokens,
        "protected_calls": 0,
        "clear_calls": 1,
    }
    assert stage.ledger.spent().steps == 0


def test_generation_on_sends_clipped_and_noised_vectors_at_every_step(model_path: Path) -> None:
    settings = PerturbationSettings(clip_norm=0.05, noise_multiplier=0.7, seed=3, generation=True)
    plain, _, _ = split_generator(model_path, None)
    noisy, noisy_sent, stage = split_generator(model_path, settings)
    tokens = noisy.generate(IDS, MASK, OPTIONS)
    assert len(noisy_sent) == tokens.shape[1] == OPTIONS.max_new_tokens
    # What the head computed at each step (the tokens chosen under noise, without it).
    plain.head.reset()
    step_input, mask = IDS, MASK
    perturber = Perturber(settings)
    for index, (sent, sent_mask) in enumerate(noisy_sent):
        assert torch.equal(sent_mask, mask)
        hidden = plain.head.step(step_input, mask)
        positions = mask[:, mask.shape[1] - hidden.shape[1] :]
        generator = perturber.generator(GENERATION_STREAM, 1, index, hidden.device)
        expected = perturb_hidden(hidden, positions, 0.05, 0.7, generator)
        torch.testing.assert_close(sent, expected, rtol=0, atol=1e-6)
        step_input = tokens[:, index : index + 1]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    # Left padding of the prompt is sent as zeros.
    assert torch.equal(noisy_sent[0][0][0, :2], torch.zeros_like(noisy_sent[0][0][0, :2]))
    counts = stage.ledger.counts[GENERATION]
    assert (counts["protected"], counts["protected_calls"]) == (OPTIONS.max_new_tokens, 1)
    assert stage.ledger.spent().epsilon == pytest.approx(
        opacus_epsilon([(0.7, 1.0, OPTIONS.max_new_tokens)], 1e-5), rel=1e-9
    )


def test_clipping_bounds_every_generated_position(model_path: Path) -> None:
    settings = PerturbationSettings(clip_norm=0.01, generation=True)  # clipped, no noise
    noisy, sent, _ = split_generator(model_path, settings)
    noisy.generate(IDS, MASK, OPTIONS)
    for hidden, mask in sent:
        norms = torch.linalg.vector_norm(hidden.float(), dim=-1)
        positions = mask[:, mask.shape[1] - hidden.shape[1] :].bool()
        assert bool((norms <= 0.01 * (1 + 1e-5)).all())
        assert bool((norms[positions] > 0.01 * 0.99).all())  # the head's vectors are longer
        assert bool((norms[~positions] == 0).all())


def test_each_call_draws_fresh_noise(model_path: Path) -> None:
    settings = PerturbationSettings(clip_norm=0.05, noise_multiplier=1.0, seed=3, generation=True)
    noisy, sent, stage = split_generator(model_path, settings)
    noisy.generate(IDS, MASK, OPTIONS)
    first = sent[0][0]
    sent.clear()
    noisy.generate(IDS, MASK, OPTIONS)
    assert not torch.equal(sent[0][0], first)  # same prompt, new noise
    assert stage.ledger.counts[GENERATION]["protected_calls"] == 2
    # The noise's scale at the prompt's real positions: sigma * C per coordinate (the
    # clipped signal adds at most C^2 / d of variance).
    real = sent[0][0][MASK.bool()]
    assert float(real.std()) == pytest.approx(0.05, rel=0.15)


# --- the status line ---------------------------------------------------------------------


def test_status_line_says_what_is_covered_and_what_went_in_the_clear() -> None:
    counts = {
        TRAINING: {"protected": 100, "clear": 0, "protected_calls": 100, "clear_calls": 0},
        EVALUATION: {"protected": 20, "clear": 0, "protected_calls": 20, "clear_calls": 0},
        GENERATION: {"protected": 0, "clear": 37, "protected_calls": 0, "clear_calls": 5},
    }
    privacy = {"epsilon": 3.2, "delta": 1e-05, "steps": 120, "releases": counts}
    assert privacy_line(privacy) == (
        "privacy spent: epsilon 3.2 at delta 1e-05 over 120 releases (training 100, "
        "evaluation 20); generation: 5 calls sent without noise (not covered)"
    )
    counts[GENERATION] = {"protected": 12, "clear": 0, "protected_calls": 2, "clear_calls": 0}
    counts[EVALUATION] = {"protected": 0, "clear": 1, "protected_calls": 0, "clear_calls": 1}
    privacy |= {"steps": 112}
    assert privacy_line(privacy) == (
        "privacy spent: epsilon 3.2 at delta 1e-05 over 112 releases (training 100, "
        "generation 12 in 2 calls); evaluation: 1 pass sent without noise (not covered)"
    )
