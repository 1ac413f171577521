"""Trainable adapters on split parts: LoRA (through peft) and P-Tuning v2 prefixes.

Adapters live where their layers live: a part's LoRA weights and prefix key/values belong
to the part's own blocks, so nothing but hidden states ever crosses the wire. Their
trainable tensors are exported under *global* names (the block's index in the whole
model, as in the unsplit model), so the adapters of head, body and tail together form one
adapter of the whole model, and the same tensors of many clients can be averaged.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.cache_utils import DynamicCache

from splitfed.files import StrPath
from splitfed.models.optim import init_adapter_tensors
from splitfed.models.parts import SplitPart
from splitfed.models.quantization import compute_dtype

if TYPE_CHECKING:
    from peft import LoraConfig

ADAPTER = "default"
# Far above any rank used in practice (8-256); a service may cap it lower.
MAX_LORA_RANK = 4096


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; ``target_modules`` defaults to the family's attention
    projections (q, k, v, o for Llama and GLM)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    # peft's default (True) initialises B to zero, so the adapter starts as a no-op;
    # False draws both A and B at random (tests use it to get non-trivial outputs).
    init: str | bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.r <= MAX_LORA_RANK:
            raise ValueError(f"LoRA rank r must be in [1, {MAX_LORA_RANK}], got {self.r}")
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    def peft_config(self, default_targets: Sequence[str]) -> LoraConfig:
        from splitfed.models.peft_import import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules or default_targets),
            init_lora_weights=self.init,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class AdapterSettings:
    """Which adapter a part trains: LoRA or a P-Tuning v2 prefix, and the seed its
    tensors are initialised from (with their global names, so every party that knows
    the seed builds the same initial adapter). Both sides of a split use it."""

    kind: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    prefix_length: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "prefix"):
            raise ValueError(f"adapter kind must be lora or prefix, got {self.kind!r}")
        if self.kind == "lora":
            self.lora()
        elif not 1 <= self.prefix_length <= 1024:
            raise ValueError(f"prefix_length must be 1-1024, got {self.prefix_length}")

    def lora(self) -> LoraSettings:
        return LoraSettings(
            r=self.r,
            alpha=self.alpha,  # type: ignore[arg-type]
            dropout=self.dropout,
            target_modules=tuple(self.target_modules) or None,
        )

    def apply(self, part: SplitPart) -> None:
        """Add this adapter to ``part`` and initialise it from the seed."""
        if self.kind == "lora":
            add_lora(part, self.lora())
        else:
            add_prefix(part, self.prefix_length)
        init_adapter_tensors(adapter_state(part), self.seed)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterSettings:
        values = dict(data)
        values["target_modules"] = tuple(values.get("target_modules", ()))
        return cls(**values)


def add_lora(part: SplitPart, settings: LoraSettings | None = None) -> list[str]:
    """Inject LoRA into the part's blocks; freeze everything else. Returns adapted modules."""
    settings = settings or LoraSettings()
    targets = list(settings.target_modules or part.family.lora_targets)
    config = settings.peft_config(targets)
    with warnings.catch_warnings():
        # On a torchao-quantized projection (CPU int8) peft warns that merging is not
        # possible: splitfed never merges into quantized weights (models/quantization.py).
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
        from splitfed.models.peft_import import inject_adapter_in_model

        inject_adapter_in_model(config, part.base, adapter_name=ADAPTER)
    adapted = sorted(
        {
            name.rsplit(".lora_A", 1)[0]
            for name, _ in part.base.named_parameters()
            if ".lora_A." in name
        }
    )
    if not adapted:
        raise ValueError(f"no module of the {part.part} matched LoRA targets {targets}")
    freeze_base(part)
    return adapted


