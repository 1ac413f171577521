"""Model families: where each causal-LM architecture keeps its parts, by name.

Each family lives in one file of this package and registers itself; :func:`family_for`
finds the family of a Hugging Face config (by its ``model_type``).
"""

from __future__ import annotations

from splitfed.models.families.base import Family, family_for, register_family, registered_families

# Importing the family modules registers them.
from splitfed.models.families import chatglm, glm, gpt2, llama  # noqa: F401  # isort: skip

__all__ = ["Family", "family_for", "register_family", "registered_families"]
