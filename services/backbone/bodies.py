"""The model side of the backbone: the shared frozen body, loaded once, and a session's
trainable copy of it (adapter, optimizer, schedule). No sessions, no gRPC in here."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from splitfed.errors import InvalidArgumentError, LimitExceededError
from splitfed.models.adapters import (
    AdapterSettings,
    adapter_state,
    kv_geometry,
    load_adapter_state,
)
from splitfed.models.families import family_for
from splitfed.models.loading import load_config, load_part
from splitfed.models.optim import (
    OptimizerSettings,
    build_optimizer,
    clip_factor,
    grad_sq_norm,
    load_optimizer_tensors,
    optimizer_tensors,
    scale_grads,
)
from splitfed.models.parts import Body, SplitSpec, empty_base
from splitfed.models.placement import (
    AUTO,
    auto_blocks,
    blocks_per_device,
    parse_device,
    place_blocks,
)
from splitfed.models.quantization import compute_dtype, frozen_memo, weight_bytes
from splitfed.services.backbone.quotas import GraphCost
from splitfed.services.backbone.settings import BackboneSettings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSummary:
    model_id: str
    family: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype
    min_k: int
    min_m: int
    quantization: str


class SharedBody:
    """The frozen middle blocks, loaded once; sessions get bodies that share its weights."""

    def __init__(self, settings: BackboneSettings) -> None:
        self.settings = settings
        self.config = load_config(settings.model_path)
        self.family = family_for(self.config)
        self.num_layers = self.family.num_layers(self.config)
        SplitSpec(self.num_layers, settings.min_k, settings.min_m)
        dtype = DTYPES.get(settings.dtype)
        plan = parse_device(settings.device)
        one_device = isinstance(plan, str) and plan != AUTO
        self.part = load_part(
            settings.model_path,
            "body",
            settings.min_k,
            settings.min_m,
            dtype=dtype,
            device=settings.device if one_device else "cpu",
            quantization=settings.quantization,
        )
        # The device of each block (several: the body spans the GPUs of a node).
        blocks = len(self.part.blocks)
        if one_device:
            self.block_devices = [settings.device] * blocks
        elif plan == AUTO:
            gpus = max(1, torch.cuda.device_count())
            reserve = (settings.max_cache_bytes + settings.max_pending_bytes) // gpus
            self.block_devices = auto_blocks(self.part, reserve)
        else:
            assert not isinstance(plan, str)
            self.block_devices = blocks_per_device(plan, blocks)
        place_blocks(self.part, self.block_devices)
        self.input_device = torch.device(self.block_devices[0])
        self.part.requires_grad_(False)
        self.dtype = compute_dtype(self.part)
        self.summary = ModelSummary(
            model_id=settings.model_id,
            family=self.family.name,
            num_layers=self.num_layers,
            hidden_size=int(self.config.hidden_size),
            vocab_size=int(self.config.vocab_size),
            dtype=self.dtype,
            min_k=settings.min_k,
            min_m=settings.min_m,
            quantization=settings.quantization,
        )

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.part)

    def body_for(self, k: int, m: int) -> Body:
        """A body for the split (k, m), sharing this body's frozen tensors (no copy)."""
        if k < self.settings.min_k or m < self.settings.min_m:
            raise InvalidArgumentError(
                f"this backbone holds blocks for k >= {self.settings.min_k} and "
                f"m >= {self.settings.min_m}; got k={k}, m={m}"
            )
        try:
            spec = SplitSpec(self.num_layers, k, m)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        blocks = [self.part.blocks[i - self.settings.min_k] for i in spec.layers("body")]
        shared: dict[int, Any] = {}
        for block in blocks:
            shared.update(frozen_memo(block))
        copies = [copy.deepcopy(block, shared) for block in blocks]
        base = empty_base(self.config, self.family, "body", spec.layers("body"))
        self.family.set_layers(base, copies)
        body = Body(self.family, self.config, spec, base)
        devices = [self.block_devices[i - self.settings.min_k] for i in spec.layers("body")]
        place_blocks(body, devices)
        body.train()
        return body

    def per_position_cache_bytes(self, body: Body) -> int:
        kv_heads, head_dim = kv_geometry(body)
        return 2 * len(body.layer_range) * kv_heads * head_dim * self.dtype.itemsize

    def check_inputs(self, hidden: torch.Tensor, mask: torch.Tensor, cached: int) -> None:
        """Refuse h1 and its attention mask unless they fit this body and the limits
        (``cached``: positions a KV cache already holds before these)."""
        summary, settings = self.summary, self.settings
        if hidden.dim() != 3 or hidden.shape[-1] != summary.hidden_size:
            raise InvalidArgumentError(
                f"h1 must be [batch, tokens, {summary.hidden_size}], got {list(hidden.shape)}"
            )
        if not hidden.is_floating_point():
            raise InvalidArgumentError(f"h1 must be floating point, got {hidden.dtype}")
        batch, tokens = hidden.shape[0], hidden.shape[1]
        if batch > settings.max_batch_size:
            raise LimitExceededError(
                f"batch of {batch} exceeds the limit of {settings.max_batch_size}"
            )
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] != cached + tokens:
            raise InvalidArgumentError(
                f"attention mask must be [{batch}, {cached + tokens}], got {list(mask.shape)}"
            )
        if mask.shape[1] > settings.max_sequence_length:
            raise LimitExceededError(
                f"sequence of {mask.shape[1]} positions exceeds the limit of "
                f"{settings.max_sequence_length}"
            )
        if mask.is_floating_point():
            raise InvalidArgumentError(f"attention mask must be integer, got {mask.dtype}")

    def inputs(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h1 and its mask on this body's (first) device, h1 in its dtype."""
        device = self.input_device
        return hidden.to(device=device, dtype=self.dtype), mask.to(device=device)


class Trainable:
    """A body with an adapter, its AdamW optimizer and learning-rate schedule."""

    def __init__(self, body: Body, adapter: AdapterSettings, optimizer: OptimizerSettings) -> None:
        self.body = body
        self.adapter = adapter
        adapter.apply(body)
        self.params = [p for p in body.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(self.params, optimizer)
        # What a training pass's graph holds, fitted on first use (quotas.GraphCost).
        self.graph_cost: GraphCost | None = None

    def step(self, client_sq_norm: float, max_norm: float, mean_of: int = 1) -> tuple[float, float]:
        """One AdamW step with global-norm clipping across both sides of the wire: the
        gradient divided by ``mean_of`` first (the members of a merged shared step),
        then scaled by ``clip_factor(backbone's + client_sq_norm, max_norm)``. Returns
        the backbone's squared gradient norm (before clipping) and the learning rate."""
        if mean_of != 1:
            scale_grads(self.params, 1.0 / mean_of)
        backbone_sq = grad_sq_norm(self.params)
        scale_grads(self.params, clip_factor(backbone_sq + client_sq_norm, max_norm))
        learning_rate = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return backbone_sq, learning_rate

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.body)

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return optimizer_tensors(self.optimizer, self.scheduler)

    def restore(
        self,
        adapter: Mapping[str, torch.Tensor],
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
    ) -> None:
        load_adapter_state(self.body, adapter)
        if meta:
            load_optimizer_tensors(self.optimizer, self.scheduler, tensors, meta)