class PrefixEncoder(nn.Module):
    """P-Tuning v2: trainable key/value prefixes for each block of one part."""

    def __init__(
        self, num_layers: int, length: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        if length < 1:
            raise ValueError(f"prefix length must be >= 1, got {length}")
        shape = (num_layers, kv_heads, length, head_dim)
        self.keys = nn.Parameter(torch.randn(shape, dtype=dtype) * 0.02)
        self.values = nn.Parameter(torch.randn(shape, dtype=dtype) * 0.02)

    @property
    def length(self) -> int:
        return int(self.keys.shape[2])

    def fill(self, cache: DynamicCache, batch: int) -> int:
        """Put the prefix of every block in front of ``cache``; returns its length."""
        for index in range(self.keys.shape[0]):
            keys = self.keys[index].unsqueeze(0).expand(batch, -1, -1, -1)
            values = self.values[index].unsqueeze(0).expand(batch, -1, -1, -1)
            cache.update(keys, values, index)
        return self.length


def kv_geometry(part: SplitPart) -> tuple[int, int]:
    """(key/value heads, head dim) of the part's attention."""
    config = part.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return kv_heads, head_dim


def add_prefix(part: SplitPart, length: int = 16) -> PrefixEncoder:
    """Give the part a P-Tuning v2 prefix of ``length`` positions for each of its blocks."""
    kv_heads, head_dim = kv_geometry(part)
    dtype = compute_dtype(part.base)
    prefix = PrefixEncoder(len(part.layer_range), length, kv_heads, head_dim, dtype)
    part.prefix = prefix
    freeze_base(part)
    return prefix


def _is_adapter(name: str) -> bool:
    return ".lora_" in name or name.startswith("prefix.")


def freeze_base(part: SplitPart) -> None:
    for name, parameter in part.named_parameters():
        parameter.requires_grad_(_is_adapter(name))


_LOCAL_BLOCK = re.compile(r"^base\.(?P<layers>[^.]+)\.(?P<index>\d+)\.(?P<rest>.*)$")


def adapter_state(part: SplitPart, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """The part's trainable tensors under global names (detached, on their device);
    with ``grads``, their gradients instead (tensors without one are left out)."""
    family, first = part.family, part.layer_range.start
    state: dict[str, torch.Tensor] = {}
    for name, parameter in part.named_parameters():
        if not _is_adapter(name):
            continue
        tensor = parameter.grad if grads else parameter.detach()
        if tensor is None:
            continue
        if name.startswith("prefix."):
            kind = name.split(".", 1)[1]  # keys | values
            for index in range(tensor.shape[0]):
                state[f"prefix.{first + index}.{kind}"] = tensor[index]
            continue
        match = _LOCAL_BLOCK.match(name)
        if match is None or match["layers"] != family.layers_attr:
            raise ValueError(f"adapter tensor {name!r} is not inside a block")
        rest = match["rest"].replace(f".{ADAPTER}.", ".")
        state[f"{family.layer_key(first + int(match['index']))}{rest}"] = tensor
    return state


def load_adapter_state(part: SplitPart, state: Mapping[str, torch.Tensor]) -> None:
    """Copy the tensors of ``state`` that belong to this part into its adapters.

    Every adapter tensor of the part must be present with the same shape; tensors of
    other parts' blocks are ignored.
    """
    own = adapter_state(part)
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(
            f"adapter state lacks {len(missing)} tensors of the {part.part}, e.g. {missing[0]}"
        )
    for name, target in own.items():
        source = state[name]
        if source.shape != target.shape:
            raise ValueError(
                f"adapter tensor {name}: shape {list(source.shape)} does not match "
                f"{list(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(source.to(dtype=target.dtype, device=target.device))


def average_adapters(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """The weighted average of several adapter states (FedAvg), in float32 arithmetic,
    returned in each tensor's original dtype. Weights are normalised to sum to one."""
    if not states:
        raise ValueError("nothing to average")
    weights = list(weights) if weights is not None else [1.0] * len(states)
    if len(weights) != len(states):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    names = set(states[0])
    for index, state in enumerate(states[1:], start=1):
        if set(state) != names:
            diff = sorted(names ^ set(state))
            raise ValueError(f"adapter state {index} has different tensors, e.g. {diff[0]}")
    total = float(sum(weights))
    averaged: dict[str, torch.Tensor] = {}
    for name in sorted(names):
        first = states[0][name]
        acc = torch.zeros(first.shape, dtype=torch.float32, device=first.device)
        for state, weight in zip(states, weights, strict=True):
            tensor = state[name]
            if tensor.shape != first.shape:
                raise ValueError(
                    f"tensor {name}: shapes {list(first.shape)} and {list(tensor.shape)}"
                )
            acc.add_(tensor.to(device=first.device, dtype=torch.float32), alpha=weight / total)
        averaged[name] = acc.to(first.dtype)
    return averaged


def save_adapter(
    path: StrPath, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write adapter tensors as safetensors (contiguous CPU copies)."""
    path = Path(path)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # No metadata is None, not {}: safetensors writes an unreadable header for no
    # tensors with an empty metadata dict (an optimizer checkpointed before its first step).
    save_file(tensors, str(path), metadata=dict(metadata) if metadata else None)


def load_adapter(path: StrPath) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"adapter file {path} does not exist")
    return load_file(str(path))
