"""Split fine-tuning from the data owner's side.

The client holds head and tail (with their adapters), its tokens and its labels; the
backbone holds the body. Each optimizer step runs the micro-batches through head ->
RemoteBody -> tail, back-propagates through all three, exchanges squared gradient norms
with the backbone to clip by the global norm, and both sides apply AdamW. A stream that
breaks mid-step is reopened and the step redone from its first micro-batch (the backbone
discards what it had of that step and never applies a step twice). With a checkpoint
directory a restarted client resumes its session, including a step the backbone applied
just before the client died (its gradients are written ahead of each step).

With ``TrainSettings.perturbation`` on, the hidden states sent to the backbone (and
optionally the gradients sent back) are clipped per token and noised, and a privacy
ledger counts every release (training steps and evaluation passes) and reports the
(epsilon, delta) spent (security/perturbation.py, security/releases.py, docs/privacy.md).

The micro-batches of a step are pipelined (``TrainSettings.pipeline_window``, several in
flight on the stream: :mod:`splitfed.clients.pipeline`), with the sequential step's
result; ``pipeline_window = 0`` runs them one after the other through :class:`RemoteBody`.

Why one module (over 500 lines): the optimizer step, the reconnect-and-redo path and the
write-ahead checkpoint share one piece of state (the step in flight, its gradients and
the session's step on the backbone); split apart, each would have to reach into the
others' invariants. Sessions, streams and the remote body live in
:mod:`splitfed.clients.backbone`; data in :mod:`splitfed.clients.data`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from splitfed.clients.backbone import (
    BackboneClient,
    RemoteBody,
    StreamLostError,
    TrainStream,
    client_crypto,
    rotate_session_key,
)
from splitfed.clients.data import MicroBatches, read_examples
from splitfed.clients.keys import KeyManagerClient
from splitfed.clients.links import (
    AUTO,
    LADDER,
    AutoEncodings,
    LinkMeter,
    WireEncodings,
    measure_rtt,
)
from splitfed.clients.pipeline import DEFAULT_WINDOW, pipelined_eval, pipelined_step, window_for
from splitfed.config import build
from splitfed.encodings import encoding_names
from splitfed.errors import LimitExceededError
from splitfed.logs import log_context, redact
from splitfed.models.adapters import (
    AdapterSettings,
    adapter_state,
    load_adapter,
    load_adapter_state,
    save_adapter,
)
from splitfed.models.identity import TrainedAgainst, mismatches
from splitfed.models.loading import load_trainable_ends
from splitfed.models.optim import (
    OptimizerSettings,
    build_optimizer,
    clip_factor,
    grad_sq_norm,
    load_optimizer_tensors,
    optimizer_tensors,
    scale_grads,
)
from splitfed.models.quantization import check_quantization
from splitfed.protocol.backbone import SessionInfo, SessionRequest, StepResult
from splitfed.retry import RetryPolicy
from splitfed.security.perturbation import (
    EVAL_STREAM,
    PRIVACY_EPSILON,
    PerturbationSettings,
    Perturber,
    PrivacyAccountant,
    PrivacySpent,
)
from splitfed.security.releases import (
    EVALUATION,
    TRAINING,
    PrivacyLedger,
    perturbs,
    protects,
)
from splitfed.security.session_crypto import SessionCrypto

logger = logging.getLogger(__name__)

# Reconnecting outlasts a backbone restart (tens of seconds), unlike ordinary calls.
RECONNECT = RetryPolicy(max_attempts=60, initial_backoff_s=0.2, max_backoff_s=2.0)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions (-100 is ignored)."""
    shifted = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shifted, targets, ignore_index=-100)


