"""Aggregation strategies, looked up by name.

Every strategy turns the sample-weighted average of the clients' deltas into the next
global offset (the global adapter minus the seeded initial one). ``fedavg`` adds the
average delta (so the global adapter is exactly the weighted average of the clients'
adapters when they all started from the previous version); ``fedexp`` adds it scaled by
a step size computed from how much the clients' updates disagree (Jhunjhunwala et al.
2023); ``fedavgm`` and ``fedadam`` treat the average delta as a pseudo-gradient for a
server optimizer (Hsu et al. 2019; Reddi et al., "Adaptive Federated Optimization",
2021). Server-optimizer state is a dict of tensors that the aggregator persists with
each version.

``median`` and ``trimmed_mean`` are *robust* strategies (Yin et al., "Byzantine-Robust
Distributed Learning", ICML 2018): instead of the sample-weighted mean they take, for
every coordinate, the median of the clients' deltas, or their mean after dropping the
``trim_fraction`` largest and smallest values. A few hostile updates, however large,
then move the result only within the range of the honest ones. They ignore sample
counts (a count is the client's word) and need every update in the clear: plain rounds
only, not with secure aggregation. The aggregator keeps each update on disk until the
round closes (one adapter per contributor instead of one running sum).

``dp_fedavg`` is FedAvg with client-level differential privacy (McMahan et al., ICLR
2018; :mod:`splitfed.security.dp_fedavg`): every update is clipped to L2 norm
``clip_norm`` (all its tensors together), the clipped updates are weighed equally (a
sample count is the client's word, and a weight would change the sensitivity), Gaussian
noise of standard deviation ``noise_multiplier * clip_norm`` is added to every coordinate
of their sum, and the sum is divided by the number of contributors. With secure
aggregation the clients clip and noise their own updates (the round plan tells them how).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]


class Strategy(Protocol):
    @property
    def name(self) -> str: ...

    def step(
        self, offset: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], state: Tensors
    ) -> Tensors:
        """The next offset from the current one and the average delta; updates ``state``."""
        ...


def _current(offset: Mapping[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    current = offset.get(name)
    return torch.zeros_like(like) if current is None else current


@dataclass(frozen=True)
class FedAvg:
    name: str = "fedavg"

    def step(
        self, offset: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], state: Tensors
    ) -> Tensors:
        return {n: _current(offset, n, d) + d for n, d in delta.items()}


@dataclass(frozen=True)
class FedExP:
    """FedAvg with an extrapolated server step (Jhunjhunwala, Wang and Joshi, "FedExP:
    Speeding up Federated Averaging via Extrapolation", ICLR 2023):

        offset <- offset + eta * delta,
        eta = max(1, sum_k p_k |delta_k|^2 / (2 (|delta|^2 + epsilon))),

    ``delta`` the sample-weighted average of the clients' deltas ``delta_k`` (weights
    ``p_k``), norms over all tensors. The more the clients' updates point different ways
    (non-IID data), the shorter their average is against them and the longer the step;
    with identical updates eta is 1 (FedAvg). eta is capped at ``max_scale``. The
    aggregator computes it from each update's norm as the update arrives, so it cannot
    be used with secure aggregation (which hides each update)."""

    epsilon: float = 1e-6
    max_scale: float = 10.0
    name: str = "fedexp"

    def __post_init__(self) -> None:
        if self.epsilon < 0 or self.max_scale < 1:
            raise ValueError("fedexp needs epsilon >= 0 and max_scale >= 1")

    def scale(self, update_sq: float, average_sq: float) -> float:
        """eta from sum_k p_k |delta_k|^2 and |delta|^2 (1 when every update is zero)."""
        if update_sq <= 0:
            return 1.0
        if average_sq + self.epsilon <= 0:
            return self.max_scale
        return min(self.max_scale, max(1.0, update_sq / (2 * (average_sq + self.epsilon))))

    def step(
        self, offset: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], state: Tensors
    ) -> Tensors:
        """``state["scale"]``: this round's eta, from :meth:`scale` (the federation's)."""
        eta = float(state["scale"]) if "scale" in state else 1.0
        return {n: _current(offset, n, d) + eta * d for n, d in delta.items()}


@dataclass(frozen=True)
class _ServerOptimizer:
    """A server optimizer: offset <- offset + the update it makes of the average delta,
    tensor by tensor (:meth:`update`, which keeps its moments in ``state``)."""

    def step(
        self, offset: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], state: Tensors
    ) -> Tensors:
        return {n: _current(offset, n, d) + self.update(n, d, state) for n, d in delta.items()}

    def update(self, name: str, delta: torch.Tensor, state: Tensors) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class FedAvgM(_ServerOptimizer):
    """Server momentum: v <- beta v + delta; offset <- offset + server_lr v."""

    server_lr: float = 1.0
    momentum: float = 0.9
    name: str = "fedavgm"

    def __post_init__(self) -> None:
        if self.server_lr <= 0 or not 0 <= self.momentum < 1:
            raise ValueError("fedavgm needs server_lr > 0 and 0 <= momentum < 1")

    def update(self, name: str, delta: torch.Tensor, state: Tensors) -> torch.Tensor:
        velocity = state.get(f"v.{name}")
        velocity = delta.clone() if velocity is None else velocity.mul_(self.momentum).add_(delta)
        state[f"v.{name}"] = velocity
        return self.server_lr * velocity


@dataclass(frozen=True)
class FedAdam(_ServerOptimizer):
    """m <- b1 m + (1-b1) delta; v <- b2 v + (1-b2) delta^2;
    offset <- offset + server_lr m / (sqrt(v) + tau)."""

    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    name: str = "fedadam"

    def __post_init__(self) -> None:
        if self.server_lr <= 0 or self.tau <= 0:
            raise ValueError("fedadam needs server_lr > 0 and tau > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("fedadam needs 0 <= beta1, beta2 < 1")

    def update(self, name: str, delta: torch.Tensor, state: Tensors) -> torch.Tensor:
        m = state.get(f"m.{name}", torch.zeros_like(delta))
        v = state.get(f"v.{name}", torch.zeros_like(delta))
        m = m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        v = v.mul_(self.beta2).addcmul_(delta, delta, value=1 - self.beta2)
        state[f"m.{name}"], state[f"v.{name}"] = m, v
        return self.server_lr * m / (v.sqrt() + self.tau)


@dataclass(frozen=True)
class Median(FedAvg):
    """Coordinate-wise median of the clients' deltas, added to the offset (FedAvg's step
    with a robust combination)."""

    name: str = "median"
    robust: ClassVar[bool] = True

    def combine(self, values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """``values`` [clients, elements] -> [elements]."""
        median: np.ndarray[Any, Any] = np.median(values, axis=0)
        return median.astype(np.float32, copy=False)


@dataclass(frozen=True)
class TrimmedMean(FedAvg):
    """Coordinate-wise mean of the clients' deltas without the ``floor(trim_fraction *
    clients)`` largest and smallest values of each coordinate."""

    name: str = "trimmed_mean"
    trim_fraction: float = 0.1
    robust: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError("trimmed_mean needs 0 <= trim_fraction < 0.5")

    def trimmed(self, clients: int) -> int:
        return math.floor(self.trim_fraction * clients)

    def combine(self, values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        cut = self.trimmed(values.shape[0])
        ordered = np.sort(values, axis=0)
        kept = ordered[cut : values.shape[0] - cut]
        mean: np.ndarray[Any, Any] = kept.mean(axis=0, dtype=np.float64)
        return mean.astype(np.float32)


@dataclass(frozen=True)
class DPFedAvg(FedAvg):
    """FedAvg of updates clipped to ``clip_norm`` and weighed equally, with Gaussian noise
    N(0, (noise_multiplier * clip_norm)^2) on every coordinate of their sum; ``delta`` is
    the delta of the (epsilon, delta) the aggregator reports. Both ``clip_norm`` and
    ``noise_multiplier`` must be given (0 noise: clipped FedAvg, not private)."""

    clip_norm: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    name: str = "dp_fedavg"

    def __post_init__(self) -> None:
        if self.clip_norm is None or self.noise_multiplier is None:
            raise ValueError(
                "dp_fedavg needs clip_norm (the L2 norm, all tensors together, every update "
                "is clipped to) and noise_multiplier (sigma: the noise on the sum has "
                "standard deviation sigma * clip_norm) in strategy_options, e.g. "
                "strategy_options = {clip_norm = 1.0, noise_multiplier = 1.0}"
            )
        for option in ("clip_norm", "noise_multiplier", "delta"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"dp_fedavg's {option} must be a number, got {value!r}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"dp_fedavg needs clip_norm > 0 (finite), got {self.clip_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(
                f"dp_fedavg needs noise_multiplier >= 0 (finite), got {self.noise_multiplier}"
            )
        if not 0 < self.delta < 1:
            raise ValueError(
                f"dp_fedavg needs 0 < delta < 1, got {self.delta}; choose it below "
                "1 / (number of members), e.g. 1e-5"
            )

    @property
    def clip(self) -> float:
        assert self.clip_norm is not None
        return self.clip_norm

    @property
    def sigma(self) -> float:
        assert self.noise_multiplier is not None
        return self.noise_multiplier

    @property
    def sum_noise_std(self) -> float:
        """The noise's standard deviation on every coordinate of the sum."""
        return self.sigma * self.clip


def private_strategy(strategy: object) -> DPFedAvg | None:
    """``strategy`` if it is differentially private (``dp_fedavg``), else None."""
    return strategy if isinstance(strategy, DPFedAvg) else None


class RobustStrategy(Strategy, Protocol):
    def combine(self, values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The combined delta of one slice of elements from every update."""
        ...


def is_robust(strategy: object) -> bool:
    """Whether ``strategy`` combines the individual updates (not their running sum)."""
    return bool(getattr(strategy, "robust", False))


STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedexp": FedExP,
    "fedadam": FedAdam,
    "median": Median,
    "trimmed_mean": TrimmedMean,
    "dp_fedavg": DPFedAvg,
}


def make_strategy(name: str, options: Mapping[str, float] | None = None) -> Strategy:
    factory = STRATEGIES.get(name)
    if factory is None:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    try:
        return factory(**dict(options or {}))
    except TypeError as exc:
        raise ValueError(f"strategy {name!r}: {exc}") from None
