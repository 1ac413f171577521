"""What the backbone sees, computed where the client is.

An honest-but-curious backbone records every tensor a client sends it: the hidden states
after the head (``h1``, one vector per token, perturbed when the client perturbs), their
attention mask, its own output (``h2``) and, in training, the gradient the client sends
back (``grad_h2``). :class:`LocalSplit` runs a client's split in one process, head and
tail as :class:`~splitfed.clients.trainer.SplitTrainer` builds them, the body as the
backbone holds it (frozen), with the same perturbation code and the same noise streams
(seed, stream, release, micro-batch), and hands each release to an observer as an
:class:`Observation`. tests/integration/test_privacy.py checks that these are the
very tensors a real backbone receives over mTLS from ``SplitTrainer``.

Running it in process is what makes sweeps affordable (no services, one core); it is not a
benchmark of splitfed's speed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from splitfed.clients.data import Batch, collate
from splitfed.clients.trainer import causal_lm_loss
from splitfed.models.adapters import AdapterSettings
from splitfed.models.loading import load_body, load_trainable_ends
from splitfed.models.optim import (
    OptimizerSettings,
    build_optimizer,
    clip_factor,
    grad_sq_norm,
    scale_grads,
)
from splitfed.security.perturbation import (
    EVAL_STREAM,
    PerturbationSettings,
    Perturber,
    PrivacyAccountant,
)


@dataclass
class Observation:
    """One micro-batch as the backbone receives it, and the truth it hides.

    ``hidden`` (h1 as sent), ``mask``, ``output`` (h2, the backbone's own result) and
    ``grad`` (grad_h2 as sent; training only) are the attacker's; ``input_ids``,
    ``labels`` and ``examples`` (indices into the data the batch came from) are kept only
    to score an attack.
    """

    stage: str
    hidden: torch.Tensor
    mask: torch.Tensor
    output: torch.Tensor
    input_ids: torch.Tensor
    labels: torch.Tensor
    examples: list[int]
    grad: torch.Tensor | None = None


Observer = Callable[[Observation], None]


def batches(
    encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, size: int
) -> list[tuple[list[int], Batch]]:
    """``encoded`` in order, ``size`` at a time: (example indices, batch)."""
    out = []
    for start in range(0, len(encoded), size):
        picked = list(range(start, min(start + size, len(encoded))))
        out.append((picked, collate([encoded[i] for i in picked], pad_id)))
    return out


@dataclass(frozen=True)
class SplitSetup:
    """A client's split as :class:`SplitTrainer` would train it (body frozen)."""

    model_path: Path
    k: int = 1
    m: int = 1
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    perturbation: PerturbationSettings = field(default_factory=PerturbationSettings)
    max_grad_norm: float = 1.0


class LocalSplit:
    """Head, body and tail of one client in one process; see the module's docstring."""

    def __init__(self, setup: SplitSetup, *, sample_rate: float = 1.0) -> None:
        self.setup = setup
        path = setup.model_path
        self.head, self.tail, self.params = load_trainable_ends(
            path, setup.adapter, setup.k, setup.m
        )
        self.body = load_body(path, setup.k, setup.m)
        self.body.requires_grad_(False)
        self.body.eval()
        self.optimizer, self.scheduler = build_optimizer(self.params, setup.optimizer)
        perturbation = setup.perturbation
        self.perturber = Perturber(perturbation) if perturbation.enabled else None
        self.accountant = (
            PrivacyAccountant.for_settings(perturbation, sample_rate)
            if perturbation.enabled
            else None
        )
        self.step = 0

    def _release(self) -> int:
        if self.accountant is None:
            return 0
        self.accountant.step()
        return self.accountant.steps

    def forward_backward(
        self,
        micro_batches: Sequence[tuple[list[int], Batch]],
        observe: Observer | None = None,
        stage: str = "train",
        *,
        release: int = 0,
    ) -> float:
        """The forward and backward passes of one step, as SplitTrainer runs them (the
        gradients are left in the parameters); each micro-batch's release goes to
        ``observe``. Returns the step's loss."""
        total = 0.0
        perturber = self.perturber
        gradient = perturber is not None and self.setup.perturbation.gradient_enabled
        for micro, (examples, batch) in enumerate(micro_batches):
            mask = batch.attention_mask
            hidden = self.head(batch.input_ids, mask)
            if perturber is not None:
                hidden = perturber.hidden(hidden, mask, release=release, micro=micro)
            sent = hidden.detach().clone()
            output = self.body(hidden, mask)
            seen: list[torch.Tensor] = []

            def hook(
                grad: torch.Tensor,
                mask: torch.Tensor = mask,
                micro: int = micro,
                seen: list[torch.Tensor] = seen,
            ) -> torch.Tensor:
                if gradient:
                    assert perturber is not None
                    grad = perturber.gradient(grad, mask, release=release, micro=micro)
                seen.append(grad.detach().clone())
                return grad

            output.register_hook(hook)
            logits = self.tail(output, mask)
            loss = causal_lm_loss(logits, batch.labels) / len(micro_batches)
            torch.autograd.backward(loss)
            total += float(loss.detach())
            if observe is not None:
                observe(
                    Observation(
                        stage,
                        sent,
                        mask,
                        output.detach(),
                        batch.input_ids,
                        batch.labels,
                        examples,
                        seen[0] if seen else None,
                    )
                )
        return total

    def train_step(
        self,
        micro_batches: Sequence[tuple[list[int], Batch]],
        observe: Observer | None = None,
        stage: str = "train",
    ) -> float:
        """One optimizer step over ``micro_batches``, exactly as SplitTrainer runs it;
        each micro-batch's release goes to ``observe``. Returns the step's loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(micro_batches, observe, stage, release=self._release())
        # The backbone's body is frozen here: its share of the global norm is 0.
        scale_grads(self.params, clip_factor(grad_sq_norm(self.params), self.setup.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss

    @torch.no_grad()
    def forward_only(
        self,
        micro_batches: Sequence[tuple[list[int], Batch]],
        observe: Observer | None = None,
        stage: str = "eval",
        *,
        perturb: bool = True,
        release: int | None = None,
    ) -> float:
        """Evaluation (or a generation's prefill): what the backbone receives, and the
        mean loss over ``micro_batches``; the noise streams are SplitTrainer.evaluate's
        (``release``: the training releases so far, unless given)."""
        for part in (self.head, self.tail):
            part.eval()
        try:
            losses = []
            if release is None:
                release = self.accountant.steps if self.accountant is not None else 0
            for index, (examples, batch) in enumerate(micro_batches):
                mask = batch.attention_mask
                hidden = self.head(batch.input_ids, mask)
                if perturb and self.perturber is not None:
                    hidden = self.perturber.hidden(
                        hidden, mask, release=release, micro=index, stream=EVAL_STREAM
                    )
                output = self.body(hidden, mask)
                losses.append(float(causal_lm_loss(self.tail(output, mask), batch.labels)))
                if observe is not None:
                    observe(
                        Observation(
                            stage, hidden, mask, output, batch.input_ids, batch.labels, examples
                        )
                    )
            return sum(losses) / max(len(losses), 1)
        finally:
            for part in (self.head, self.tail):
                part.train()

    def epsilon(self) -> float:
        """Epsilon spent on the training releases so far (inf without noise)."""
        return self.accountant.epsilon if self.accountant is not None else float("inf")
