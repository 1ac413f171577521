"""GPT-2: learned absolute positions (``wpe``) added to the token embeddings (``wte``) in
``transformer``, blocks in ``transformer.h``, final norm ``ln_f``, fused ``c_attn``."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from splitfed.models.families.base import Family, register_family


class NoPositions(nn.Module):
    """Stands in for ``wpe`` in parts after the head: positions were added there already."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=position_ids.device)


class Gpt2Family(Family):
    def drop_embeddings(self, base: nn.Module, config: PretrainedConfig) -> None:
        setattr(base, "wte", None)  # noqa: B010
        base.wpe = NoPositions(config.hidden_size)
        # Embedding dropout belongs to the head only.
        base.drop = nn.Identity()


GPT2 = register_family(
    Gpt2Family(
        name="gpt2",
        model_types=("gpt2",),
        base_attr="transformer",
        layers_attr="h",
        norm_attr="ln_f",
        embed_attrs=("wte", "wpe"),
        lora_targets=("c_attn", "attn.c_proj"),
        num_layers_attr="n_layer",
    )
)
