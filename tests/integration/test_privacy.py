"""The privacy harness measures what a real backbone receives: its in-process split
releases the very tensors that SplitTrainer sends over mTLS, and ``splitfed privacy``
runs from a client config."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from backbone_kit import Deployment, deployment
from click.testing import CliRunner
from transformers import AutoTokenizer

from splitfed.cli import cli
from splitfed.clients import backbone as backbone_client
from splitfed.clients.data import MicroBatches, read_examples
from splitfed.clients.trainer import SplitTrainer, TrainSettings
from splitfed.models.adapters import AdapterSettings
from splitfed.models.optim import OptimizerSettings
from splitfed.models.tiny import BUNDLED_DATASET
from splitfed.privacy.observe import LocalSplit, Observation, SplitSetup
from splitfed.privacy.records import make_corpora, write_records
from splitfed.security.perturbation import PerturbationSettings

ADAPTER = AdapterSettings(kind="lora", r=4, alpha=8, seed=5)
OPTIMIZER = OptimizerSettings(learning_rate=1e-2)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = deployment(tmp_path_factory.mktemp("backbone"))
    dep.start()
    yield dep
    dep.stop()


@pytest.mark.parametrize("protected", [False, True], ids=["plain", "perturbed"])
def test_local_split_releases_what_the_backbone_receives(
    backbone: Deployment, monkeypatch: pytest.MonkeyPatch, protected: bool
) -> None:
    perturbation = (
        PerturbationSettings(
            clip_norm=0.5,
            noise_multiplier=0.3,
            grad_clip_norm=0.01,
            grad_noise_multiplier=0.5,
            seed=99,
        )
        if protected
        else PerturbationSettings()
    )
    settings = TrainSettings(
        data=BUNDLED_DATASET,
        model_path=backbone.model_path,
        k=1,
        m=1,
        batch_size=4,
        accumulation=2,
        max_steps=1,
        max_length=64,
        seed=11,
        perturbation=perturbation,
    )
    sent: list[tuple[str, torch.Tensor]] = []
    original = backbone_client._Stream.send_tensor

    def recording(self: Any, tensor: torch.Tensor, name: str, *args: Any, **kwargs: Any) -> Any:
        sent.append((name, tensor.detach().clone()))
        return original(self, tensor, name, *args, **kwargs)

    monkeypatch.setattr(backbone_client._Stream, "send_tensor", recording)
    channel, client = backbone.connect()
    with channel:
        trainer = SplitTrainer(client, settings, ADAPTER, OPTIMIZER)
        trainer.start()
        trainer.train_step()
        trainer.close(delete_session=True)
    monkeypatch.undo()

    setup = SplitSetup(
        backbone.model_path, 1, 1, ADAPTER, OPTIMIZER, perturbation, settings.max_grad_norm
    )
    split = LocalSplit(setup, sample_rate=trainer.sample_rate())
    tokenizer = AutoTokenizer.from_pretrained(str(backbone.model_path))
    data = MicroBatches(
        read_examples(BUNDLED_DATASET),
        tokenizer,
        batch_size=4,
        accumulation=2,
        max_length=64,
        seed=11,
    )
    seen: list[Observation] = []
    split.train_step([(data.indices(i), data.batch(i)) for i in range(2)], seen.append)

    hidden = [t for name, t in sent if name == "h1"]
    masks = [t for name, t in sent if name == "attention_mask"]
    grads = [t for name, t in sent if name == "grad_h2"]
    assert len(seen) == len(hidden) == len(grads) == 2
    for observation, h1, mask, grad in zip(seen, hidden, masks, grads, strict=True):
        torch.testing.assert_close(observation.hidden, h1, atol=0, rtol=0)
        torch.testing.assert_close(observation.mask.to(torch.int8), mask, atol=0, rtol=0)
        assert observation.grad is not None
        torch.testing.assert_close(observation.grad, grad, atol=1e-6, rtol=1e-5)
    if protected:
        for observation in seen:
            real = observation.mask.bool()
            norms = observation.hidden[real].norm(dim=-1)
            assert float(norms.min()) > 0.5  # clipped to 0.5, and noise on top
            assert float(observation.hidden[~real].abs().sum()) == 0.0  # padding: zeros


def test_privacy_attack_command(backbone: Deployment, tmp_path: Path) -> None:
    corpora = make_corpora(60, 16, 4, seed=2)
    public = write_records(tmp_path / "public.jsonl", corpora.public)
    private = write_records(tmp_path / "train.jsonl", corpora.train)
    config = tmp_path / "client.toml"
    config.write_text(
        '[backbone]\naddress = "127.0.0.1:1"\ninsecure = true\n'
        f'[training]\ndata = "{private}"\nmodel_path = "{backbone.model_path}"\n'
        "k = 1\nm = 1\nbatch_size = 4\nmax_length = 96\n"
        "[training.perturbation]\nclip_norm = 1.0\nnoise_multiplier = 0.5\n"
    )
    out = tmp_path / "attack.json"
    result = CliRunner().invoke(
        cli,
        ["privacy", "attack", "--config", str(config), "--public", str(public),
         "--json", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "learned_inversion" in result.output and "label_leakage" in result.output
    report = json.loads(out.read_text())
    assert report["records"] == 16
    assert report["perturbed"] == {"training": True, "generation": False}
    stages = report["attacks"]["learned_inversion"]
    assert set(stages) == {"training", "generation"}
    assert 0 <= stages["training"]["token_accuracy"] <= 1
    assert report["chance"]["field_exact_match"] is not None

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    refused = CliRunner().invoke(
        cli, ["privacy", "attack", "--config", str(config), "--public", str(empty)]
    )
    assert refused.exit_code == 2 and "empty.jsonl holds no examples" in refused.output

    missing = CliRunner().invoke(
        cli, ["privacy", "attack", "--config", str(config), "--public", str(tmp_path / "no")]
    )
    assert missing.exit_code == 2 and "error:" in missing.output
