"""Pipelined split steps (clients/pipeline.py) over real mTLS against a backbone in its own
process: the same losses, evaluation losses and adapters (head, tail and the backbone's
body adapter) as the sequential step, plain and with perturbation, and a stream lost in
the middle of a pipelined step redoes the step to the same result. (Encrypted: in
test_security_deployment.py, which has the key manager.)"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from backbone_kit import Deployment, deployment

import splitfed.clients.trainer as trainer_module
from splitfed.clients.backbone import TrainStream
from splitfed.clients.trainer import SplitTrainer, StepReport, TrainSettings
from splitfed.errors import LimitExceededError
from splitfed.models.adapters import AdapterSettings
from splitfed.models.optim import OptimizerSettings
from splitfed.models.tiny import BUNDLED_DATASET
from splitfed.security.perturbation import PerturbationSettings

STEPS = 4
ADAPTER = AdapterSettings(kind="lora", r=4, alpha=8, seed=5)
OPTIMIZER = OptimizerSettings(learning_rate=1e-2)
ATOL = 1e-5


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = deployment(tmp_path_factory.mktemp("backbone"), layers=4, hidden_size=32)
    dep.start()
    yield dep
    dep.stop()


def train(
    dep: Deployment, **overrides: Any
) -> tuple[list[StepReport], dict[str, torch.Tensor], SplitTrainer]:
    values: dict[str, Any] = {
        "data": BUNDLED_DATASET,
        "model_path": dep.model_path,
        "eval_data": BUNDLED_DATASET,
        "eval_every": 2,
        "eval_batches": 3,
        "k": 1,
        "m": 1,
        "batch_size": 2,
        "accumulation": 3,
        "max_steps": STEPS,
        "max_length": 32,
        "seed": 3,
    }
    values.update(overrides)
    channel, client = dep.connect()
    with channel:
        trainer = SplitTrainer(client, TrainSettings(**values), ADAPTER, OPTIMIZER)
        reports = trainer.run()
        assert trainer.session is not None
        body = client.export_adapter(trainer.session.session_id)
        trainer.close(delete_session=True)
    tensors = {**trainer.adapter_tensors(), **{f"body.{k}": v for k, v in body.items()}}
    return reports, tensors, trainer


def assert_same_training(
    got: tuple[list[StepReport], dict[str, torch.Tensor], SplitTrainer],
    want: tuple[list[StepReport], dict[str, torch.Tensor], SplitTrainer],
) -> None:
    (reports, tensors, _), (expected, expected_tensors, _) = got, want
    assert [r.step for r in reports] == [r.step for r in expected] == list(range(1, STEPS + 1))
    torch.testing.assert_close(
        torch.tensor([r.loss for r in reports]),
        torch.tensor([r.loss for r in expected]),
        atol=ATOL,
        rtol=0,
    )
    evals = [r.eval_loss for r in reports if r.eval_loss is not None]
    assert len(evals) == STEPS // 2
    assert evals == pytest.approx(
        [r.eval_loss for r in expected if r.eval_loss is not None], abs=ATOL
    )
    assert tensors.keys() == expected_tensors.keys()
    assert any(name.startswith("body.") for name in tensors)
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, expected_tensors[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.slow
def test_pipelined_steps_equal_sequential_steps(backbone: Deployment) -> None:
    sequential = train(backbone, pipeline_window=0)
    for window in (2, 3):
        pipelined = train(backbone, pipeline_window=window)
        assert pipelined[2].window == window
        assert_same_training(pipelined, sequential)
    # The adapters moved: the comparison is not of two untrained models.
    assert sequential[0][0].loss != sequential[0][-1].loss


@pytest.mark.slow
def test_pipelined_steps_with_perturbation_equal_sequential_ones(backbone: Deployment) -> None:
    perturbation = PerturbationSettings(
        clip_norm=5.0,
        noise_multiplier=0.5,
        grad_clip_norm=1.0,
        grad_noise_multiplier=0.5,
        seed=17,
    )
    sequential = train(backbone, pipeline_window=0, perturbation=perturbation)
    pipelined = train(backbone, pipeline_window=3, perturbation=perturbation)
    assert_same_training(pipelined, sequential)
    spent, expected = pipelined[2].privacy_spent(), sequential[2].privacy_spent()
    assert spent is not None and expected is not None
    assert spent.epsilon == pytest.approx(expected.epsilon)  # the same releases counted
    # The noise is in the result: without it the losses differ.
    plain = train(backbone, pipeline_window=3)
    assert plain[0][0].loss != pytest.approx(pipelined[0][0].loss, abs=ATOL)


@pytest.mark.slow
def test_a_stream_lost_in_a_pipelined_step_redoes_the_step(
    backbone: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = train(backbone, pipeline_window=3)
    answers = {"step 2": 0, "dropped": 0}

    class Dropping(TrainStream):
        """Closes itself (the connection lost) before the second answer of step 2: the
        forwards of micro-batches 1 and 2 and the backward of 0 are then on the
        backbone, which must discard them."""

        def receive(self) -> tuple[Any, torch.Tensor]:
            if trainer_state["trainer"].step == 1 and not answers["dropped"]:
                answers["step 2"] += 1
                if answers["step 2"] == 2:
                    answers["dropped"] = 1
                    self.close()
            return super().receive()

    trainer_state: dict[str, SplitTrainer] = {}
    real = SplitTrainer.__init__

    def init(self: SplitTrainer, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        trainer_state["trainer"] = self

    monkeypatch.setattr(trainer_module, "TrainStream", Dropping)
    monkeypatch.setattr(SplitTrainer, "__init__", init)
    redone = train(backbone, pipeline_window=3)
    assert answers["dropped"] == 1
    assert [r.retries for r in redone[0]] == [0, 1, 0, 0]
    assert_same_training(redone, expected)


@pytest.mark.slow
def test_a_window_the_backbones_byte_quota_refuses_is_lowered(tmp_path: Path) -> None:
    """A backbone whose pending-bytes quota holds one pass but not two: the trainer's
    window of 3 is refused (RESOURCE_EXHAUSTED), lowered to 1, and the step redone to
    the sequential result."""
    sizes = {"max_length": 16, "eval_every": 0, "max_steps": 2}
    probe = deployment(tmp_path / "probe", layers=4, hidden_size=32, max_pending_bytes=1)
    probe.start()
    try:
        with pytest.raises(LimitExceededError, match="would hold about") as refused:
            train(probe, pipeline_window=0, **sizes)
    finally:
        probe.stop()
    found = re.search(r"would hold about (\d+) bytes", str(refused.value))
    assert found is not None
    one_pass = int(found.group(1))
    quota = one_pass * 3 // 2
    dep = deployment(
        tmp_path / "tight",
        layers=4,
        hidden_size=32,
        max_pending_bytes=quota,
        max_pending_bytes_per_identity=quota,
    )
    dep.start()
    try:
        reports, tensors, trainer = train(dep, pipeline_window=3, **sizes)
        assert trainer.window == 1 and reports[0].retries == 1
        sequential = train(dep, pipeline_window=0, **sizes)
    finally:
        dep.stop()
    assert [r.loss for r in reports] == pytest.approx([r.loss for r in sequential[0]], abs=ATOL)
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, sequential[1][name], atol=ATOL, rtol=0, msg=name)
