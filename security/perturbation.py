"""Differential privacy for what a client sends to the backbone.

Every hidden-state vector the client sends (``h1``, one per token) is clipped to L2 norm
``clip_norm`` (C) and gets Gaussian noise N(0, (noise_multiplier * C)^2) per coordinate:
the Gaussian mechanism with sensitivity C. Optionally the gradients the client sends back
(``grad_h2``, which depend on the labels) are treated the same way with their own clip norm
and noise multiplier. :class:`PrivacyAccountant` turns the noise multiplier, the sampling
rate and the number of steps into the (epsilon, delta) spent, with opacus' RDP accountant.

What the guarantee covers, and what it does not (docs/privacy.md has the details):

* The unit of privacy is one token's vector: two datasets are neighbours if they differ
  in the vector at one position of one example. A token of the input changes the vectors
  of every later position (causal attention in the head), so a whole example of T tokens
  is protected only at noise multiplier ``noise_multiplier / sqrt(T)``.
* Gradients (``grad_h2``) are covered only with ``grad_noise_multiplier > 0``; without
  it they travel in the clear and the label side is not protected.
* The noise comes from torch's pseudo-random generators, which are not cryptographically
  secure; a fixed ``seed`` lets anyone who knows it remove the noise (tests only).
* Evaluation forwards are perturbed unless ``evaluation = false``; generation (the
  prompt's vectors, then each new token's) only with ``generation = true``. Every release
  is counted by kind in :class:`~splitfed.security.releases.PrivacyLedger`: perturbed
  ones in the same accountant as training, those sent without noise apart, as not covered.
  What never leaves the client (its adapters, its checkpoints) is neither released nor
  covered.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

import numpy as np
import torch
from prometheus_client import Counter, Gauge

PRIVACY_EPSILON = Gauge(
    "splitfed_privacy_epsilon",
    "Epsilon of the (epsilon, delta) differential privacy a training session has spent "
    "on what it sent to the backbone (+Inf when it sends hidden states without noise).",
    ["session"],
)
PRIVACY_RELEASES = Counter(
    "splitfed_privacy_releases",
    "Hidden-state releases a client sent to the backbone, by kind (training, evaluation, "
    "generation) and whether they carried noise and were accounted (protected true) or "
    "were sent in the clear, outside epsilon (protected false).",
    ["kind", "protected"],
)

# Streams of noise, each derived from (seed, stream, release, micro-batch).
HIDDEN_STREAM = 0
GRADIENT_STREAM = 1
EVAL_STREAM = 2
GENERATION_STREAM = 3

_TINY_NORM = 1e-12


def _check_number(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class PerturbationSettings:
    """Clipping and noise for what a client sends to the backbone (off by default).

    ``clip_norm`` (C) bounds the L2 norm of every hidden-state vector sent; 0 turns the
    perturbation of hidden states off. ``noise_multiplier`` (sigma) adds N(0, (sigma*C)^2)
    noise to each coordinate. ``grad_clip_norm`` and ``grad_noise_multiplier`` do the same
    for the gradients sent back (``grad_h2``). ``delta`` is the delta of the reported
    (epsilon, delta). ``seed`` fixes the noise (reproducible runs and tests only: anyone
    who knows it can remove the noise); ``None`` draws a fresh seed from the OS.
    ``evaluation`` perturbs the hidden states of evaluation forwards (on by default),
    ``generation`` those generation sends (the prompt's, then each new token's; off by
    default): both with ``clip_norm`` and ``noise_multiplier``.
    """

    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    grad_clip_norm: float = 0.0
    grad_noise_multiplier: float = 0.0
    delta: float = 1e-5
    seed: int | None = None
    evaluation: bool = True
    generation: bool = False

    def __post_init__(self) -> None:
        for name in ("evaluation", "generation"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.generation and self.clip_norm == 0:
            raise ValueError(
                "generation = true needs clip_norm > 0 (and noise_multiplier > 0 to protect "
                "anything): generation's hidden states are clipped to clip_norm and noised"
            )
        for name in ("clip_norm", "noise_multiplier", "grad_clip_norm", "grad_noise_multiplier"):
            _check_number(name, getattr(self, name))
        if self.noise_multiplier > 0 and self.clip_norm == 0:
            raise ValueError(
                f"noise_multiplier {self.noise_multiplier} needs clip_norm > 0: the noise's "
                "standard deviation is noise_multiplier * clip_norm"
            )
        if self.grad_noise_multiplier > 0 and self.grad_clip_norm == 0:
            raise ValueError(
                f"grad_noise_multiplier {self.grad_noise_multiplier} needs grad_clip_norm > 0: "
                "the noise's standard deviation is grad_noise_multiplier * grad_clip_norm"
            )
        if not 0 < self.delta < 1:
            raise ValueError(
                f"delta must be in (0, 1), got {self.delta}; choose it below "
                "1 / (number of training examples), e.g. 1e-5"
            )
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0 or unset, got {self.seed}")

    @property
    def enabled(self) -> bool:
        """Whether anything is clipped or noised."""
        return self.hidden_enabled or self.gradient_enabled

    @property
    def hidden_enabled(self) -> bool:
        return self.clip_norm > 0

    @property
    def gradient_enabled(self) -> bool:
        return self.grad_clip_norm > 0

    @property
    def accounted_noise_multiplier(self) -> float:
        """The noise multiplier of one step as the accountant sees it: that of the hidden
        states, composed with the gradients' when those are noised too (0 when the hidden
        states carry no noise: then nothing is private)."""
        if self.noise_multiplier == 0:
            return 0.0
        if self.grad_noise_multiplier == 0:
            return self.noise_multiplier
        return composed_noise_multiplier(self.noise_multiplier, self.grad_noise_multiplier)


def composed_noise_multiplier(*noise_multipliers: float) -> float:
    """The single Gaussian mechanism equal to several on the same data.

    Gaussian mechanisms with noise multipliers s_i compose, adaptively, to one with
    ``(sum_i s_i^-2)^-1/2`` (Dong, Roth and Su, "Gaussian differential privacy", 2019):
    the hidden states and the gradients of one step are released for the same sampled
    examples, so one step is one sampled Gaussian mechanism with that multiplier.
    """
    if not noise_multipliers or any(s <= 0 for s in noise_multipliers):
        return 0.0
    return 1.0 / math.sqrt(sum(s**-2 for s in noise_multipliers))


def _clip_and_noise(
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    _check_number("clip_norm", clip_norm)
    _check_number("noise_multiplier", noise_multiplier)
    if clip_norm == 0:
        if noise_multiplier > 0:
            raise ValueError("noise_multiplier > 0 needs clip_norm > 0")
        return x
    # float32 at least (bf16/fp16 norms overflow or round badly), float64 stays float64.
    compute = torch.promote_types(x.dtype, torch.float32)
    values = x.to(compute)
    norms = torch.linalg.vector_norm(values, dim=-1, keepdim=True)
    factor = torch.clamp(clip_norm / norms.clamp_min(_TINY_NORM), max=1.0)
    out = values * factor
    if noise_multiplier > 0:
        device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, dtype=compute, device=device)
        out = out + noise.to(x.device) * (noise_multiplier * clip_norm)
    if attention_mask is not None:
        if attention_mask.shape != x.shape[:-1]:
            raise ValueError(
                f"attention mask of shape {list(attention_mask.shape)} does not match "
                f"tensor of shape {list(x.shape)}"
            )
        keep = attention_mask.to(device=x.device).bool().unsqueeze(-1)
        out = torch.where(keep, out, torch.zeros_like(out))
    return out.to(x.dtype)


def perturb_hidden(
    h: torch.Tensor,
    attention_mask: torch.Tensor | None,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Clip every token vector of ``h`` (its last dimension) to L2 norm ``clip_norm`` and
    add N(0, (noise_multiplier * clip_norm)^2) noise to each coordinate.

    Each vector is scaled by ``min(1, C / ||h_t||)``, so vectors no longer than C are
    unchanged. Autograd flows through the clipping; the noise is an additive constant.
    Padded positions (``attention_mask == 0``) become zeros: with right padding their
    vectors depend on the tokens before them, zeros carry nothing, and the backbone masks
    them out as keys, so no real position's output depends on them. Norms and noise are
    computed in float32 (float64 for float64) and the result is cast back to ``h``'s dtype
    (bf16/fp16 round the clipped norm by up to half a unit in the last place).
    ``clip_norm == 0`` returns ``h`` itself. ``generator`` (on any device) draws the noise;
    ``None`` uses torch's global one.
    """
    return _clip_and_noise(h, attention_mask, clip_norm, noise_multiplier, generator)


