"""Split training over real loopback mTLS streams, backbone in its own process, equals
centralized training of the unsplit model (same init, data order and optimizer)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from backbone_kit import Centralized, Deployment, deployment

from splitfed.clients.trainer import SplitTrainer, TrainSettings
from splitfed.models.adapters import AdapterSettings
from splitfed.models.optim import (
    OptimizerSettings,
)
from splitfed.models.tiny import BUNDLED_DATASET

STEPS = 20
OPTIMIZER = OptimizerSettings(
    learning_rate=1e-2, schedule="linear", warmup_steps=3, total_steps=STEPS
)
ATOL = 1e-4


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = deployment(tmp_path_factory.mktemp("backbone"))
    dep.start()
    yield dep
    dep.stop()


def settings(dep: Deployment, **overrides: Any) -> TrainSettings:
    values: dict[str, Any] = {
        "data": BUNDLED_DATASET,
        "model_path": dep.model_path,
        "k": 1,
        "m": 2,
        "batch_size": 4,
        "accumulation": 2,
        "max_steps": STEPS,
        "max_length": 64,
        "max_grad_norm": 1.0,
        "seed": 11,
    }
    values.update(overrides)
    return TrainSettings(**values)


@pytest.mark.slow
@pytest.mark.parametrize(
    "adapter",
    [
        AdapterSettings(kind="lora", r=4, alpha=8, seed=5),
        AdapterSettings(kind="prefix", prefix_length=4, seed=5),
    ],
    ids=["lora", "p-tuning-v2"],
)
def test_split_training_equals_centralized_training(
    backbone: Deployment, adapter: AdapterSettings
) -> None:
    train = settings(backbone)
    channel, client = backbone.connect()
    with channel:
        trainer = SplitTrainer(client, train, adapter, OPTIMIZER)
        reports = trainer.run()
        split_adapter = {
            **trainer.adapter_tensors(),
            **client.export_adapter(trainer.session.session_id),
        }  # type: ignore[union-attr]
        trainer.close(delete_session=True)
    reference = Centralized(backbone, train, adapter, OPTIMIZER)
    expected_losses = reference.run(STEPS)
    torch.testing.assert_close(
        torch.tensor([r.loss for r in reports]), torch.tensor(expected_losses), atol=ATOL, rtol=0
    )
    assert expected_losses[-1] < expected_losses[0]  # it learned something
    expected = reference.final()
    assert set(split_adapter) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(split_adapter[name], tensor, atol=ATOL, rtol=0, msg=name)