@dataclass(frozen=True)
class TrainSettings:
    data: Path
    model_path: Path
    k: int = 1
    m: int = 1
    eval_data: Path | None = None
    batch_size: int = 4
    accumulation: int = 1
    max_steps: int = 100
    max_length: int = 512
    max_grad_norm: float = 1.0
    eval_every: int = 0
    eval_batches: int = 4
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 1
    seed: int = 0
    shuffle: bool = True
    # Format examples with the tokenizer's chat template when it has one.
    chat_template: bool = True
    # Wire encoding of the activations (h1 sent, h2 replied): "raw", "bf16", "int8", or
    # "auto": chosen per link from the measured bandwidth, RTT and compute time, for the
    # gradients too (clients/links.py, docs/wire.md). Of the gradients (dL/dh2 sent,
    # dL/dh1 replied): gradient_encoding, "" = raw (with "auto" leave it "").
    encoding: str = "raw"
    gradient_encoding: str = ""
    # With encoding = "auto": choose after the first step, then every N steps.
    encoding_every: int = 4
    # Seal activations and gradients with the session's data keys (needs the key manager:
    # [security] keymanager); rotate the key every N steps and/or seconds (0: never).
    encrypted: bool = False
    # The federation this session trains for (lets its aggregator average the body adapter).
    federation: str = ""
    rotate_key_every_steps: int = 0
    rotate_key_every_s: float = 0.0
    # Micro-batches in flight on the stream at once (clients/pipeline.py): forwards that
    # await their gradient on the backbone, at most its max_pending_passes (1 with
    # client-batch); 0: the sequential step (head -> RemoteBody -> tail, one at a time).
    pipeline_window: int = DEFAULT_WINDOW
    # The client parts' (head and tail) block projections quantized at load: "none",
    # "int8" or "nf4" (models/quantization.py), for data owners with small machines; the
    # embeddings and the LM head stay in full precision, adapters train on top.
    quantization: str = "none"
    # A nested section of the config file: [training.perturbation] in TOML.
    perturbation: PerturbationSettings = field(default_factory=PerturbationSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "model_path", Path(self.model_path))
        for name in ("eval_data", "checkpoint_dir"):  # the SDK may pass a str
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        perturbation: object = self.perturbation
        if isinstance(perturbation, Mapping):
            perturbation = build(PerturbationSettings, perturbation, "perturbation")
            object.__setattr__(self, "perturbation", perturbation)
        elif not isinstance(perturbation, PerturbationSettings):
            raise ValueError(
                "perturbation must be a mapping with the fields of PerturbationSettings "
                f"(clip_norm, noise_multiplier, ...), got {perturbation!r}"
            )
        check_quantization(self.quantization)
        known = encoding_names()
        if self.encoding not in (*known, AUTO):
            raise ValueError(
                f"encoding {self.encoding!r} is unknown; use {AUTO!r} or one of {', '.join(known)}"
            )
        if self.gradient_encoding and self.gradient_encoding not in known:
            raise ValueError(
                f"gradient_encoding {self.gradient_encoding!r} is unknown; use one of "
                f"{', '.join(known)}"
            )
        if self.encoding == AUTO and self.gradient_encoding:
            raise ValueError(
                'encoding = "auto" chooses the gradients\' encoding too; leave gradient_encoding '
                "unset, or name both encodings"
            )
        if self.rotate_key_every_steps < 0 or self.rotate_key_every_s < 0:
            raise ValueError("rotate_key_every_steps and rotate_key_every_s must be >= 0")
        if (self.rotate_key_every_steps or self.rotate_key_every_s) and not self.encrypted:
            raise ValueError("key rotation needs encrypted = true")
        for name in (
            "batch_size",
            "accumulation",
            "max_steps",
            "max_length",
            "checkpoint_every",
            "encoding_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_grad_norm < 0:
            raise ValueError(
                f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}"
            )
        if self.pipeline_window < 0:
            raise ValueError(
                f"pipeline_window must be >= 0 (0: the sequential step), got {self.pipeline_window}"
            )


# The fields of TrainSettings that are MicroBatches' options of the same names.
_BATCHING = ("batch_size", "accumulation", "max_length", "seed", "shuffle", "chat_template")


@dataclass
class StepReport:
    step: int
    loss: float
    learning_rate: float
    grad_norm: float
    seconds: float
    eval_loss: float | None = None
    retries: int = 0
    # Privacy spent so far on what was sent (None without perturbation).
    epsilon: float | None = None
    delta: float | None = None
    step_epsilon: float | None = None
    # The wire encodings the step ran with (None: a step finished from a checkpoint).
    encodings: WireEncodings | None = None


@dataclass
class _ClientState:
    session_id: str
    step: int
    losses: list[float] = field(default_factory=list)
    # What the checkpoint's adapter was trained against (None: a checkpoint from before
    # quantization, which does not say).
    trained_against: TrainedAgainst | None = None


