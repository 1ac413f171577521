"""Adapters out of the split: one PEFT adapter (or a merged checkpoint) for the whole model.

Training leaves the adapter in pieces: the head's and tail's LoRA in the client's
checkpoint and the body's LoRA in the backbone's session, all under the checkpoint's
global tensor names (``model.layers.3.self_attn.q_proj.lora_A.weight``). Put together
they are the LoRA of the unsplit model; :func:`write_peft` writes them in the layout
``peft.PeftModel.from_pretrained`` loads (``adapter_config.json`` +
``adapter_model.safetensors``), and :func:`merge_into_checkpoint` folds them into a
full checkpoint that plain ``transformers`` (or ``splitfed eval --model``) loads.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from splitfed.files import StrPath
from splitfed.models.adapters import AdapterSettings
from splitfed.models.families import family_for
from splitfed.models.identity import BODY_KEY, PARTS_KEY
from splitfed.models.loading import load_config

if TYPE_CHECKING:
    from peft import LoraConfig

PEFT_PREFIX = "base_model.model."
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def adapter_layers(tensors: Mapping[str, torch.Tensor], layer_prefix: str) -> list[int]:
    """The block indices that ``tensors`` (global names) adapt."""
    pattern = re.compile(re.escape(layer_prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for name in tensors if (m := pattern.match(name))}
    return sorted(found)


def write_peft(
    output: StrPath,
    tensors: Mapping[str, torch.Tensor],
    adapter: AdapterSettings,
    model_path: StrPath,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> LoraConfig:
    """Write ``tensors`` (the LoRA of some or all blocks, global names) as a PEFT adapter
    of the model at ``model_path``; returns its config. ``metadata`` goes to
    ``splitfed.json`` beside it, and what it was trained against (models/identity.py) into
    the safetensors file's metadata too."""
    output = Path(output)
    model_path = Path(model_path)
    if adapter.kind != "lora":
        raise ValueError(
            f"only LoRA adapters have a PEFT layout; this one is {adapter.kind!r} "
            "(use --format safetensors)"
        )
    family = family_for(load_config(model_path))
    prefix = f"{family.base_attr}.{family.layers_attr}."
    layers = adapter_layers(tensors, prefix)
    if not layers or any(".lora_" not in name for name in tensors):
        raise ValueError("the adapter holds no LoRA tensors of the model's blocks")
    from splitfed.models.peft_import import LoraConfig

    config = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,  # type: ignore[arg-type]
        lora_dropout=adapter.dropout,
        target_modules=list(adapter.target_modules or family.lora_targets),
        layers_to_transform=layers,
        layers_pattern=family.layers_attr,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(model_path),
    )
    output.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(output))
    save_file(
        {PEFT_PREFIX + name: t.detach().cpu().contiguous() for name, t in tensors.items()},
        str(output / "adapter_model.safetensors"),
        metadata={
            "format": "pt",
            **{k: str(v) for k, v in (metadata or {}).items() if k in (BODY_KEY, PARTS_KEY)},
        },
    )
    if metadata:
        (output / "splitfed.json").write_text(json.dumps(dict(metadata), indent=2) + "\n")
    return config


def merge_into_checkpoint(model_path: StrPath, peft_dir: StrPath, output: StrPath) -> None:
    """A full checkpoint at ``output``: the model at ``model_path`` with the PEFT adapter
    at ``peft_dir`` merged into its weights (and the model's tokenizer files)."""
    model_path = Path(model_path)
    peft_dir = Path(peft_dir)
    output = Path(output)
    from transformers import AutoModelForCausalLM

    from splitfed.models.peft_import import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype="auto")
    merged = PeftModel.from_pretrained(base, str(peft_dir)).merge_and_unload()
    output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(output))
    for name in _TOKENIZER_FILES:
        if (model_path / name).is_file():
            shutil.copy2(model_path / name, output / name)
