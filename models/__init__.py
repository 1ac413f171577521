"""Partition of Hugging Face causal LMs into head, body and tail (the U-shaped split)."""

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
from splitfed.models.quantization import QUANTIZATIONS, prepare_imports

# Before anything imports peft (which imports bitsandbytes when it is installed), so that
# bitsandbytes' import does not reach for the network (models/quantization.py).
prepare_imports()

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
