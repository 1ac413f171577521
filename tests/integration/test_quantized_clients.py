"""Client parts quantized ([training] quantization) on a quantized body ([backbone]
quantization) over real mTLS streams: training and generation run, the training checkpoint
records what its adapter was trained against, and a session that resumes it (training) or
runs it (generation) on a body quantized differently is warned about, naming both."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from backbone_kit import Deployment, deployment
from transformers import AutoTokenizer

from splitfed.clients.app import ClientConfig, prompt_ids, split_session
from splitfed.clients.trainer import SplitTrainer, TrainSettings
from splitfed.models.adapters import AdapterSettings
from splitfed.models.generation import SamplingOptions, SplitGenerator
from splitfed.models.optim import OptimizerSettings
from splitfed.models.quantization import quantization_of
from splitfed.models.tiny import BUNDLED_DATASET
from splitfed.serving import ConnectSettings

ADAPTER = AdapterSettings(kind="lora", r=2, alpha=4, seed=1)
OPTIMIZER = OptimizerSettings(learning_rate=1e-2)
MISMATCH = (
    "the adapter was trained against an int8 body but this backbone serves nf4: "
    "its outputs will differ"
)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # Hidden size 64: NF4 quantizes blocks of 64 weights.
    root = tmp_path_factory.mktemp("backbone")
    dep = deployment(root, layers=4, hidden_size=64, quantization="nf4")
    dep.start()
    yield dep
    dep.stop()


def settings(dep: Deployment, checkpoint: Path) -> TrainSettings:
    return TrainSettings(
        data=BUNDLED_DATASET,
        model_path=dep.model_path,
        k=1,
        m=1,
        batch_size=2,
        max_steps=2,
        max_length=32,
        chat_template=False,
        quantization="int8",
        checkpoint_dir=checkpoint,
    )


def resume(dep: Deployment, train: TrainSettings) -> None:
    channel, client = dep.connect()
    with channel:
        trainer = SplitTrainer(client, train, ADAPTER, OPTIMIZER)
        trainer.start()
        trainer.close()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.slow
def test_quantized_parts_on_a_quantized_body_and_what_they_trained_against(
    backbone: Deployment, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train = settings(backbone, tmp_path / "checkpoint")
    channel, client = backbone.connect()
    with channel:
        trainer = SplitTrainer(client, train, ADAPTER, OPTIMIZER)
        reports = trainer.run()
        assert trainer.session is not None and trainer.session.info.quantization == "nf4"
        assert quantization_of(trainer.head) == quantization_of(trainer.tail) == "int8"
        trainer.close()
    assert [r.step for r in reports] == [1, 2] and all(math.isfinite(r.loss) for r in reports)
    state_file = tmp_path / "checkpoint" / "client.json"
    state = json.loads(state_file.read_text())
    assert (state["body_quantization"], state["quantization"]) == ("nf4", "int8")

    with caplog.at_level(logging.WARNING):
        resume(backbone, train)  # the same body: nothing to say
    assert not [w for w in warnings_of(caplog) if "trained against" in w]

    # As if the adapter had been trained against an int8 body.
    state["body_quantization"] = "int8"
    state_file.write_text(json.dumps(state))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resume(backbone, train)
    assert [w for w in warnings_of(caplog) if w.startswith("[trainer]") and w.endswith(MISMATCH)]

    # Generation with the checkpoint's adapter: the same warning, and it runs.
    config = ClientConfig(
        backbone=ConnectSettings(address=backbone.address),
        training=train,
        adapter=ADAPTER,
        optimizer=OPTIMIZER,
        generation=SamplingOptions(max_new_tokens=3),
    )
    tokenizer = AutoTokenizer.from_pretrained(str(backbone.model_path), local_files_only=True)
    ids, mask = prompt_ids(tokenizer, ["Add 1 and 2."], chat_template=False)
    caplog.clear()
    channel, client = backbone.connect()
    with caplog.at_level(logging.WARNING), channel, split_session(client, config) as split:
        assert split.trained and quantization_of(split.head) == "int8"
        tokens = SplitGenerator(split.head, split.body(), split.tail).generate(
            ids, mask, config.generation
        )
    assert tokens.shape == (1, 3)
    assert f"[generate] {MISMATCH}" in warnings_of(caplog)
