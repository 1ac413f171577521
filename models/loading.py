"""Selective loading: build one part from a local safetensors checkpoint, reading only the
tensors of that part, never the whole model.

Tensors are read through safetensors' memory map: without a dtype conversion a frozen
weight stays backed by the file's pages (no copy, shared by every process on the host
that maps the same file); with one, each tensor is converted as it is read.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from splitfed.files import StrPath
from splitfed.models.adapters import AdapterSettings
from splitfed.models.families import Family, family_for
from splitfed.models.parts import (
    PART_CLASSES,
    Body,
    Head,
    PartName,
    SplitPart,
    SplitSpec,
    Tail,
    empty_base,
    meta_parameters,
)
from splitfed.models.quantization import (
    NONE,
    check_quantization,
    linear_weight,
    quantizable,
    quantized_linear,
    release_freed_memory,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_config(path: StrPath) -> PretrainedConfig:
    """The model config of a local checkpoint directory (never downloads)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model directory: it has no config.json")
    config: PretrainedConfig = AutoConfig.from_pretrained(str(path), local_files_only=True)
    return config


def checkpoint_index(path: StrPath) -> dict[str, Path]:
    """Tensor name -> safetensors file, for a single-file or sharded checkpoint."""
    path = Path(path)
    index_file = path / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{index_file} is not a safetensors index: {exc}") from None
        files = {name: path / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise ValueError(f"{index_file} names {file.name}, which does not exist")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), single)
    raise ValueError(
        f"{path} has no {SINGLE_FILE} or {INDEX_FILE}; only safetensors checkpoints can be "
        "loaded by part (convert with save_pretrained(..., safe_serialization=True))"
    )


def part_tensor_names(
    family: Family, config: PretrainedConfig, spec: SplitSpec, part: PartName, available: set[str]
) -> dict[str, str]:
    """Checkpoint name -> name inside the part module, for every tensor the part needs."""
    base, layers = "base.", family.layers_attr
    names: dict[str, str] = {}
    for index in spec.layers(part):
        prefix = family.layer_key(index)
        for name in available:
            if name.startswith(prefix):
                names[name] = (
                    f"{base}{layers}.{index - spec.layers(part).start}.{name[len(prefix) :]}"
                )
    if part == "head":
        for prefix in family.embed_keys():
            for name in available:
                if name.startswith(prefix):
                    names[name] = base + name[len(family.base_attr) + 1 :]
    if part == "tail":
        norm = family.norm_key()
        for name in available:
            if name.startswith(norm):
                names[name] = base + name[len(family.base_attr) + 1 :]
        head_weight = f"{family.lm_head_key()}weight"
        if head_weight in available:
            names[head_weight] = "lm_head.weight"
            if f"{family.lm_head_key()}bias" in available:
                names[f"{family.lm_head_key()}bias"] = "lm_head.bias"
        elif (
            getattr(config, "tie_word_embeddings", False)
            and family.tied_lm_head_source() in available
        ):
            names[family.tied_lm_head_source()] = "lm_head.weight"
        else:
            raise ValueError(f"checkpoint has no {head_weight} and its embeddings are not tied")
    return names


def load_part(
    path: StrPath,
    part: PartName,
    k: int = 1,
    m: int = 1,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    quantization: str = NONE,
) -> SplitPart:
    """Build ``part`` of the checkpoint in ``path`` split at (k, m), reading only its tensors.

    Parameters are frozen (adapters add the trainable ones) and the part is in eval mode.
    ``part.source_tensors`` lists the checkpoint tensors that were read. With a
    ``quantization`` (models/quantization.py) the projections of the part's blocks are
    quantized as they are read, one at a time.
    """
    check_quantization(quantization)
    path = Path(path)
    config = load_config(path)
    family = family_for(config)
    spec = SplitSpec(family.num_layers(config), k, m)
    files = checkpoint_index(path)
    names = part_tensor_names(family, config, spec, part, set(files))
    base = empty_base(config, family, part, spec.layers(part))
    lm_head: nn.Module | None = None
    if part == "tail":
        with meta_parameters():
            lm_head = nn.Linear(
                config.hidden_size, config.vocab_size, bias="lm_head.bias" in names.values()
            )
    holder = nn.Module()
    holder.base = base
    if lm_head is not None:
        holder.lm_head = lm_head
    expected = {name for name, _ in holder.named_parameters()} | {
        name for name, _ in holder.named_buffers() if _is_persistent(holder, name)
    }
    loader = _Quantizer(holder, family, quantization, dtype, device)
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in names:
        by_file[files[name]].append(name)
    for file, file_names in sorted(by_file.items()):
        # A file stays memory-mapped while its handle is open, and every page read stays
        # resident until then: quantizing, each tensor is read through its own handle,
        # so the pages of a projection go once it is quantized (not a shard's worth).
        reads = [[n] for n in sorted(file_names)] if loader.modules else [sorted(file_names)]
        for read in reads:
            with safe_open(str(file), framework="pt", device=str(device)) as handle:
                for name in read:
                    tensor = handle.get_tensor(name)
                    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                        tensor = tensor.to(dtype)
                    if not loader.take(names[name], tensor):
                        # Quantizing reads (pages in) the projections' bytes; a tensor kept
                        # as read is a view of the memory-mapped file and would keep those
                        # pages resident for the part's life: keep a copy (norms, biases).
                        state[names[name]] = tensor.clone() if loader.modules else tensor
    loader.finish()
    missing = sorted(expected - set(state) - loader.loaded)
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors of the {part}: {', '.join(missing[:5])}")
    holder.load_state_dict(state, strict=False, assign=True)
    built = PART_CLASSES[part](family, config, spec, base, lm_head)
    built.requires_grad_(False)
    built.eval()
    built.source_tensors = tuple(sorted(names))  # type: ignore[assignment]
    return built.to(device)


