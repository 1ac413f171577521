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

__all__ = [
    "PARTS",
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
