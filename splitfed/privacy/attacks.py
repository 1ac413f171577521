"""Attacks of an honest-but-curious backbone on what a client sends it.

Each attack is fitted once on what the attacker can make itself, then predicts tokens
from recorded :class:`~splitfed.privacy.observe.Observation`\\ s. The attacker owns the
public base checkpoint (the client's head and tail start from it), public text of the
same kind as the client's, and the client's published protection settings (clip norms and
noise multipliers: only the noise's seed is secret). It runs the client's split on its
public text itself (:class:`~splitfed.privacy.observe.LocalSplit`, with the base model and
its own noise), which gives it labelled pairs, and trains on them.

* :class:`LearnedInversion`: a decoder (an MLP over the hidden states of a token and its
  neighbours) trained on (h1 -> token) pairs; after the client has fine-tuned its head the
  attacker's copy of the head is stale, which the harness measures separately.
* :class:`NearestEmbedding`: each hidden state's nearest row of the public embedding
  matrix by cosine similarity; the cheap baseline, exact at k = 0 without noise.
* :class:`LabelLeakage`: the targets (the response's tokens) from grad_h2, which depends
  on the labels: an MLP over the direction of grad_h2 and the backbone's own output h2 at
  a position, trained on pairs from the public tail.

``predict`` returns [batch, tokens] token ids aligned with the observation's input ids,
-1 where the attack makes no claim (padding; for labels, positions without a target).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from splitfed.clients.data import Batch
from splitfed.models.adapters import AdapterSettings
from splitfed.privacy.observe import LocalSplit, Observation, SplitSetup
from splitfed.security.perturbation import PerturbationSettings


@dataclass
class Knowledge:
    """What the attacker has besides what it records (see the module's docstring)."""

    model_path: Path
    k: int
    m: int
    perturbation: PerturbationSettings
    public: Sequence[tuple[list[int], Batch]]
    # Fitting passes over the public text: more than one draws fresh noise each time.
    noise_draws: int = 2
    seed: int = 1234

    def observations(self, *, gradients: bool = False) -> list[Observation]:
        """The attacker's own observations of its public text (base weights, its own
        noise seed), with grad_h2 when ``gradients``."""
        settings = dataclasses.replace(self.perturbation, seed=self.seed)
        split = LocalSplit(
            SplitSetup(self.model_path, self.k, self.m, AdapterSettings(), perturbation=settings)
        )
        seen: list[Observation] = []
        draws = self.noise_draws if settings.enabled else 1
        for draw in range(draws):
            for index, micro in enumerate(self.public):
                # Every batch of every draw its own noise (release numbers never repeat).
                release = draw * len(self.public) + index + 1
                if gradients:
                    split.forward_backward([micro], seen.append, "public", release=release)
                else:
                    split.forward_only([micro], seen.append, "public", release=release)
        return seen


class Attack(Protocol):
    name: ClassVar[str]

    def fit(self, knowledge: Knowledge) -> None: ...

    def predict(self, observation: Observation) -> torch.Tensor: ...


def _window(hidden: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """[batch, tokens, (2*width+1)*d]: each position's vector and its neighbours' (zeros
    beyond the sequence and at padding)."""
    h = hidden.float() * mask.unsqueeze(-1).to(torch.float32)
    parts = []
    for offset in range(-width, width + 1):
        shifted = torch.zeros_like(h)
        if offset < 0:
            shifted[:, -offset:] = h[:, :offset]
        elif offset > 0:
            shifted[:, :-offset] = h[:, offset:]
        else:
            shifted = h
        parts.append(shifted)
    return torch.cat(parts, dim=-1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    unit: torch.Tensor = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit


class _Classifier:
    """A two-layer MLP on standardised features, trained with AdamW on (feature, token)."""

    def __init__(self, classes: int, *, hidden: int = 256, epochs: int = 6, seed: int = 0):
        self.classes, self.hidden, self.epochs, self.seed = classes, hidden, epochs, seed
        self.net: nn.Module | None = None
        self.mean = self.std = torch.zeros(0)

    def fit(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        torch.manual_seed(self.seed)
        self.mean = features.mean(0)
        self.std = features.std(0).clamp_min(1e-6)
        self.net = nn.Sequential(
            nn.Linear(features.shape[1], self.hidden),
            nn.GELU(),
            nn.Linear(self.hidden, self.hidden),
            nn.GELU(),
            nn.Linear(self.hidden, self.classes),
        )
        self.train(features, targets, self.epochs)

    def train(self, features: torch.Tensor, targets: torch.Tensor, epochs: int) -> None:
        """``epochs`` passes of one-cycle AdamW over (``features``, ``targets``), from the
        network as it is (a new one after :meth:`fit`, the fitted one to adapt it)."""
        assert self.net is not None
        x = (features - self.mean) / self.std
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=2e-3, weight_decay=1e-4)
        batches = max(1, len(x) // 256)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=2e-3, total_steps=epochs * batches
        )
        self.net.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for b in range(batches):
                pick = order[b * 256 : (b + 1) * 256]
                loss = nn.functional.cross_entropy(self.net(x[pick]), targets[pick])
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                optimizer.step()
                scheduler.step()
        self.net.eval()

    @torch.no_grad()
    def confident(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probability of the predicted class, predicted class) per row."""
        assert self.net is not None, "fit the attack first"
        logits: torch.Tensor = self.net((features - self.mean) / self.std)
        probability, predicted = logits.softmax(-1).max(-1)
        return probability, predicted

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.confident(features)[1]


@dataclass
class LearnedInversion:
    """h1 -> token by an MLP over a window of ``width`` neighbours on each side.

    :meth:`adapt` is the attacker's answer to a stale copy of the head: self-training on
    the releases it recorded (unlabelled), whose confident predictions become labels for
    a few more epochs alongside its public pairs.
    """

    vocab_size: int
    width: int = 1
    epochs: int = 6
    name: ClassVar[str] = "learned_inversion"

    def __post_init__(self) -> None:
        self.classifier = _Classifier(self.vocab_size, epochs=self.epochs)
        self._public: tuple[torch.Tensor, torch.Tensor] | None = None

    def _features(self, o: Observation) -> torch.Tensor:
        return _window(o.hidden, o.mask, self.width)[o.mask.bool()]

    def fit(self, knowledge: Knowledge) -> None:
        observed = knowledge.observations()
        features = torch.cat([self._features(o) for o in observed])
        targets = torch.cat([o.input_ids[o.mask.bool()] for o in observed])
        self._public = (features, targets)
        self.classifier.fit(features, targets)

    def adapt(
        self, observations: Sequence[Observation], *, confidence: float = 0.9, epochs: int = 2
    ) -> int:
        """Self-train on recorded ``observations``: their predictions of at least
        ``confidence`` join the public pairs for ``epochs`` more epochs. Returns how many
        recorded positions were taken."""
        assert self._public is not None, "fit the attack first"
        features = torch.cat([self._features(o) for o in observations])
        probability, predicted = self.classifier.confident(features)
        keep = probability >= confidence
        public_features, public_targets = self._public
        self.classifier.train(
            torch.cat([public_features, features[keep]]),
            torch.cat([public_targets, predicted[keep]]),
            epochs,
        )
        return int(keep.sum())

    def predict(self, observation: Observation) -> torch.Tensor:
        o = observation
        out = torch.full_like(o.input_ids, -1)
        out[o.mask.bool()] = self.classifier.predict(self._features(o))
        return out


@dataclass
class NearestEmbedding:
    """Each hidden state's nearest row of the public embedding matrix (cosine)."""

    embeddings: torch.Tensor
    name: ClassVar[str] = "nearest_embedding"

    def fit(self, knowledge: Knowledge) -> None:
        del knowledge  # nothing to learn: the public embedding matrix is all it uses

    @torch.no_grad()
    def predict(self, observation: Observation) -> torch.Tensor:
        o = observation
        keep = o.mask.bool()
        out = torch.full_like(o.input_ids, -1)
        similarity = _unit(o.hidden[keep]) @ _unit(self.embeddings).T
        out[keep] = similarity.argmax(-1)
        return out


def _label_features(o: Observation) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of the positions whose next token is a target, and those positions (a
    [batch, tokens] bool mask); the backbone knows which these are from grad_h2 alone."""
    assert o.grad is not None, "label leakage needs training observations (grad_h2)"
    has_target = torch.zeros_like(o.mask, dtype=torch.bool)
    has_target[:, :-1] = o.labels[:, 1:] != -100
    features = torch.cat([_unit(o.grad), _unit(o.output)], dim=-1)
    return features[has_target], has_target


@dataclass
class LabelLeakage:
    """The target tokens from grad_h2 (and h2) by an MLP trained on the public tail."""

    vocab_size: int
    epochs: int = 6
    name: ClassVar[str] = "label_leakage"

    def __post_init__(self) -> None:
        self.classifier = _Classifier(self.vocab_size, epochs=self.epochs)

    def fit(self, knowledge: Knowledge) -> None:
        features, targets = [], []
        for o in knowledge.observations(gradients=True):
            x, has_target = _label_features(o)
            features.append(x)
            shifted = torch.zeros_like(has_target)
            shifted[:, 1:] = has_target[:, :-1]
            targets.append(o.input_ids[shifted])
        self.classifier.fit(torch.cat(features), torch.cat(targets))

    def predict(self, observation: Observation) -> torch.Tensor:
        o = observation
        x, has_target = _label_features(o)
        out = torch.full_like(o.input_ids, -1)
        shifted = torch.zeros_like(has_target)
        shifted[:, 1:] = has_target[:, :-1]
        out[shifted] = self.classifier.predict(x)
        return out


def embedding_matrix(model_path: Path, k: int, m: int) -> torch.Tensor:
    """The public input embedding matrix of the checkpoint at ``model_path``."""
    from splitfed.models.loading import load_head

    base: Any = load_head(model_path, k, m).base
    table: Any = base.get_input_embeddings()
    weight: torch.Tensor = table.weight.detach().clone()
    return weight
