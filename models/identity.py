"""What an adapter was trained against: the quantization of the body and of the client parts.

A LoRA or prefix trained on top of a quantized body learned to correct that body, with its
quantization error; run on a body quantized differently (or not at all: a merge into the
full-precision model) it gives outputs that differ by the difference of the two errors. So
the quantization is part of the model's identity: every adapter splitfed writes records it
(the training checkpoint's ``client.json`` and ``adapter.safetensors``, the exported
adapters, a federation member's recorded updates) under :data:`BODY_KEY` and
:data:`PARTS_KEY`, and whoever uses the adapter again compares (:func:`body_mismatch`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from splitfed.models.quantization import NONE, QUANTIZATIONS, check_quantization

# Metadata keys (safetensors metadata, client.json, splitfed.json).
BODY_KEY = "body_quantization"
PARTS_KEY = "quantization"


def stated(mode: str) -> str:
    """A quantization as a backbone states it: "" (a backbone that predates quantization,
    so an unquantized body) is "none"; any other value as it is (a newer backbone may
    name a mode this client does not know: it is still compared, not refused)."""
    return mode or NONE


@dataclass(frozen=True)
class TrainedAgainst:
    """The quantization of the body and of the client parts (head and tail) an adapter
    was trained with."""

    body: str = NONE
    parts: str = NONE

    def __post_init__(self) -> None:
        object.__setattr__(self, "body", stated(self.body))
        check_quantization(self.parts)

    def metadata(self) -> dict[str, str]:
        return {BODY_KEY: self.body, PARTS_KEY: self.parts}

    def describe(self) -> str:
        return f"body {self.body}, client parts {self.parts}"

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> TrainedAgainst | None:
        """From an adapter's metadata: the keys themselves, or inside the JSON under
        ``splitfed`` (``adapters export --format safetensors``); ``None`` when the adapter
        does not record it (written before quantization existed)."""
        found: object = metadata
        if BODY_KEY not in metadata and isinstance(metadata.get("splitfed"), str):
            try:
                found = json.loads(metadata["splitfed"])
            except ValueError:
                return None
        if not isinstance(found, Mapping) or BODY_KEY not in found:
            return None
        parts = str(found.get(PARTS_KEY) or NONE)
        return cls(str(found[BODY_KEY]), parts if parts in QUANTIZATIONS else NONE)


def _a(mode: str) -> str:
    """``mode`` with its article: "an nf4", "a full-precision (none)"."""
    if mode == NONE:
        return "a full-precision (none)"
    article = "an" if mode[:1] in "aeiou" or mode.startswith("nf") else "a"
    return f"{article} {mode}"


def body_mismatch(trained: str, serving: str, *, where: str = "this backbone serves") -> str:
    """A warning if an adapter trained against a ``trained`` body is used with a
    ``serving`` one (both as stated; "" is "none"), else ""."""
    trained, serving = stated(trained), stated(serving)
    if trained == serving:
        return ""
    return (
        f"the adapter was trained against {_a(trained)} body but {where} "
        f"{'a full-precision (none) one' if serving == NONE else serving}: "
        "its outputs will differ"
    )


def parts_mismatch(trained: str, loaded: str) -> str:
    """A warning if the client parts were trained ``trained``-quantized and now load
    ``loaded``, else ""."""
    if trained == loaded:
        return ""
    return (
        f"the adapter was trained with the client parts (head and tail) quantized {trained} "
        f"but [training] quantization is {loaded} now: its outputs will differ"
    )


def mismatches(trained: TrainedAgainst | None, body: str, parts: str) -> list[str]:
    """The warnings for an adapter trained against ``trained`` (``None``: it does not say)
    that is used with a ``body`` (as the backbone states it) and client ``parts``."""
    if trained is None:
        return []
    found = (body_mismatch(trained.body, body), parts_mismatch(trained.parts, parts))
    return [warning for warning in found if warning]


def merge_warning(body: str) -> str:
    """What merging an adapter trained against a quantized ``body`` into the unquantized
    model means ("" for an unquantized body)."""
    if stated(body) == NONE:
        return ""
    return (
        f"the adapter was trained against {_a(body)} body: merging it into the unquantized "
        "model (--merged) shifts its outputs slightly (by the quantization error); "
        "evaluate after merging"
    )
