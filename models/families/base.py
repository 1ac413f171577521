"""The Family interface and the registry of families."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig

from splitfed.models.masks import positions_from_mask


@dataclass(frozen=True)
class Family:
    """How one architecture of Hugging Face causal LM is laid out.

    The split reuses the architecture's own base model class (``AutoModel``) for every
    part, with only the part's layers, so masks, rotary positions and caches are built
    exactly as the unsplit model builds them. A family names the modules to keep or drop.
    """

    name: str
    # ``config.model_type`` values this family serves.
    model_types: tuple[str, ...]
    # Attribute of the causal-LM wrapper holding the base model ("model", "transformer").
    base_attr: str
    # Attributes of the base model: the block list, the final norm, the input embeddings.
    layers_attr: str
    norm_attr: str
    embed_attrs: tuple[str, ...]
    lm_head_attr: str = "lm_head"
    # Modules LoRA targets by default (the attention projections).
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # Config attribute holding the layer count.
    num_layers_attr: str = "num_hidden_layers"
    # Extra config fields that are per-layer lists and must be sliced per part.
    per_layer_config: tuple[str, ...] = field(default=("layer_types",))
    # Whether the 2-D mask may hold padding anywhere (not only in front or behind every
    # row): continuous batching lays sessions' caches side by side with padding between
    # a session's past and its new positions (models/continuous.py). Families that say
    # no merge only sessions at equal lengths.
    pads_anywhere: bool = True

    def num_layers(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.num_layers_attr))

    def layer_key(self, index: int) -> str:
        """Checkpoint prefix of block ``index``, e.g. ``model.layers.3.``."""
        return f"{self.base_attr}.{self.layers_attr}.{index}."

    def embed_keys(self) -> tuple[str, ...]:
        return tuple(f"{self.base_attr}.{name}." for name in self.embed_attrs)

    def norm_key(self) -> str:
        return f"{self.base_attr}.{self.norm_attr}."

    def lm_head_key(self) -> str:
        return f"{self.lm_head_attr}."

    def tied_lm_head_source(self) -> str:
        """Checkpoint name of the weight a tied lm head shares."""
        return f"{self.base_attr}.{self.embed_attrs[0]}.weight"

    def drop_embeddings(self, base: nn.Module, config: PretrainedConfig) -> None:
        """Remove the input embeddings from a base model that receives hidden states."""
        for name in self.embed_attrs:
            setattr(base, name, None)

    def set_layers(self, base: nn.Module, layers: Sequence[nn.Module]) -> None:
        setattr(base, self.layers_attr, nn.ModuleList(layers))

    def layers(self, base: nn.Module) -> nn.ModuleList:
        layers = getattr(base, self.layers_attr)
        assert isinstance(layers, nn.ModuleList)
        return layers

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.model_types)})"

    def check_config(self, config: PretrainedConfig) -> None:
        """Raise ``ValueError`` for configurations this family cannot split."""

    def build_base(self, config: PretrainedConfig) -> nn.Module:
        """A base model for ``config`` (called on the meta device by the split)."""
        base: nn.Module = AutoModel.from_config(config)  # type: ignore[no-untyped-call]
        return base

    def positions(self, attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
        """Position ids of the last ``query_length`` tokens, rebuilt from the 2-D mask that
        crossed the wire (``[batch, query_length]`` for most families)."""
        return positions_from_mask(attention_mask, query_length)

    def extra_state(self) -> dict[str, Any]:
        return {}


_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for model_type in family.model_types:
        if model_type in _REGISTRY:
            raise ValueError(
                f"model type {model_type!r} already belongs to {_REGISTRY[model_type].name}"
            )
        _REGISTRY[model_type] = family
    return family


def registered_families() -> list[Family]:
    seen: dict[str, Family] = {}
    for family in _REGISTRY.values():
        seen.setdefault(family.name, family)
    return list(seen.values())


def family_for(config: PretrainedConfig) -> Family:
    """The family serving ``config``; a clear error naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    family = _REGISTRY.get(str(model_type))
    if family is None:
        supported = "; ".join(f.describe() for f in registered_families())
        raise ValueError(
            f"model type {model_type!r} is not supported for splitting; supported families: "
            f"{supported}"
        )
    family.check_config(config)
    return family
