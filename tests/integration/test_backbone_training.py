"""Split training over real loopback mTLS streams, backbone in its own process, equals
centralized training of the unsplit model (same init, data order and optimizer)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from backbone_kit import Deployment, deployment
from peft import inject_adapter_in_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicCache

from splitfed.clients.data import MicroBatches, read_examples
from splitfed.clients.trainer import AdapterSettings, SplitTrainer, TrainSettings, causal_lm_loss
from splitfed.models import positions_from_mask
from splitfed.models.optim import (
    OptimizerSettings,
    build_optimizer,
    clip_factor,
    grad_sq_norm,
    init_adapter_tensors,
    scale_grads,
)
from splitfed.tiny import BUNDLED_DATASET

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


class Centralized:
    """The unsplit model trained the same way, for comparison."""

    def __init__(self, dep: Deployment, train: TrainSettings, adapter: AdapterSettings) -> None:
        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(dep.model_path), local_files_only=True
        )
        self.model.train()
        self.model.requires_grad_(False)
        self.tensors: dict[str, torch.Tensor] = {}
        config = self.model.config
        if adapter.kind == "lora":
            targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
            inject_adapter_in_model(adapter.lora().peft_config(targets), self.model)
            for name, parameter in self.model.named_parameters():
                if ".lora_" in name:
                    parameter.requires_grad_(True)
                    self.tensors[name.replace(".default", "")] = parameter
            self.params = list(self.tensors.values())
            init_adapter_tensors({n: t.data for n, t in self.tensors.items()}, adapter.seed)
        else:
            kv_heads = config.num_key_value_heads
            head_dim = config.hidden_size // config.num_attention_heads
            shape = (config.num_hidden_layers, kv_heads, adapter.prefix_length, head_dim)
            self.keys = torch.nn.Parameter(torch.zeros(shape))
            self.values = torch.nn.Parameter(torch.zeros(shape))
            views = {}
            for layer in range(shape[0]):
                views[f"prefix.{layer}.keys"] = self.keys.data[layer]
                views[f"prefix.{layer}.values"] = self.values.data[layer]
            init_adapter_tensors(views, adapter.seed)
            self.params = [self.keys, self.values]
        self.adapter = adapter
        self.optimizer, self.scheduler = build_optimizer(self.params, OPTIMIZER)
        tokenizer = AutoTokenizer.from_pretrained(str(dep.model_path), local_files_only=True)
        self.data = MicroBatches(
            read_examples(train.data),
            tokenizer,
            batch_size=train.batch_size,
            accumulation=train.accumulation,
            max_length=train.max_length,
            seed=train.seed,
        )
        self.max_norm = train.max_grad_norm

    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = positions_from_mask(mask, ids.shape[1])
        if self.adapter.kind == "lora":
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        cache = DynamicCache(config=self.model.config)
        batch = ids.shape[0]
        for layer in range(self.keys.shape[0]):
            cache.update(
                self.keys[layer].unsqueeze(0).expand(batch, -1, -1, -1),
                self.values[layer].unsqueeze(0).expand(batch, -1, -1, -1),
                layer,
            )
        extended = torch.cat([mask.new_ones((batch, self.adapter.prefix_length)), mask], -1)
        return self.model(
            input_ids=ids,
            attention_mask=extended,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        ).logits

    def run(self, steps: int) -> list[float]:
        losses = []
        for step in range(1, steps + 1):
            self.optimizer.zero_grad(set_to_none=True)
            batches = self.data.for_step(step)
            total = 0.0
            for batch in batches:
                loss = causal_lm_loss(
                    self.logits(batch.input_ids, batch.attention_mask), batch.labels
                )
                (loss / len(batches)).backward()
                total += float(loss.detach()) / len(batches)
            scale_grads(self.params, clip_factor(grad_sq_norm(self.params), self.max_norm))
            self.optimizer.step()
            self.scheduler.step()
            losses.append(total)
        return losses

    def final(self) -> dict[str, torch.Tensor]:
        if self.adapter.kind == "lora":
            return {n: t.detach() for n, t in self.tensors.items()}
        out = {}
        for layer in range(self.keys.shape[0]):
            out[f"prefix.{layer}.keys"] = self.keys.detach()[layer]
            out[f"prefix.{layer}.values"] = self.values.detach()[layer]
        return out


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
    reference = Centralized(backbone, train, adapter)
    expected_losses = reference.run(STEPS)
    torch.testing.assert_close(
        torch.tensor([r.loss for r in reports]), torch.tensor(expected_losses), atol=ATOL, rtol=0
    )
    assert expected_losses[-1] < expected_losses[0]  # it learned something
    expected = reference.final()
    assert set(split_adapter) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(split_adapter[name], tensor, atol=ATOL, rtol=0, msg=name)
