"""What both sides of a split run identically: adapter initialisation, AdamW with a
learning-rate schedule, and clipping by the global gradient norm across both sides.

Each side keeps an optimizer for its own adapter tensors only. AdamW works tensor by
tensor, so two optimizers over the two halves of the tensors behave as one over all of
them; clipping needs the norm over all of them, so the sides exchange squared norms and
both scale their gradients by the same factor.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class OptimizerSettings:
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"
    warmup_steps: int = 0
    # The schedule's length ("linear" and "cosine"). 0 leaves it to the run: a federation
    # member sets it to the plan's rounds x local_steps (:meth:`with_length`); a schedule
    # whose length is still open cannot build an optimizer.
    total_steps: int = 0

    def __post_init__(self) -> None:
        # Written so that NaN fails every check (a comparison with NaN is False).
        if not 0 < self.learning_rate < math.inf:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not 0 < self.eps < math.inf:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.warmup_steps < 0 or self.total_steps < 0:
            raise ValueError("warmup_steps and total_steps must be >= 0")
        if self.schedule != "constant" and 0 < self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"schedule {self.schedule!r} needs total_steps > warmup_steps "
                f"({self.total_steps} <= {self.warmup_steps})"
            )

    @property
    def open_length(self) -> bool:
        """Whether the schedule decays but its length (total_steps) is not set yet."""
        return self.schedule != "constant" and self.total_steps == 0

    def with_length(self, total_steps: int) -> OptimizerSettings:
        """These settings with the schedule's length ``total_steps`` if it is open; an
        explicit total_steps wins."""
        if not self.open_length:
            return self
        return replace(self, total_steps=total_steps)

    def factor(self, step: int) -> float:
        """Learning-rate multiplier after ``step`` optimizer steps."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min(
            1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        )
        if self.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], settings: OptimizerSettings
) -> tuple[AdamW, LambdaLR]:
    if settings.open_length:
        raise ValueError(
            f"schedule {settings.schedule!r} needs total_steps (> warmup_steps, "
            f"{settings.warmup_steps}): set [optimizer] total_steps"
        )
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: add an adapter first")
    optimizer = AdamW(
        params,
        lr=settings.learning_rate,
        betas=(settings.beta1, settings.beta2),
        eps=settings.eps,
        weight_decay=settings.weight_decay,
    )
    return optimizer, LambdaLR(optimizer, settings.factor)


def grad_sq_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """Sum of squared gradient entries (float64), over the parameters that have one."""
    total = 0.0
    for parameter in parameters:
        if parameter.grad is not None:
            total += float(parameter.grad.detach().double().pow(2).sum())
    return total


def clip_factor(total_sq_norm: float, max_norm: float) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_`` applies for this total norm."""
    if max_norm <= 0:
        return 1.0
    norm = math.sqrt(total_sq_norm)
    return min(1.0, max_norm / (norm + 1e-6))


def scale_grads(parameters: Iterable[torch.nn.Parameter], factor: float) -> None:
    if factor == 1.0:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad.mul_(factor)


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


@torch.no_grad()
def init_adapter_tensors(tensors: Mapping[str, torch.Tensor], seed: int) -> None:
    """Initialise adapter tensors (by global name) so any party gets the same values.

    LoRA A: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) (``nn.Linear``'s default, as peft);
    LoRA B: zeros (the adapter starts as a no-op); prefixes: normal(0, 0.02).
    """
    for name, tensor in tensors.items():
        if ".lora_B." in name:
            tensor.zero_()
            continue
        generator = _generator(seed, name)
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(tensor.shape[1])
            values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
            tensor.copy_(values * 2 * bound - bound)
        elif name.startswith("prefix."):
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * 0.02)
        else:
            raise ValueError(f"{name!r} is not an adapter tensor")


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, scheduler: LambdaLR
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer and schedule state split into tensors (for safetensors) and the rest
    (JSON-able), to checkpoint without pickle."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    meta = {
        "param_groups": state["param_groups"],
        "scalars": scalars,
        "scheduler": scheduler.state_dict(),
    }
    return tensors, meta


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(dict(meta["scheduler"]))
