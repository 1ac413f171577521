"""A federation member's learning-rate schedule spans the federation (rounds x
local_steps from the aggregator's plan) unless [optimizer] total_steps says otherwise, and
``--max-steps`` is refused with [federated]: the plan decides how long a member trains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from splitfed.cli import cli
from splitfed.clients.app import ClientConfig
from splitfed.clients.federated import FederatedTrainer
from splitfed.clients.trainer import SplitTrainer
from splitfed.errors import InvalidArgumentError
from splitfed.models.optim import OptimizerSettings, build_optimizer
from splitfed.models.tiny import make_tiny_checkpoint
from splitfed.protocol.aggregator import Phase, RoundPlan
from splitfed.protocol.backbone import optimizer_from_proto, optimizer_to_proto

TEXTS = ["Add 1 and 2.", "The answer is 3."]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("schedule")
    model = make_tiny_checkpoint(root / "model", TEXTS, layers=3, hidden_size=16)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": t, "response": "3"}) + "\n" for t in TEXTS))
    return model, data


def config(files: tuple[Path, Path], optimizer: dict[str, Any], **extra: Any) -> dict[str, Any]:
    model, data = files
    return {
        "backbone": {"address": "127.0.0.1:7443", "tls_dir": str(model.parent)},
        "training": {"data": str(data), "model_path": str(model), "batch_size": 2},
        "adapter": {"r": 2, "alpha": 4.0, "seed": 7},
        "optimizer": optimizer,
        **extra,
    }


FEDERATED = {"federated": {"aggregator": "127.0.0.1:7445", "federation": "fed"}}


class FinishedAggregator:
    """An aggregator whose federation is already over: join, then the final version."""

    def __init__(self, rounds: int, local_steps: int) -> None:
        self.plan = RoundPlan(
            "fed", phase=Phase.FINISHED, rounds=rounds, local_steps=local_steps, adapter_seed=7
        )

    def join(self, federation: str, num_samples: int, join_token: str = "") -> RoundPlan:
        return self.plan

    def download(self, federation: str, version: int = 0, *, body: bool = False) -> Any:
        return 0, {}


def run_member(
    files: tuple[Path, Path], optimizer: dict[str, Any], rounds: int = 4, local_steps: int = 5
) -> OptimizerSettings:
    """The optimizer settings a member's trainer opens its backbone session with."""
    loaded = ClientConfig.from_mapping(config(files, optimizer, **FEDERATED))
    trainer = SplitTrainer(object(), loaded.training, loaded.adapter, loaded.optimizer)  # type: ignore[arg-type]
    opened: list[OptimizerSettings] = []
    trainer.start = lambda wait=False: opened.append(trainer.optimizer_settings)  # type: ignore[method-assign,assignment,misc]
    aggregator: Any = FinishedAggregator(rounds, local_steps)
    FederatedTrainer(trainer, aggregator, "fed").run()
    assert len(opened) == 1
    # The trainer's own scheduler decays over the same steps as the session's.
    lrs = []
    for _ in range(opened[0].total_steps or 1):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    lrs.append(trainer.optimizer.param_groups[0]["lr"])
    if opened[0].schedule == "cosine":
        assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    return opened[0]


def test_the_schedule_defaults_to_rounds_times_local_steps(files: tuple[Path, Path]) -> None:
    opened = run_member(files, {"learning_rate": 0.01, "schedule": "cosine"})
    assert opened.total_steps == 20
    assert opened.factor(10) == pytest.approx(0.5)


def test_an_explicit_total_steps_wins(files: tuple[Path, Path]) -> None:
    opened = run_member(files, {"learning_rate": 0.01, "schedule": "cosine", "total_steps": 8})
    assert opened.total_steps == 8
    assert run_member(files, {"learning_rate": 0.01}).total_steps == 0  # constant: no length


def test_a_schedule_the_federation_cannot_length_is_refused(files: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match=r"no round limit.*set \[optimizer\] total_steps"):
        run_member(files, {"learning_rate": 0.01, "schedule": "linear"}, rounds=0)
    warm = {"learning_rate": 0.01, "schedule": "linear", "warmup_steps": 20}
    with pytest.raises(ValueError, match="4 rounds x 5 local steps = 20 steps"):
        run_member(files, warm)


def test_alone_a_decaying_schedule_still_needs_total_steps(files: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match=r"needs total_steps.*only in a federation"):
        ClientConfig.from_mapping(config(files, {"schedule": "cosine"}))
    with pytest.raises(ValueError, match="needs total_steps"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimizerSettings(schedule="cosine"))
    # The backbone never opens a session whose schedule has no length.
    with pytest.raises(InvalidArgumentError, match="needs total_steps"):
        optimizer_from_proto(optimizer_to_proto(OptimizerSettings(schedule="linear")))


def test_max_steps_is_refused_in_a_federation(files: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "client.yaml"
    path.write_text(json.dumps(config(files, {}, **FEDERATED)))  # JSON is YAML
    result = CliRunner().invoke(cli, ["train", "--config", str(path), "--max-steps", "3"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        "error: --max-steps does not apply with [federated]: the aggregator's plan decides "
        "(rounds x local_steps; docs/federated.md)"
    )


def test_max_steps_in_the_file_is_ignored_with_a_warning(
    files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import splitfed.cli.train as train_command

    ran: list[ClientConfig] = []
    monkeypatch.setattr(train_command, "run_federated", ran.append)
    mapping = config(files, {}, **FEDERATED)
    mapping["training"]["max_steps"] = 3
    path = tmp_path / "client.yaml"
    path.write_text(json.dumps(mapping))
    result = CliRunner().invoke(cli, ["train", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert len(ran) == 1
    assert result.stderr.strip() == (
        "warning: [training] max_steps does not apply with [federated]: the aggregator's "
        "plan decides (rounds x local_steps; docs/federated.md)"
    )
