"""A federation in this process, without gRPC: settings, deltas and one upload as the
servicer makes it (begin, tensors, commit, end)."""

from __future__ import annotations

import torch

from splitfed.services.aggregator.federation import Federation
from splitfed.services.aggregator.settings import FederationSettings

SHAPES = {"a.lora_A.weight": (2, 3), "a.lora_B.weight": (3, 2)}
MEMBERS = ("a", "b", "c", "d", "e")


def settings(**overrides: object) -> FederationSettings:
    values: dict[str, object] = {
        "name": "fed",
        "rounds": 3,
        "min_clients": 2,
        "deadline_s": 60,
        "members": MEMBERS,
        "schema": {name: list(shape) for name, shape in SHAPES.items()},
    }
    values.update(overrides)
    return FederationSettings(**values)  # type: ignore[arg-type]


def deltas(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(shape, generator=g) * scale for n, shape in SHAPES.items()}


def upload(
    fed: Federation, who: str, tensors: dict[str, torch.Tensor], samples: int, base: int = -1
) -> tuple[bool, int]:
    """One member's upload of ``tensors`` for the current round (``base``: the version it
    trained from, default the current one); (duplicate, updates counted)."""
    s = fed.state
    pending = fed.begin_upload(who, s.round, s.attempt, s.version if base < 0 else base, samples)
    if pending is None:
        return True, len(fed.contributors)
    try:
        for name, tensor in tensors.items():
            pending.write(name, tensor)
        return fed.commit_upload(pending)
    finally:
        fed.end_upload(pending)
