"""Client-level differential privacy for federated uploads (DP-FedAvg).

McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent Language
Models" (ICLR 2018): every client's update (all its tensors together) is clipped to L2
norm ``clip_norm`` (C), the clipped updates are summed with equal weights, Gaussian noise
N(0, (noise_multiplier * C)^2) is added to every coordinate of the sum, and the sum is
divided by the number of contributors. Adding or removing one client changes the sum by
at most C, so each round is a Gaussian mechanism with noise multiplier sigma on the
client's participation, and rounds compose as sampled Gaussian mechanisms (the client
sampling rate q: the fraction of members selected).

Where the noise is added:

* plain rounds: the aggregator sees each update, clips it (:func:`clip_factor`) and adds
  the noise to the sum (:func:`add_noise`, with :func:`noise_generator`);
* secure aggregation: the aggregator sees only the sum, so each client clips its own
  update and adds N(0, (sigma * C)^2 / n) (:func:`privatize_update`, with
  :func:`client_noise_std`); the sum of m >= n such updates carries noise of standard
  deviation sigma * C * sqrt(m / n) >= sigma * C. The aggregator uses n = the round's
  ``min_clients``, the fewest updates a round closes with, so a round with dropouts still
  carries at least the target noise (more contributors: more noise than needed).

This module is the arithmetic; both the aggregator's strategy and the client use it, so
the noise the client adds is the one the statistical tests measure. The accountant over
rounds is :func:`federation_epsilon` (opacus' RDP accountant through
:class:`~splitfed.security.perturbation.PrivacyAccountant`).

Noise comes from torch's pseudo-random generators seeded from the OS (not a
cryptographically secure generator; floating-point Gaussian samples are not exactly
Gaussian), as for activation perturbation (docs/privacy.md).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping

import torch

from splitfed.security.perturbation import PrivacyAccountant


def _check(name: str, value: float, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = ">" if positive else ">="
        raise ValueError(f"{name} must be a finite number {bound} 0, got {value}")
    return float(value)


def squared_norm(update: Mapping[str, torch.Tensor]) -> float:
    """The squared L2 norm of all of ``update``'s tensors together (float64)."""
    return float(sum(float(t.detach().double().square().sum()) for t in update.values()))


def clip_factor(squared: float, clip_norm: float) -> float:
    """The factor that scales an update of squared norm ``squared`` to norm at most
    ``clip_norm``: ``min(1, clip_norm / norm)`` (1 for a zero update)."""
    _check("clip_norm", clip_norm, positive=True)
    if not math.isfinite(squared) or squared < 0:
        raise ValueError(f"the update's squared norm must be finite, got {squared}")
    if squared <= clip_norm * clip_norm:
        return 1.0
    return clip_norm / math.sqrt(squared)


def client_noise_std(noise_multiplier: float, clip_norm: float, clients: int) -> float:
    """The noise each of ``clients`` updates carries so that their sum carries
    ``noise_multiplier * clip_norm``: that over sqrt(clients)."""
    _check("noise_multiplier", noise_multiplier)
    _check("clip_norm", clip_norm, positive=True)
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ValueError(f"clients must be an int >= 1, got {clients!r}")
    return noise_multiplier * clip_norm / math.sqrt(clients)


def noise_generator() -> torch.Generator:
    """A CPU generator seeded from the OS (fresh noise for every release)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def add_noise(tensor: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """``tensor`` plus N(0, std^2) on every coordinate, drawn in float64, in ``tensor``'s
    dtype (a new tensor; ``std == 0`` returns ``tensor`` itself)."""
    _check("noise standard deviation", std)
    if std == 0:
        return tensor
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
    return (tensor.double() + noise * std).to(tensor.dtype)


def privatize_update(
    update: Mapping[str, torch.Tensor],
    clip_norm: float,
    noise_std: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """What a client sends under DP-FedAvg with secure aggregation: ``update`` clipped to
    L2 norm ``clip_norm`` (all tensors together), plus N(0, noise_std^2) on every
    coordinate (float32). ``generator`` draws the noise (default: :func:`noise_generator`,
    seeded from the OS). Refuses an update with NaN or infinity."""
    _check("clip_norm", clip_norm, positive=True)
    _check("noise_std", noise_std)
    squared = squared_norm(update)
    if not math.isfinite(squared):
        raise ValueError("the update holds NaN or infinite values (or its norm overflows)")
    factor = clip_factor(squared, clip_norm)
    generator = generator if generator is not None else noise_generator()
    out = {}
    for name in sorted(update):  # a fixed order: a seeded generator gives the same noise
        clipped = update[name].detach().to(torch.float32) * factor
        out[name] = add_noise(clipped, noise_std, generator)
    return out


def federation_epsilon(rounds: Iterable[tuple[float, float]], delta: float) -> float:
    """Epsilon (at ``delta``) of a federation's closed rounds, each a sampled Gaussian
    mechanism given as (noise multiplier, client sampling rate): opacus' RDP accountant,
    one step per round (0 before the first, inf if a round had no noise)."""
    history: list[tuple[float, float, int]] = []
    for sigma, rate in rounds:
        if history and history[-1][:2] == (sigma, rate):
            history[-1] = (sigma, rate, history[-1][2] + 1)
        else:
            history.append((sigma, rate, 1))
    accountant = PrivacyAccountant(0.0, 1.0, delta)
    accountant.load_history(history)
    return accountant.epsilon
