"""Partition of Hugging Face causal LMs into head, body and tail (the U-shaped split)."""

# First, before transformers' model code imports it: torchao without its import-time
# noise (models/quantization.py). peft, and bitsandbytes with it, are imported only where
# LoRA is used, through models/peft_import.py.
from splitfed.models.quantization import prepare_torchao

prepare_torchao()

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
