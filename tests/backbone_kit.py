"""A backbone in its own process on 127.0.0.1 with mTLS, and clients for it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from helpers import fresh_log
from peft import inject_adapter_in_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicCache

from splitfed.cli.launcher import ServiceProcess
from splitfed.clients.backbone import BackboneClient
from splitfed.clients.data import MicroBatches, read_examples
from splitfed.clients.trainer import TrainSettings, causal_lm_loss
from splitfed.models import positions_from_mask
from splitfed.models.adapters import AdapterSettings
from splitfed.models.optim import (
    OptimizerSettings,
    build_optimizer,
    clip_factor,
    grad_sq_norm,
    init_adapter_tensors,
    scale_grads,
)
from splitfed.models.tiny import BUNDLED_DATASET, make_tiny_checkpoint
from splitfed.security.ca import CertificateAuthority
from splitfed.tls import TLSConfig
from splitfed.transport import create_channel

SERVER_NAME = "backbone.splitfed.local"


def tiny_checkpoint(
    directory: Path, *, layers: int = 6, hidden_size: int = 64, seed: int = 0
) -> Path:
    texts = []
    for line in BUNDLED_DATASET.read_text().splitlines():
        row = json.loads(line)
        texts.append(" ".join(str(v) for v in row.values()))
    return make_tiny_checkpoint(directory, texts, layers=layers, hidden_size=hidden_size, seed=seed)


@dataclass
class Deployment:
    root: Path
    ca: CertificateAuthority
    model_path: Path
    config_path: Path
    process: ServiceProcess | None = None
    # The [backbone] settings the config file holds (model_path, state_dir, overrides).
    backbone: dict[str, Any] = field(default_factory=dict)

    def start(self) -> str:
        args = ["serve", "backbone", "--config", str(self.config_path)]
        if self.process is not None and self.process.address:
            args += ["--listen", self.process.address]  # same port after a restart
        process = ServiceProcess("backbone", args, log_path=fresh_log(self.root / "backbone.log"))
        address = process.start(timeout_s=120)  # if it fails, the next try keeps the port
        self.process = process
        return address

    @property
    def address(self) -> str:
        assert self.process is not None and self.process.address
        return self.process.address

    @property
    def metrics(self) -> str:
        """The address of the backbone's /metrics (``server.metrics_port`` set)."""
        assert self.process is not None
        return next(
            line.removeprefix("metrics on ")
            for line in self.process.preamble
            if line.startswith("metrics on ")
        )

    def client_tls(self, identity: str, role: str = "client") -> TLSConfig:
        issued = self.ca.issue(identity, role)
        assert issued.key_pem is not None
        return TLSConfig(self.ca.cert_pem, issued.cert_pem, issued.key_pem)

    def connect(
        self, identity: str = "hospital-a", role: str = "client"
    ) -> tuple[grpc.Channel, BackboneClient]:
        tls = self.client_tls(identity, role)
        channel = create_channel(self.address, tls, server_name=SERVER_NAME)
        return channel, BackboneClient(channel)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def deployment(
    root: Path,
    *,
    layers: int = 6,
    hidden_size: int = 64,
    ca: CertificateAuthority | None = None,
    security: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    **backbone: Any,
) -> Deployment:
    ca = ca or CertificateAuthority.create("test CA")
    model = tiny_checkpoint(root / "model", layers=layers, hidden_size=hidden_size)
    ca.issue("backbone-0", "backbone", dns_names=[SERVER_NAME]).write(root / "backbone-tls")
    settings = {"model_path": str(model), "state_dir": str(root / "state"), **backbone}
    config = root / "backbone.yaml"
    lines = ["backbone:"] + [f"  {k}: {json.dumps(v)}" for k, v in settings.items()]
    lines += ["server:", f"  tls_dir: {json.dumps(str(root / 'backbone-tls'))}"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in (server or {}).items()]
    if security:
        lines += ["security:"] + [f"  {k}: {json.dumps(v)}" for k, v in security.items()]
    config.write_text("\n".join(lines) + "\n")
    return Deployment(root, ca, model, config, backbone=settings)


def train_locally(trainer: Any, steps: int, groups: list[list[torch.nn.Parameter]]) -> list[float]:
    """``steps`` steps of ``trainer`` (its ``data``, ``logits(ids, mask)``, ``optimizer``,
    ``scheduler``, ``max_norm``) as a client and a backbone take them together: the
    micro-batches' losses averaged, gradients clipped by the global norm summed over
    ``groups`` in order (the client's parameters, then the body's), one optimizer step.
    Returns each step's loss."""
    params = [p for group in groups for p in group]
    losses = []
    for step in range(1, steps + 1):
        trainer.optimizer.zero_grad(set_to_none=True)
        batches = trainer.data.for_step(step)
        total = 0.0
        for batch in batches:
            logits = trainer.logits(batch.input_ids, batch.attention_mask)
            loss = causal_lm_loss(logits, batch.labels)
            (loss / len(batches)).backward()
            total += float(loss.detach()) / len(batches)
        squared = sum(grad_sq_norm(group) for group in groups)
        scale_grads(params, clip_factor(squared, trainer.max_norm))
        trainer.optimizer.step()
        trainer.scheduler.step()
        losses.append(total)
    return losses


def training_data(dep: Deployment, train: TrainSettings) -> MicroBatches:
    """The micro-batches a client of ``dep`` trains on with ``train`` (the same order)."""
    tokenizer = AutoTokenizer.from_pretrained(str(dep.model_path), local_files_only=True)
    return MicroBatches(
        read_examples(train.data),
        tokenizer,
        batch_size=train.batch_size,
        accumulation=train.accumulation,
        max_length=train.max_length,
        seed=train.seed,
    )


class Centralized:
    """The unsplit model trained the same way, for comparison."""

    def __init__(
        self,
        dep: Deployment,
        train: TrainSettings,
        adapter: AdapterSettings,
        optimizer: OptimizerSettings,
    ) -> None:
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
        self.optimizer, self.scheduler = build_optimizer(self.params, optimizer)
        self.data = training_data(dep, train)
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
        return train_locally(self, steps, [self.params])

    def final(self) -> dict[str, torch.Tensor]:
        if self.adapter.kind == "lora":
            return {n: t.detach() for n, t in self.tensors.items()}
        out = {}
        for layer in range(self.keys.shape[0]):
            out[f"prefix.{layer}.keys"] = self.keys.detach()[layer]
            out[f"prefix.{layer}.values"] = self.values.detach()[layer]
        return out