def perturb_gradient(
    grad: torch.Tensor,
    attention_mask: torch.Tensor | None,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`perturb_hidden` for the gradients sent back to the backbone (``grad_h2``):
    per-token clipping to ``clip_norm``, noise N(0, (noise_multiplier * clip_norm)^2),
    zeros at padded positions; ``clip_norm == 0`` returns ``grad`` itself."""
    with torch.no_grad():
        return _clip_and_noise(grad, attention_mask, clip_norm, noise_multiplier, generator)


class Perturber:
    """Applies :class:`PerturbationSettings` with noise derived from (seed, stream,
    release, micro-batch). A release is one attempt at sending a step (the accountant's
    step count), so a step redone after a lost stream gets fresh noise and is accounted
    again, and the same seed gives the same noise run after run."""

    def __init__(self, settings: PerturbationSettings) -> None:
        self.settings = settings
        self.seed = settings.seed if settings.seed is not None else secrets.randbits(63)

    def generator(
        self, stream: int, release: int, micro: int, device: torch.device
    ) -> torch.Generator:
        entropy = np.random.SeedSequence([self.seed, stream, release, micro])
        seed = int(entropy.generate_state(1, dtype=np.uint64)[0])
        return torch.Generator(device=device).manual_seed(seed)

    def hidden(
        self,
        h: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        release: int,
        micro: int,
        stream: int = HIDDEN_STREAM,
    ) -> torch.Tensor:
        s = self.settings
        if not s.hidden_enabled:
            return h
        generator = self.generator(stream, release, micro, h.device)
        return perturb_hidden(h, attention_mask, s.clip_norm, s.noise_multiplier, generator)

    def gradient(
        self, grad: torch.Tensor, attention_mask: torch.Tensor | None, *, release: int, micro: int
    ) -> torch.Tensor:
        s = self.settings
        if not s.gradient_enabled:
            return grad
        generator = self.generator(GRADIENT_STREAM, release, micro, grad.device)
        return perturb_gradient(
            grad, attention_mask, s.grad_clip_norm, s.grad_noise_multiplier, generator
        )


@dataclass(frozen=True)
class PrivacySpent:
    """What an accountant reports: (epsilon, delta) over ``steps``, and of one step."""

    epsilon: float
    delta: float
    step_epsilon: float
    steps: int
    noise_multiplier: float
    sample_rate: float


History = list[tuple[float, float, int]]


class PrivacyAccountant:
    """(epsilon, delta) of repeated sampled Gaussian mechanisms, by opacus' RDP accountant.

    ``noise_multiplier`` is the noise's standard deviation over the sensitivity (the clip
    norm); ``sample_rate`` the probability that an example takes part in a step (batch
    examples / dataset examples; 1.0 when unknown, which assumes no amplification by
    sampling). The accountant assumes Poisson sampling; shuffled fixed-size batches are
    the usual approximation of it. A noise multiplier of 0 gives epsilon = inf.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float) -> None:
        _check_number("noise_multiplier", noise_multiplier)
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        from opacus.accountants import RDPAccountant

        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self._rdp: Any = RDPAccountant()
        self._cached: tuple[tuple[tuple[float, float, int], ...], float] | None = None

    @classmethod
    def for_settings(cls, settings: PerturbationSettings, sample_rate: float) -> PrivacyAccountant:
        """The accountant of a run with ``settings``: the hidden states, and the gradients
        when they are noised, composed per step (see
        :attr:`PerturbationSettings.accounted_noise_multiplier`)."""
        return cls(settings.accounted_noise_multiplier, sample_rate, settings.delta)

    def step(self) -> None:
        """Account one more step at this accountant's noise multiplier and sample rate."""
        self._rdp.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    @property
    def steps(self) -> int:
        return sum(entry[2] for entry in self.history())

    def history(self) -> History:
        """(noise multiplier, sample rate, steps) of everything accounted, in order."""
        return [(float(s), float(q), int(n)) for s, q, n in self._rdp.history]

    def load_history(self, history: History) -> None:
        """Replace what was accounted (to resume a run), validating each entry."""
        entries = []
        for s, q, n in history:
            _check_number("noise_multiplier", s)
            if not 0 < q <= 1 or n < 0:
                raise ValueError(f"invalid accountant entry {(s, q, n)}")
            entries.append((float(s), float(q), int(n)))
        self._rdp.history = entries

    @property
    def epsilon(self) -> float:
        """Epsilon spent over every step so far (0 before the first, inf without noise)."""
        key = tuple(self.history())
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, _epsilon(self._rdp, self.delta))
        return self._cached[1]

    @cached_property
    def step_epsilon(self) -> float:
        """Epsilon of one step with this accountant's settings."""
        one = type(self._rdp)()
        one.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return _epsilon(one, self.delta)

    def spent(self) -> PrivacySpent:
        """Each field of :class:`PrivacySpent`: this accountant's value of that name."""
        return PrivacySpent(**{f.name: getattr(self, f.name) for f in fields(PrivacySpent)})


def _epsilon(rdp: Any, delta: float) -> float:
    if any(s == 0 and n > 0 for s, _, n in rdp.history):
        return math.inf  # opacus agrees, after warning about the order it picked
    with warnings.catch_warnings():
        # Emitted when the best order is at the end of the searched range: the bound is
        # then valid but maybe not the tightest.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(rdp.get_epsilon(delta))
