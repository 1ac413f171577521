"""What a client has released to the backbone, by kind, and the privacy it spent on it.

Three kinds of release send hidden states computed from the client's data:

* **training**: one attempt at an optimizer step (its micro-batches' ``h1``, and
  ``grad_h2`` when configured), accounted as one sampled Gaussian mechanism at the
  training noise multiplier and sample rate (as before this ledger);
* **evaluation**: one pass over evaluation data (all its batches), accounted as one
  Gaussian mechanism at ``noise_multiplier`` and sample rate 1;
* **generation**: one send of a generation call (the prompt's vectors, then each new
  token's vector), each accounted as one Gaussian mechanism at ``noise_multiplier`` and
  sample rate 1.

A release is *protected* when its hidden states carry noise (the kind is perturbed and
``noise_multiplier > 0``): it then goes into the one RDP accountant of the client. A
release sent without noise is counted apart and never hidden: the (epsilon, delta) does
not cover the data it sent. Training is the exception kept from before: it is always in
the accountant, so training without noise reports epsilon = inf. docs/privacy.md says why
this composition is an upper bound.

With a directory (the training checkpoint's), the ledger lives in ``privacy.json`` there,
and every record is a locked read-modify-write of that file before anything is sent, so
the trainer, ``splitfed generate`` and ``splitfed evaluate`` of one client add up in one
budget, and a release cut short by a crash stays counted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from splitfed.files import StrPath, atomic_write
from splitfed.security.perturbation import (
    PRIVACY_RELEASES,
    History,
    PerturbationSettings,
    PrivacyAccountant,
    PrivacySpent,
)

TRAINING, EVALUATION, GENERATION = "training", "evaluation", "generation"
KINDS = (TRAINING, EVALUATION, GENERATION)
# Per kind: releases and calls (a training step attempt, an evaluation pass, a generation
# call), each protected (noised, accounted) or clear (sent without noise).
COUNTERS = ("protected", "clear", "protected_calls", "clear_calls")
FILE = "privacy.json"

Counts = dict[str, dict[str, int]]


def perturbs(settings: PerturbationSettings, kind: str) -> bool:
    """Whether releases of ``kind`` go through the perturbation (clipped, and noised with
    ``noise_multiplier > 0``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of release {kind!r}; the kinds are {', '.join(KINDS)}")
    if kind == TRAINING:
        return settings.enabled
    if not settings.hidden_enabled:
        return False
    return settings.evaluation if kind == EVALUATION else settings.generation


def protects(settings: PerturbationSettings, kind: str) -> bool:
    """Whether releases of ``kind`` carry noise, so the accountant covers them."""
    if kind == TRAINING:
        return settings.accounted_noise_multiplier > 0
    return perturbs(settings, kind) and settings.noise_multiplier > 0


def empty_counts() -> Counts:
    return {kind: dict.fromkeys(COUNTERS, 0) for kind in KINDS}


class PrivacyLedger:
    """The privacy accountant of one client with its releases counted by kind.

    ``sample_rate`` is the training sample rate (see
    :meth:`~splitfed.clients.trainer.SplitTrainer.sample_rate`); a process that does not
    train leaves it at 1 (it only sets what one training step costs). ``directory`` keeps
    the ledger in ``privacy.json`` (shared with other processes of the same client).
    """

    def __init__(
        self,
        settings: PerturbationSettings,
        *,
        sample_rate: float = 1.0,
        directory: StrPath | None = None,
    ) -> None:
        self.settings = settings
        self.sample_rate = sample_rate
        self.directory = None if directory is None else Path(directory)
        self.accountant = PrivacyAccountant.for_settings(settings, sample_rate)
        self.counts = empty_counts()
        self._lock = threading.Lock()
        with self._locked():
            pass  # read what is saved

    # --- recording ---------------------------------------------------------------------

    def record(self, kind: str, *, call: bool = True, perturbed: bool | None = None) -> int:
        """Count one release of ``kind`` before it is sent (``call``: the first of a new
        call) and account it when protected; returns the number of the call (>= 1) among
        this kind's calls, which the noise of the release is derived from. ``perturbed``
        says whether the sender perturbs it (default: what the settings say for ``kind``)."""
        protected = protects(self.settings, kind)
        if perturbed is not None and kind != TRAINING:
            protected = protected and perturbed
        column = "protected" if protected else "clear"
        with self._locked(write=True):
            counts = self.counts[kind]
            counts[column] += 1
            if call:
                counts[column + "_calls"] += 1
            if protected or kind == TRAINING:
                self._account(self._mechanism(kind), 1)
            number = counts["protected_calls"] + counts["clear_calls"]
        PRIVACY_RELEASES.labels(kind=kind, protected=str(protected).lower()).inc()
        return number

    def assume_unperturbed_training(self, steps: int) -> None:
        """Training steps of a checkpoint that kept no ledger (sent without noise)."""
        with self._locked(write=True):
            self.counts[TRAINING]["clear"] += steps
            self.counts[TRAINING]["clear_calls"] += steps
            self._account((0.0, 1.0), steps)

    def _mechanism(self, kind: str) -> tuple[float, float]:
        """(noise multiplier, sample rate) of one release of ``kind``."""
        if kind == TRAINING:
            return self.accountant.noise_multiplier, self.sample_rate
        return self.settings.noise_multiplier, 1.0

    def _account(self, mechanism: tuple[float, float], steps: int) -> None:
        # Composition commutes (RDP adds up), so equal mechanisms are kept as one entry.
        history = self.accountant.history()
        for index, (sigma, rate, count) in enumerate(history):
            if (sigma, rate) == mechanism:
                history[index] = (sigma, rate, count + steps)
                break
        else:
            history.append((*mechanism, steps))
        self.accountant.load_history(history)

    # --- reading -----------------------------------------------------------------------

    def spent(self) -> PrivacySpent:
        return self.accountant.spent()

    def covered(self) -> dict[str, int]:
        """Protected releases by kind (what epsilon covers)."""
        return {kind: self.counts[kind]["protected"] for kind in KINDS}

    def summary(self) -> dict[str, Any]:
        """epsilon, delta, the releases accounted and the counts by kind (JSON-able)."""
        spent = self.spent()
        return {
            "epsilon": spent.epsilon,
            "delta": spent.delta,
            "steps": spent.steps,
            "releases": {kind: dict(self.counts[kind]) for kind in KINDS},
        }

    # --- the file ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, *, write: bool = False) -> Iterator[None]:
        with self._lock:
            if self.directory is None:
                yield
                return
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.directory / "privacy.lock", "a+b") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                try:
                    self._read()
                    yield
                    if write:
                        self._write()
                finally:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read(self) -> None:
        assert self.directory is not None
        path = self.directory / FILE
        if not path.is_file():
            return
        history, counts = parse(json.loads(path.read_text()))
        self.accountant.load_history(history)
        self.counts = counts

    def _write(self) -> None:
        assert self.directory is not None
        state = {"history": self.accountant.history(), "releases": self.counts}
        with atomic_write(self.directory / FILE) as out:
            out.write(json.dumps(state).encode())


