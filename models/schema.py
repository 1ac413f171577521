"""The schema of an adapter: the names and shapes of its tensors.

A federation fixes its schema in its configuration (the shape of its initial global
version): the aggregator accepts an update only if it holds exactly these tensors, so no
upload can choose what the round averages, and a client checks at join that its own
adapter has this schema. A schema is written as JSON::

    {"format": "splitfed-adapter-schema/1",
     "tensors": {"model.layers.0.self_attn.q_proj.lora_A.weight": {"shape": [16, 4096],
                                                                  "dtype": "float32"}}}

(``splitfed adapters schema --config client.toml`` prints the one of a client's
adapter); a safetensors file of the adapter serves as well (only its header is read).
Every name must be a plain tensor name: letters, digits, ``_ . -``, at most 256
characters, not starting with ``__`` (``__metadata__`` is the safetensors header's own
key).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from splitfed.files import StrPath

SCHEMA_FORMAT = "splitfed-adapter-schema/1"
# Deltas and global versions are float32 (secure aggregation masks them as int64).
SCHEMA_DTYPE = "float32"
MAX_TENSORS = 1 << 16
MAX_RANK = 4
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,255}")

# tensor name -> shape
Schema = dict[str, tuple[int, ...]]


def validate_tensor_name(name: str) -> str:
    """``name`` if it is a plain tensor name, else ``ValueError`` saying why."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.startswith("__"):
        raise ValueError(
            f"tensor name {name!r} is not allowed: use 1-256 characters of letters, digits, "
            "'_', '.', '-', not starting with '__' ('__metadata__' is reserved) or '.'/'-'"
        )
    return name


def _shape(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) > MAX_RANK:
        raise ValueError(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} sizes")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in value):
        raise ValueError(f"tensor {name!r}: shape {value!r} must hold non-negative integers")
    return tuple(int(d) for d in value)


def schema_from_mapping(data: Mapping[str, Any], where: str = "schema") -> Schema:
    """A schema from ``{"tensors": {name: {"shape": [...], "dtype": "float32"}}}`` (the
    JSON form) or the bare ``{name: {...}}`` / ``{name: [shape]}`` mapping."""
    tensors = data.get("tensors", data) if isinstance(data, Mapping) else None
    if "format" in data and data["format"] != SCHEMA_FORMAT:
        raise ValueError(f"{where}: format {data['format']!r} is not {SCHEMA_FORMAT!r}")
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError(f"{where}: no tensors")
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"{where}: more than {MAX_TENSORS} tensors")
    schema: Schema = {}
    for name, spec in tensors.items():
        try:
            validate_tensor_name(name)
            if isinstance(spec, Mapping):
                dtype = spec.get("dtype", SCHEMA_DTYPE)
                if dtype != SCHEMA_DTYPE:
                    raise ValueError(f"tensor {name!r}: dtype {dtype!r}; adapters are float32")
                schema[name] = _shape(name, spec.get("shape"))
            else:
                schema[name] = _shape(name, spec)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return dict(sorted(schema.items()))


def schema_of(tensors: Mapping[str, torch.Tensor]) -> Schema:
    """The schema of adapter tensors (names checked)."""
    return schema_from_mapping({n: list(t.shape) for n, t in tensors.items()}, "adapter")


def load_schema(path: StrPath) -> Schema:
    """A schema from a ``.json`` file, or the header of a ``.safetensors`` adapter."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"schema file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}  # noqa: SIM118
        except Exception as exc:  # the library raises its own error types
            raise ValueError(
                f"schema file {path} is not a readable safetensors file: {exc}"
            ) from None
        return schema_from_mapping(shapes, str(path))
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"schema file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"schema file {path} must hold a JSON object")
    return schema_from_mapping(data, str(path))


def schema_json(schema: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    return {
        "format": SCHEMA_FORMAT,
        "tensors": {
            name: {"shape": list(shape), "dtype": SCHEMA_DTYPE}
            for name, shape in sorted(schema.items())
        },
    }


def write_schema(path: StrPath, schema: Mapping[str, tuple[int, ...]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(schema_json(schema), indent=1) + "\n")


def schema_digest(schema: Mapping[str, tuple[int, ...]]) -> str:
    """SHA-256 of the schema's canonical JSON: equal schemas, equal digests."""
    canonical = json.dumps(schema_json(schema), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def schema_bytes(schema: Mapping[str, tuple[int, ...]], itemsize: int = 4) -> int:
    return sum(math.prod(shape) * itemsize for shape in schema.values())


def adapter_schema(model_path: StrPath, adapter: Any, k: int = 1, m: int = 1) -> Schema:
    """The schema of a client's adapter (head and tail) for the model in ``model_path``,
    split at (k, m), with ``adapter`` (:class:`~splitfed.models.adapters.AdapterSettings`):
    what its clients upload in a federation. Reads only the model's config.json: the parts
    are built with storage but no weights (nothing is read or computed but the adapter's
    own initial values), so a 7B model's schema needs no checkpoint."""
    model_path = Path(model_path)
    from splitfed.models.loading import load_config

    return adapter_schema_for(load_config(model_path), adapter, k, m)


def adapter_schema_for(config: Any, adapter: Any, k: int = 1, m: int = 1) -> Schema:
    """:func:`adapter_schema` from a ``PretrainedConfig``."""
    from torch import nn

    from splitfed.models.adapters import adapter_state
    from splitfed.models.families import family_for
    from splitfed.models.parts import PART_CLASSES, SplitSpec, empty_base, meta_parameters

    family = family_for(config)
    spec = SplitSpec(family.num_layers(config), k, m)
    state: dict[str, torch.Tensor] = {}
    for part in ("head", "tail"):
        base = empty_base(config, family, part, spec.layers(part))
        lm_head: nn.Module | None = None
        if part == "tail":
            with meta_parameters():
                lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            lm_head.to_empty(device="cpu")
        base.to_empty(device="cpu")  # storage, never written: only shapes matter
        built = PART_CLASSES[part](family, config, spec, base, lm_head)
        adapter.apply(built)
        state.update(adapter_state(built))
        del built, base, lm_head
    return schema_of(state)