class _Quantizer:
    """Quantizes the projections of a part's blocks as their tensors arrive: a
    projection is replaced as soon as its weight (and bias) are read, so at most one
    projection is ever held in full precision."""

    def __init__(
        self,
        holder: nn.Module,
        family: Family,
        mode: str,
        dtype: torch.dtype | None,
        device: str | torch.device,
    ) -> None:
        self.holder, self.mode, self.dtype, self.device = holder, mode, dtype, device
        blocks = f"base.{family.layers_attr}."
        self.modules: dict[str, nn.Module] = (
            {}
            if mode == NONE
            else {
                name: module
                for name, module in holder.named_modules()
                if name.startswith(blocks) and quantizable(module)
            }
        )
        self.pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        self.loaded: set[str] = set()

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        """Keep ``tensor`` if it belongs to a projection to quantize (True)."""
        owner, _, attr = name.rpartition(".")
        module = self.modules.get(owner)
        if module is None or attr not in ("weight", "bias"):
            return False
        parts = self.pending[owner]
        parts[attr] = tensor
        if "weight" in parts and ("bias" in parts or module.bias is None):
            self._replace(owner, module, parts)
        return True

    def _replace(self, owner: str, module: nn.Module, parts: dict[str, torch.Tensor]) -> None:
        weight = parts["weight"]
        if not isinstance(module, nn.Linear):
            weight = weight.t()  # GPT-2's Conv1D stores [in, out]
        expected = tuple(linear_weight(module).shape)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"checkpoint tensor of {owner}.weight has shape {list(weight.shape)}, "
                f"expected {list(expected)}"
            )
        quantized = quantized_linear(
            weight,
            parts.get("bias"),
            self.mode,
            compute_dtype=self.dtype or weight.dtype,
            device=self.device,
        )
        self.holder.set_submodule(owner, quantized)
        parts.clear()
        # glibc would keep the freed full-precision temporaries in its heap (its mmap
        # threshold rises to their size), growing the peak by a few projections' worth.
        release_freed_memory()
        self.loaded.update(f"{owner}.{attr}" for attr in ("weight", "bias"))
        del self.pending[owner]

    def finish(self) -> None:
        if self.pending:
            owner = sorted(self.pending)[0]
            raise ValueError(f"checkpoint lacks the weight or bias of {owner}")


def _is_persistent(module: nn.Module, name: str) -> bool:
    owner_name, _, buffer = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return buffer not in owner._non_persistent_buffers_set


def load_head(path: StrPath, k: int = 1, m: int = 1, **kwargs: Any) -> Head:
    part = load_part(path, "head", k, m, **kwargs)
    assert isinstance(part, Head)
    return part


def load_body(path: StrPath, k: int = 1, m: int = 1, **kwargs: Any) -> Body:
    part = load_part(path, "body", k, m, **kwargs)
    assert isinstance(part, Body)
    return part


def load_tail(path: StrPath, k: int = 1, m: int = 1, **kwargs: Any) -> Tail:
    part = load_part(path, "tail", k, m, **kwargs)
    assert isinstance(part, Tail)
    return part


def load_trainable_ends(
    path: StrPath,
    adapter: AdapterSettings,
    k: int = 1,
    m: int = 1,
    *,
    quantization: str = NONE,
) -> tuple[Head, Tail, list[nn.Parameter]]:
    """A client's head and tail of the checkpoint at ``path`` with ``adapter`` applied,
    in training mode, and their trainable parameters (the head's first); their blocks'
    projections quantized with ``quantization``."""
    path = Path(path)
    head = load_head(path, k, m, quantization=quantization)
    tail = load_tail(path, k, m, quantization=quantization)
    for part in (head, tail):
        adapter.apply(part)
        part.train()
    params = [p for part in (head, tail) for p in part.parameters() if p.requires_grad]
    return head, tail, params