def parse(state: dict[str, Any]) -> tuple[History, Counts]:
    """(history, counts) of a saved ledger. A file written before the counts were kept
    holds training steps only: protected where they carried noise."""
    history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
    counts = empty_counts()
    saved = state.get("releases")
    if saved is None:
        for sigma, _, steps in history:
            column = "protected" if sigma > 0 else "clear"
            counts[TRAINING][column] += steps
            counts[TRAINING][column + "_calls"] += steps
        return history, counts
    for kind, values in saved.items():
        if kind not in counts:
            raise ValueError(f"{FILE}: unknown kind of release {kind!r}")
        for name, value in values.items():
            if name not in COUNTERS or not isinstance(value, int) or value < 0:
                raise ValueError(f"{FILE}: invalid count {kind}.{name} = {value!r}")
            counts[kind][name] = value
    return history, counts


def load_summary(directory: StrPath, settings: PerturbationSettings) -> dict[str, Any]:
    """The summary of the ledger saved in ``directory`` ({} when there is none)."""
    directory = Path(directory)
    path = directory / FILE
    if not path.is_file():
        return {}
    ledger = PrivacyLedger(settings)  # read only: no lock file is made
    history, ledger.counts = parse(json.loads(path.read_text()))
    ledger.accountant.load_history(history)
    return ledger.summary()
