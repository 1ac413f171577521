"""Partition of Hugging Face causal LMs into head, body and tail (the U-shaped split)."""

# First, before transformers' model code or peft import them: bitsandbytes without
# reaching for the network, torchao without its import-time noise (models/quantization.py).
from splitfed.models.quantization import prepare_imports

prepare_imports()

# ruff: noqa: E402

from splitfed.models.families import Family, family_for, registered_families
from splitfed.models.masks import extend_mask, positions_from_mask
from splitfed.models.parts import (
    PARTS,
    Body,
    Head,
    PartCache,
    SplitModel,
    SplitPart,
    SplitSpec,
    Tail,
    split_model,
)
from splitfed.models.quantization import QUANTIZATIONS

__all__ = [
    "PARTS",
    "QUANTIZATIONS",
    "Body",
    "Family",
    "Head",
    "PartCache",
    "SplitModel",
    "SplitPart",
    "SplitSpec",
    "Tail",
    "extend_mask",
    "family_for",
    "positions_from_mask",
    "registered_families",
    "split_model",
]