class SplitTrainer:
    def __init__(
        self,
        client: BackboneClient,
        settings: TrainSettings,
        adapter: AdapterSettings,
        optimizer: OptimizerSettings,
        *,
        tokenizer: Any = None,
        keymanager: KeyManagerClient | None = None,
    ) -> None:
        if settings.encrypted and keymanager is None:
            raise ValueError("encrypted training needs the key manager: set [security] keymanager")
        self.client = client
        self.keymanager = keymanager
        self.crypto: SessionCrypto | None = None
        self._key_rotated_at = (0, time.monotonic())
        self.settings = settings
        self.adapter = adapter
        self.optimizer_settings = optimizer
        path = settings.model_path
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(
            str(path), local_files_only=True
        )
        self.head, self.tail, self.params = load_trainable_ends(
            path, adapter, settings.k, settings.m, quantization=settings.quantization
        )
        # A schedule whose length is still open (a federation member's: see
        # set_schedule_length) decays from start(); until then a constant one stands in.
        self.optimizer, self.scheduler = build_optimizer(
            self.params,
            replace(optimizer, schedule="constant") if optimizer.open_length else optimizer,
        )
        batching = {name: getattr(settings, name) for name in _BATCHING}
        self.data = MicroBatches(read_examples(settings.data), self.tokenizer, **batching)
        self.eval_data = (
            MicroBatches(
                read_examples(settings.eval_data),
                self.tokenizer,
                **batching | {"accumulation": 1, "shuffle": False},
            )
            if settings.eval_data
            else None
        )
        self.session: SessionInfo | None = None
        self.step = 0
        self.stream: TrainStream | None = None
        self.body: RemoteBody | None = None
        # The wire encodings of the next step; with encoding = "auto", ``auto`` changes
        # them between steps from what ``link`` measures on the stream.
        self.encodings = (
            WireEncodings()
            if settings.encoding == AUTO
            else WireEncodings(settings.encoding, settings.gradient_encoding or "raw")
        )
        self.link = LinkMeter()
        self.auto: AutoEncodings | None = None
        # The pipeline window in use (0: sequential), within what the backbone admits;
        # lowered for the rest of the run if the backbone's pending quotas refuse it.
        self.window = 0
        self._window_cap = settings.pipeline_window
        perturbation = settings.perturbation
        self.perturber = Perturber(perturbation) if perturbation.enabled else None
        # Every release (step attempts, evaluation passes; generation through the same
        # ledger in split_session) in one budget, saved in the checkpoint directory.
        self.ledger = (
            PrivacyLedger(
                perturbation,
                sample_rate=self.sample_rate(),
                directory=settings.checkpoint_dir,
            )
            if perturbation.enabled
            else None
        )
        self.accountant: PrivacyAccountant | None = (
            self.ledger.accountant if self.ledger is not None else None
        )

    # --- privacy -------------------------------------------------------------------------

    def sample_rate(self) -> float:
        """The chance that an example is sent in a step, for the privacy accountant:
        examples per step / examples, or 1.0 without shuffling (known batches are not
        sampled, so no amplification by sampling applies)."""
        if not self.settings.shuffle:
            return 1.0
        per_step = self.settings.batch_size * self.settings.accumulation
        return min(1.0, per_step / len(self.data.encoded))

    def _release(self, kind: str = TRAINING) -> int:
        """Account one more release (a step's hidden states: every attempt sends them, a
        redone one too; or an evaluation pass) before anything is sent, and return its
        number among its kind's (>= 1; 0 without perturbation). With a checkpoint directory
        the count is saved at once, so even an attempt cut short by a crash stays counted."""
        if self.ledger is None:
            return 0
        return self.ledger.record(kind)

    def privacy_spent(self) -> PrivacySpent | None:
        """The (epsilon, delta) spent so far; ``None`` without perturbation."""
        return self.accountant.spent() if self.accountant is not None else None

    def _log_privacy_settings(self) -> None:
        p, accountant = self.settings.perturbation, self.accountant
        if accountant is None:
            return
        examples = len(self.data.encoded)
        logger.info(
            "[SplitTrainer.start] perturbation: hidden states clipped to %s per token, "
            "noise multiplier %s; gradients clipped to %s, noise multiplier %s; RDP "
            "accountant with noise multiplier %.4g, sample rate %.4g (%d x %d of %d examples), "
            "delta %s",
            p.clip_norm,
            p.noise_multiplier,
            p.grad_clip_norm,
            p.grad_noise_multiplier,
            accountant.noise_multiplier,
            accountant.sample_rate,
            self.settings.batch_size,
            self.settings.accumulation,
            examples,
            p.delta,
        )
        if p.noise_multiplier == 0:
            logger.warning(
                "[SplitTrainer.start] epsilon is infinite: the hidden states are sent "
                "without noise (noise_multiplier = 0)"
            )
        elif p.grad_noise_multiplier == 0:
            logger.warning(
                "[SplitTrainer.start] epsilon covers the hidden states only: the gradients "
                "sent back (grad_h2, which depend on the labels) carry no noise; set "
                "grad_clip_norm and grad_noise_multiplier to cover them"
            )
        if self.eval_data is not None and not protects(p, EVALUATION):
            logger.warning(
                "[SplitTrainer.start] evaluation passes send the evaluation data's hidden "
                "states without noise (evaluation = false or noise_multiplier = 0): epsilon "
                "does not cover them; they are counted apart"
            )
        if p.seed is not None:
            logger.warning(
                "[SplitTrainer.start] the perturbation seed is fixed: whoever knows it can "
                "remove the noise (use it for tests and reproducible experiments only)"
            )
        if p.delta >= 1 / examples:
            logger.warning(
                "[SplitTrainer.start] delta %s is not below 1 / %d examples: such a "
                "guarantee allows revealing an example outright",
                p.delta,
                examples,
            )
        if self.settings.shuffle and self.settings.batch_size * self.settings.accumulation > (
            examples
        ):
            logger.warning(
                "[SplitTrainer.start] a step takes more examples than the dataset holds, so "
                "an example can be sent twice in one step and epsilon understates the loss"
            )

    # --- session -------------------------------------------------------------------------

    def _open_request(self, session_id: str = "") -> SessionRequest:
        return SessionRequest(
            k=self.settings.k,
            m=self.settings.m,
            adapter=self.adapter,
            optimizer=self.optimizer_settings,
            # h2's encoding for a backbone that predates reply_encoding.
            encoding="" if self.settings.encoding == AUTO else self.settings.encoding,
            session_id=session_id,
            encrypted=self.settings.encrypted,
            federation=self.settings.federation,
        )

    def set_schedule_length(self, total_steps: int) -> None:
        """Give the learning-rate schedule its length where [optimizer] leaves total_steps
        open (0): a federation member's is the plan's rounds x local_steps. Before
        :meth:`start`; an explicit total_steps wins."""
        if self.session is not None or self.step:
            raise RuntimeError("the schedule's length is set before the trainer starts")
        settings = self.optimizer_settings.with_length(total_steps)
        if settings is not self.optimizer_settings:
            self.optimizer_settings = settings
            self.optimizer, self.scheduler = build_optimizer(self.params, settings)

    def start(self, *, wait: bool = False) -> SessionInfo:
        """Open a session, or resume the one of the checkpoint in ``checkpoint_dir``.
        A resumed session waits out a backbone that is restarting; a new one does too with
        ``wait`` (a federation member: it has joined, others count on it), else it fails
        after one call's retries (a person at a prompt, who may have mistyped the address).
        A new session whose answer was lost in a restart is left to expire unused."""
        if self.optimizer_settings.open_length:
            raise ValueError(
                f"schedule {self.optimizer_settings.schedule!r} needs [optimizer] total_steps "
                "(> warmup_steps); a federation member takes rounds x local_steps"
            )
        self._log_privacy_settings()
        state = self._load_checkpoint()
        ahead = False  # the backbone applied a step the checkpoint lacks
        if state is None:
            if wait:
                self.session = self._resume("")
            else:
                self.session = self.client.open_session(self._open_request())
            self._save_checkpoint()
        else:
            self.session = self._resume(state.session_id)
            self._check_trained_against(state.trained_against, self.session)
            ahead = self.session.step == self.step + 1 and self._pending_step() == self.step + 1
            if self.session.step != self.step and not ahead:
                raise RuntimeError(
                    f"the backbone's session is at step {self.session.step} but the client "
                    f"checkpoint at step {self.step}; they cannot be brought together"
                )
        if self.settings.encoding == AUTO:
            self._start_auto(self.session)
        self._open_stream()
        if ahead:
            self._finish_pending()
        return self.session

    def trained_against(self) -> TrainedAgainst:
        """The quantization of the body (as the session's backbone states it) and of the
        client parts this trainer trains with."""
        body = self.session.info.quantization if self.session is not None else ""
        return TrainedAgainst(body, self.settings.quantization)

    def _check_trained_against(self, trained: TrainedAgainst | None, session: SessionInfo) -> None:
        """Warn when the checkpoint's adapter was trained against a body (or with client
        parts) quantized differently from what this session runs."""
        for warning in mismatches(trained, session.info.quantization, self.settings.quantization):
            logger.warning("[trainer] session %s: %s", redact(session.session_id), warning)

    def _start_auto(self, session: SessionInfo) -> None:
        """``encoding = "auto"``: start raw (or the most precise encodings the backbone
        accepts) and let the policy decide from the first step's measurements on."""
        accepted = session.info.encodings or tuple(encoding_names())
        self.auto = AutoEncodings(
            accepted,
            lambda: measure_rtt(self.client.model_info),
            every=self.settings.encoding_every,
        )
        if not self.encodings.usable(accepted):
            self.encodings = next((r for r in LADDER if r.usable(accepted)), self.encodings)
        self.auto.current = self.encodings
        logger.info(
            "[SplitTrainer.start] wire encodings chosen per link (auto), starting with %s",
            self.encodings,
        )

    def _resume(self, session_id: str) -> SessionInfo:
        """Reopen the session (``session_id`` "": open a new one), waiting out a backbone
        that is restarting."""
        delays = RECONNECT.delays()
        while True:
            try:
                return self.client.open_session(self._open_request(session_id))
            except StreamLostError as exc:
                delay = next(delays, None)
                if delay is None:
                    raise
                logger.warning("[trainer] %s; waiting for it", exc)
                time.sleep(delay)

    def _open_stream(self) -> None:
        assert self.session is not None
        if self.stream is not None:
            self.stream.close()
        if self.settings.encrypted and self.crypto is None:
            assert self.keymanager is not None
            self.crypto = client_crypto(self.keymanager, self.session.session_id)
        self.link.reset()  # nothing of a lost stream is in flight any more
        self.stream = TrainStream(
            self.client, self.session.session_id, self.encodings, self.crypto, meter=self.link
        )
        self.body = RemoteBody(self.stream)
        self.body.train()
        requested = min(self.settings.pipeline_window, self._window_cap)
        self.window = window_for(requested, self.session.info) if requested else 0

    def _reconnect(self) -> int:
        assert self.session is not None
        self.session = self._resume(self.session.session_id)
        self._open_stream()
        logger.info("[trainer] reconnected; the backbone is at step %d", self.session.step)
        return self.session.step

    def close(self, *, delete_session: bool = False) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if delete_session and self.session is not None:
            self.client.close_session(self.session.session_id)

    # --- training ------------------------------------------------------------------------

    def _forward_backward(self, step: int, release: int) -> tuple[float, float]:
        assert self.body is not None and self.stream is not None
        batches = self.data.for_step(step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.window:
            perturber = self.perturber
            total = pipelined_step(
                self.stream,
                step,
                batches,
                head=self.head,
                tail=self.tail,
                loss=lambda logits, batch: causal_lm_loss(logits, batch.labels),
                window=self.window,
                hidden_hook=None
                if perturber is None
                else lambda h, mask, micro: perturber.hidden(h, mask, release=release, micro=micro),
                grad_hook=None
                if perturber is None or not self.settings.perturbation.gradient_enabled
                else lambda g, mask, micro: perturber.gradient(
                    g, mask, release=release, micro=micro
                ),
            )
            return total, grad_sq_norm(self.params)
        self.body.begin_step(step)
        total = 0.0
        for micro, batch in enumerate(batches):
            mask = batch.attention_mask
            hidden = self.head(batch.input_ids, mask)
            if self.perturber is not None:
                hidden = self.perturber.hidden(hidden, mask, release=release, micro=micro)
            hidden = self.body(hidden, mask)
            if self.perturber is not None and self.settings.perturbation.gradient_enabled:
                self._perturb_gradient(hidden, mask, release, micro)
            logits = self.tail(hidden, mask)
            loss = causal_lm_loss(logits, batch.labels) / len(batches)
            torch.autograd.backward(loss)
            total += float(loss.detach())
        return total, grad_sq_norm(self.params)

    def _perturb_gradient(
        self, h2: torch.Tensor, mask: torch.Tensor, release: int, micro: int
    ) -> None:
        """Perturb dL/dh2 on its way into the body, i.e. the grad_h2 that is sent."""
        perturber = self.perturber
        assert perturber is not None and h2.requires_grad

        def hook(grad: torch.Tensor) -> torch.Tensor:
            return perturber.gradient(grad, mask, release=release, micro=micro)

        h2.register_hook(hook)  # type: ignore[no-untyped-call]  # torch leaves it untyped

    def _maybe_rotate_key(self, step: int) -> None:
        """Between steps: move to the session's next data key when one is due."""
        if self.crypto is None or self.keymanager is None:
            return
        last_step, last_time = self._key_rotated_at
        every_steps, every_s = (
            self.settings.rotate_key_every_steps,
            self.settings.rotate_key_every_s,
        )
        due = (every_steps and step - 1 - last_step >= every_steps) or (
            every_s and time.monotonic() - last_time >= every_s
        )
        if due:
            key_id = rotate_session_key(self.keymanager, self.crypto)
            self._key_rotated_at = (step - 1, time.monotonic())
            logger.info(
                "[SplitTrainer.train_step] step %d: session key rotated to %d", step, key_id
            )

    def train_step(self) -> StepReport:
        """Run step ``self.step + 1`` to completion (reconnecting if needed)."""
        step = self.step + 1
        started = time.monotonic()
        self._maybe_rotate_key(step)
        retries = 0
        loss, client_sq = math.nan, 0.0
        backward_done = False
        encodings = self.encodings
        while True:
            assert self.stream is not None
            try:
                if not backward_done:
                    loss, client_sq = self._forward_backward(step, self._release())
                    backward_done = True
                    self._save_pending(step, loss, client_sq)
                result = self.stream.step(step, client_sq, self.settings.max_grad_norm)
                break
            except (StreamLostError, LimitExceededError) as exc:
                if isinstance(exc, LimitExceededError):
                    # The backbone's pending quotas refuse this many passes in flight.
                    if self.window <= 1:
                        raise
                    self._window_cap = self.window // 2
                    logger.warning(
                        "[trainer] step %d: %s; pipeline window lowered to %d",
                        step,
                        exc,
                        self._window_cap,
                    )
                else:
                    logger.warning("[trainer] step %d: %s; reconnecting", step, exc)
                retries += 1
                server_step = self._reconnect()
                if server_step < step:
                    backward_done = False  # the backbone lost this step: redo it
                elif server_step > step:
                    raise RuntimeError(
                        f"the backbone is at step {server_step}, past {step}"
                    ) from exc
        wall = time.monotonic() - started
        report = self._apply(step, loss, client_sq, result, started, retries)
        report.encodings = encodings
        self._observe_link(step, wall, retries)
        return report

    def _observe_link(self, step: int, wall_s: float, retries: int) -> None:
        """After a step: hand its link measurements to the policy (``auto``), which may
        change the encodings for the next step. A step that reconnected measured the
        reconnection, not the link: it is left out."""
        sample = self.link.finish_step(wall_s)
        if self.auto is None or retries:
            return
        chosen = self.auto.observe(sample)
        if chosen is not None:
            logger.info(
                "[SplitTrainer.train_step] wire encodings from step %d: %s", step + 1, chosen
            )
            self.encodings = chosen
            if self.stream is not None:
                self.stream.encodings = chosen

    def _apply(
        self,
        step: int,
        loss: float,
        client_sq: float,
        result: StepResult,
        started: float,
        retries: int,
    ) -> StepReport:
        """This side of ``step``, once the backbone has applied its side."""
        total_sq = client_sq + result.backbone_grad_sq_norm
        scale_grads(self.params, clip_factor(total_sq, self.settings.max_grad_norm))
        learning_rate = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        report = StepReport(
            step=step,
            loss=loss,
            learning_rate=float(learning_rate),
            grad_norm=math.sqrt(total_sq),
            seconds=time.monotonic() - started,
            retries=retries,
        )
        spent = self.privacy_spent()
        if spent is not None:
            assert self.session is not None
            report.epsilon, report.delta = spent.epsilon, spent.delta
            report.step_epsilon = spent.step_epsilon
            PRIVACY_EPSILON.labels(session=self.session.session_id).set(spent.epsilon)
            logger.info(
                "[SplitTrainer.train_step] step %d: privacy spent epsilon %.4g at delta %s "
                "(%.4g per step, steps accounted: %d)",
                step,
                spent.epsilon,
                spent.delta,
                spent.step_epsilon,
                spent.steps,
            )
        if self.settings.eval_every and step % self.settings.eval_every == 0:
            report.eval_loss = self.evaluate()
        if self.settings.checkpoint_dir and step % self.settings.checkpoint_every == 0:
            self._save_checkpoint()
        return report

    @torch.no_grad()
    def evaluate(self) -> float:
        if self.eval_data is None:
            return math.nan
        assert self.body is not None
        for part in (self.head, self.tail, self.body):
            part.eval()
        try:
            losses = []
            count = min(self.settings.eval_batches, self.eval_data.per_epoch)
            # One release per pass (its batches hold distinct examples), counted first.
            release = self._release(EVALUATION)
            perturb = self.perturber is not None and perturbs(
                self.settings.perturbation, EVALUATION
            )
            if self.window:
                assert self.stream is not None
                perturber = self.perturber
                losses = pipelined_eval(
                    self.stream,
                    self.step,
                    [self.eval_data.batch(index) for index in range(count)],
                    head=self.head,
                    tail=self.tail,
                    loss=lambda logits, batch: causal_lm_loss(logits, batch.labels),
                    window=self.window,
                    hidden_hook=None
                    if perturber is None or not perturb
                    else lambda h, mask, micro: perturber.hidden(
                        h, mask, release=release, micro=micro, stream=EVAL_STREAM
                    ),
                )
                return sum(losses) / len(losses)
            for index in range(count):
                batch = self.eval_data.batch(index)
                hidden = self.head(batch.input_ids, batch.attention_mask)
                if perturb:
                    assert self.perturber is not None
                    hidden = self.perturber.hidden(
                        hidden,
                        batch.attention_mask,
                        release=release,
                        micro=index,
                        stream=EVAL_STREAM,
                    )
                hidden = self.body(hidden, batch.attention_mask)
                logits = self.tail(hidden, batch.attention_mask)
                losses.append(float(causal_lm_loss(logits, batch.labels)))
            return sum(losses) / len(losses)
        finally:
            for part in (self.head, self.tail, self.body):
                part.train()

    def run(self, on_step: Callable[[StepReport], None] | None = None) -> list[StepReport]:
        if self.session is None:
            self.start()
        assert self.session is not None
        reports = []
        with log_context(session=self.session.session_id):
            while self.step < self.settings.max_steps:
                report = self.train_step()
                reports.append(report)
                if on_step is not None:
                    on_step(report)
        spent = self.privacy_spent()
        if spent is not None:
            logger.info(
                "[SplitTrainer.run] privacy spent over %d steps: epsilon %.4g at delta %s "
                "(%.4g per step, noise multiplier %.4g, sample rate %.4g)",
                spent.steps,
                spent.epsilon,
                spent.delta,
                spent.step_epsilon,
                spent.noise_multiplier,
                spent.sample_rate,
            )
        return reports

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The client's adapter (head and tail) under global names."""
        return {**adapter_state(self.head), **adapter_state(self.tail)}

    def load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Set the head and tail adapters (global names; e.g. a federation's version)."""
        for part in (self.head, self.tail):
            load_adapter_state(part, tensors)

    # --- checkpoints ---------------------------------------------------------------------

    # Written ahead of each step's STEP frame (with a checkpoint directory, where the
    # checkpoint before it is of the previous step): this side's gradients, loss and
    # squared norm. If the process dies after the backbone applied the step but before the
    # checkpoint of it, the restarted client finishes the step from these and the
    # backbone's stored reply, exactly as the first process would have.
    PENDING = "pending.safetensors"

    def _save_pending(self, step: int, loss: float, client_sq: float) -> None:
        directory = self.settings.checkpoint_dir
        if directory is None or (step - 1) % self.settings.checkpoint_every:
            return
        grads = {str(i): p.grad for i, p in enumerate(self.params) if p.grad is not None}
        tmp = directory / "pending.tmp.safetensors"
        meta = {"step": str(step), "loss": repr(loss), "client_sq": repr(client_sq)}
        save_adapter(tmp, grads, metadata=meta)
        tmp.replace(directory / self.PENDING)

    def _pending_meta(self) -> dict[str, str]:
        directory = self.settings.checkpoint_dir
        if directory is None or not (directory / self.PENDING).is_file():
            return {}
        with safe_open(str(directory / self.PENDING), framework="pt") as handle:
            return dict(handle.metadata() or {})

    def _pending_step(self) -> int:
        return int(self._pending_meta().get("step", "0"))

    def _finish_pending(self) -> None:
        """Finish step ``self.step + 1``, which the backbone applied before this client
        could checkpoint it: its gradients from the write-ahead file, the backbone's
        reply replayed from its store."""
        assert self.stream is not None and self.settings.checkpoint_dir is not None
        meta = self._pending_meta()
        step, started = self.step + 1, time.monotonic()
        grads = load_adapter(self.settings.checkpoint_dir / self.PENDING)
        self.optimizer.zero_grad(set_to_none=True)
        for index, parameter in enumerate(self.params):
            grad = grads.get(str(index))
            if grad is not None:
                parameter.grad = grad.to(dtype=parameter.dtype, device=parameter.device)
        client_sq = float(meta["client_sq"])
        result = self.stream.step(step, client_sq, self.settings.max_grad_norm)
        if not result.already_applied:
            raise RuntimeError(f"the backbone had not applied step {step} after all")
        self._apply(step, float(meta["loss"]), client_sq, result, started, 0)
        logger.info("[trainer] finished step %d, which the backbone applied before a restart", step)

    def _save_checkpoint(self) -> None:
        directory = self.settings.checkpoint_dir
        if directory is None or self.session is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        tensors, meta = optimizer_tensors(self.optimizer, self.scheduler)
        identity = self.trained_against().metadata()
        save_adapter(
            directory / "adapter.tmp.safetensors", self.adapter_tensors(), metadata=identity
        )
        save_adapter(directory / "optimizer.tmp.safetensors", tensors)
        state = {
            "session_id": self.session.session_id,
            "step": self.step,
            "optimizer": meta,
            **identity,
        }
        (directory / "client.tmp.json").write_text(json.dumps(state))
        for name in ("adapter", "optimizer"):
            (directory / f"{name}.tmp.safetensors").replace(directory / f"{name}.safetensors")
        (directory / "client.tmp.json").replace(directory / "client.json")

    def _load_privacy(self, directory: Path) -> None:
        """The ledger read what was counted before the restart (privacy.json, written
        before every release); steps of a checkpoint without it were sent without noise."""
        assert self.ledger is not None
        if not (directory / "privacy.json").is_file() and self.step > 0:
            logger.warning(
                "[SplitTrainer.start] the checkpoint's %d steps were sent without "
                "perturbation: epsilon is infinite",
                self.step,
            )
            self.ledger.assume_unperturbed_training(self.step)

    def _load_checkpoint(self) -> _ClientState | None:
        directory = self.settings.checkpoint_dir
        if directory is None or not (directory / "client.json").is_file():
            return None
        state = json.loads((directory / "client.json").read_text())
        adapter = load_adapter(directory / "adapter.safetensors")
        for part in (self.head, self.tail):
            load_adapter_state(part, adapter)
        if state["optimizer"]["param_groups"]:
            load_optimizer_tensors(
                self.optimizer,
                self.scheduler,
                load_adapter(directory / "optimizer.safetensors"),
                state["optimizer"],
            )
        self.step = int(state["step"])
        if self.ledger is not None:
            self._load_privacy(directory)
        logger.info(
            "[trainer] resuming session %s at step %d", redact(state["session_id"]), self.step
        )
        return _ClientState(
            state["session_id"], self.step, trained_against=TrainedAgainst.from_metadata(state)
        )
