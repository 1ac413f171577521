"""What ``splitfed train`` and ``splitfed generate`` run: a client config file
([backbone], [training], [adapter], [optimizer], [generation], [security], [metrics]) to a
trainer or generator.

Generation (``generate``, :class:`Chat`, and the SDK through :func:`split_session`) sends
the hidden states of its prompts through :class:`ReleasedStage`: perturbed with
``[training.perturbation] generation = true``, and counted in the client's privacy ledger
either way (security/releases.py, docs/privacy.md)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import grpc
import torch
from transformers import AutoTokenizer

from splitfed.clients.backbone import (
    BackboneClient,
    GenerateStream,
    RemoteBodyStage,
    StreamLostError,
    client_crypto,
)
from splitfed.clients.data import conversation_tokens, left_padded, prompt_tokens
from splitfed.clients.federated import UPLOAD_CHUNK_BYTES, AggregatorClient, FederatedTrainer
from splitfed.clients.keys import CertificateRenewer, KeyManagerClient
from splitfed.clients.links import AUTO
from splitfed.clients.streaming import TextDelta, text_deltas
from splitfed.clients.trainer import RECONNECT, SplitTrainer, TrainSettings
from splitfed.config import build, read_config, section
from splitfed.errors import PermissionDeniedError
from splitfed.failures import Endpoint
from splitfed.files import StrPath
from splitfed.metrics import MetricsSettings
from splitfed.models.adapters import AdapterSettings, load_adapter, load_adapter_state
from splitfed.models.generation import BodyStage, SamplingOptions, SplitGenerator
from splitfed.models.identity import TrainedAgainst, mismatches
from splitfed.models.loading import load_head, load_tail
from splitfed.models.optim import OptimizerSettings
from splitfed.models.parts import Head, Tail
from splitfed.protocol.backbone import SessionInfo, SessionRequest
from splitfed.retry import RetryPolicy
from splitfed.security.perturbation import EVAL_STREAM, GENERATION_STREAM, Perturber
from splitfed.security.releases import GENERATION, PrivacyLedger, perturbs
from splitfed.serving import ConnectSettings, SecuritySettings
from splitfed.tls import TLSConfig
from splitfed.transport import create_channel, parse_address

logger = logging.getLogger(__name__)

JOIN_TOKEN_ENV = "SPLITFED_JOIN_TOKEN"


@dataclass(frozen=True)
class FederatedSettings:
    """The [federated] section: train as a member of a federation on an aggregator."""

    aggregator: str
    federation: str
    # The name the aggregator's certificate carries (default: the host in aggregator).
    server_name: str | None = None
    # Give up if the federation has not finished after this long.
    max_wait_s: float = 3600.0
    # Keep a copy of every update sent (round<r>-attempt<a>.safetensors) here.
    record_updates: Path | None = None
    # The federation's join token, for members its config does not list by name: a file
    # holding it (mode 0600), or the environment variable SPLITFED_JOIN_TOKEN.
    join_token_file: Path | None = None

    def __post_init__(self) -> None:
        parse_address(self.aggregator)
        if not self.federation:
            raise ValueError("federation is required")
        if self.max_wait_s <= 0:
            raise ValueError(f"max_wait_s must be positive, got {self.max_wait_s}")
        for name in ("record_updates", "join_token_file"):  # the SDK may pass a str
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))

    def join_token(self) -> str:
        """The join token from ``join_token_file`` or $SPLITFED_JOIN_TOKEN ("" if none)."""
        if self.join_token_file is None:
            return os.environ.get(JOIN_TOKEN_ENV, "").strip()
        try:
            return self.join_token_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read join_token_file {self.join_token_file}: {exc}") from None


@dataclass(frozen=True)
class ClientConfig:
    backbone: ConnectSettings
    training: TrainSettings
    adapter: AdapterSettings
    optimizer: OptimizerSettings
    generation: SamplingOptions
    security: SecuritySettings = field(default_factory=SecuritySettings)
    federated: FederatedSettings | None = None
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    @classmethod
    def load(cls, path: StrPath, **training_overrides: Any) -> ClientConfig:
        path = Path(path)
        return cls.from_mapping(read_config(path), **training_overrides)

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any], **training_overrides: Any) -> ClientConfig:
        unknown = sorted(set(config) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"a client config has no [{unknown[0]}] section; its sections are "
                + ", ".join(f"[{f.name}]" for f in fields(cls))
            )
        training = section(config, "training")
        training.update({k: v for k, v in training_overrides.items() if v is not None})
        loaded = cls(
            backbone=build(ConnectSettings, section(config, "backbone"), "backbone"),
            training=build(TrainSettings, training, "training"),
            adapter=build(AdapterSettings, section(config, "adapter", required=False), "adapter"),
            optimizer=build(
                OptimizerSettings, section(config, "optimizer", required=False), "optimizer"
            ),
            generation=build(
                SamplingOptions, section(config, "generation", required=False), "generation"
            ),
            security=build(
                SecuritySettings, section(config, "security", required=False), "security"
            ),
            federated=(
                build(FederatedSettings, section(config, "federated"), "federated")
                if "federated" in config
                else None
            ),
            metrics=build(MetricsSettings, section(config, "metrics", required=False), "metrics"),
        )
        if loaded.federated is None and loaded.optimizer.open_length:
            raise ValueError(
                f"[optimizer] schedule {loaded.optimizer.schedule!r} needs total_steps "
                "(> warmup_steps), e.g. [training] max_steps; only in a federation does it "
                "default (to the rounds x local_steps of the aggregator's plan)"
            )
        return loaded


@contextmanager
def backbone_client(settings: ConnectSettings) -> Iterator[BackboneClient]:
    tls = settings.tls()
    channel: grpc.Channel = create_channel(
        settings.address, tls, server_name=settings.server_name, options=settings.options()
    )
    endpoint = Endpoint("backbone", settings.address, settings.server_name, tls.source_dir)
    with channel:
        yield BackboneClient(
            channel,
            chunk_bytes=settings.chunk_bytes,
            timeout_s=settings.timeout_s,
            transfer_timeout_s=settings.transfer_timeout_s,
            endpoint=endpoint,
        )


@contextmanager
def keymanager_for(config: ClientConfig) -> Iterator[KeyManagerClient | None]:
    """A client of the key manager in [security] (``None`` without one); while it is
    open, this party's certificate (a [backbone] tls_dir) is renewed before it expires."""
    security = config.security
    if not security.keymanager:
        yield None
        return
    tls = config.backbone.tls()
    keys = KeyManagerClient.connect(
        security.keymanager, tls, server_name=security.keymanager_server_name
    )
    renewer = None
    if security.renew and tls.source_dir is not None:
        renewer = CertificateRenewer.reconnecting(keys, tls.source_dir, security)
        renewer.start()
    try:
        yield keys
    finally:
        if renewer is not None:
            renewer.stop()
        keys.close()


def prompt_ids(
    tokenizer: Any, prompts: list[str], *, chat_template: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts in the training format (the chat template's user turn, or bos, prompt,
    newline), left-padded."""
    rows = [prompt_tokens(tokenizer, p, chat_template=chat_template) for p in prompts]
    return left_padded(rows, int(tokenizer.pad_token_id))


class ReleasedStage:
    """A body stage whose inputs leave the client: each step (a generation call's prompt,
    then each new token's vector) is one release of ``kind``, counted in ``ledger``
    before it is sent and perturbed when ``perturber`` is given. A call begins at
    :meth:`reset` (as :class:`SplitGenerator` does before each); its noise is drawn from
    (the call's number, the step's index), so no two releases share noise."""

    def __init__(
        self,
        body: BodyStage,
        ledger: PrivacyLedger,
        perturber: Perturber | None,
        kind: str = GENERATION,
    ) -> None:
        self.body, self.ledger, self.perturber, self.kind = body, ledger, perturber, kind
        self.stream = GENERATION_STREAM if kind == GENERATION else EVAL_STREAM
        self._call = 0  # this call's number; 0 until its first step
        self._index = 0

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        number = self.ledger.record(
            self.kind, call=self._call == 0, perturbed=self.perturber is not None
        )
        self._call = self._call or number
        if self.perturber is not None:
            # After the prompt only the new positions are sent; the mask covers them all.
            mask = attention_mask[:, attention_mask.shape[1] - hidden.shape[1] :]
            hidden = self.perturber.hidden(
                hidden, mask, release=self._call, micro=self._index, stream=self.stream
            )
        self._index += 1
        return self.body.step(hidden, attention_mask)

    def reset(self) -> None:
        self.body.reset()
        self._call, self._index = 0, 0


@dataclass
class SplitSession:
    """Head and tail here and a session of the body on the backbone: the split model
    that generation and evaluation run through (see :func:`split_session`)."""

    head: Head
    tail: Tail
    session_id: str
    stream: GenerateStream
    # Whether head, tail and session carry the checkpoint's trained adapter.
    trained: bool
    # The client's privacy ledger (None without [training.perturbation]).
    ledger: PrivacyLedger | None = None
    # Reopens the session after a lost stream or a restarted backbone (waiting for it):
    # (session id, fresh stream); None: a lost stream is the caller's error.
    reopen: Callable[[str], tuple[str, GenerateStream]] | None = None

    def reconnect(self) -> GenerateStream:
        """A fresh stream of the session (reopened, or where the backbone lost it and it
        held no trained adapter, a new session of the same settings)."""
        if self.reopen is None:
            raise StreamLostError("the stream to the backbone was lost")
        self.stream.close()
        self.session_id, self.stream = self.reopen(self.session_id)
        return self.stream

    def body(self, kind: str = GENERATION, *, perturb: bool = True) -> BodyStage:
        """The body as a stage for :class:`SplitGenerator`: with a ledger, every forward
        is a release of ``kind``, perturbed as the settings say for it (never when not
        ``perturb``: e.g. ``splitfed evaluate``, which measures the model as it is).
        A lost stream is replayed below the release (:class:`RemoteBodyStage`): the same
        values again, not a new release."""
        stage = RemoteBodyStage(self.stream, self.reconnect if self.reopen else None)
        if self.ledger is None:
            return stage
        settings = self.ledger.settings
        perturber = Perturber(settings) if perturb and perturbs(settings, kind) else None
        return ReleasedStage(stage, self.ledger, perturber, kind)


@dataclass(frozen=True)
class SplitParts:
    """What :func:`split_session` loads once and may share between sessions: head and
    tail (with the checkpoint's adapter when trained) and the body adapter's settings.
    Modules without state of their own: each generation makes its own caches."""

    head: Head
    tail: Tail
    # The settings of the body's adapter (a no-op LoRA for the base model).
    adapter: AdapterSettings
    # The training checkpoint's session ("" : none, or the base model).
    session_id: str = ""
    trained_against: TrainedAgainst | None = None


def load_parts(config: ClientConfig, *, trained: bool = True) -> SplitParts:
    """Head and tail of ``config``: with ``trained``, carrying the training checkpoint's
    adapter (from ``adapter.safetensors``) and naming its session; without, the base
    model's (see :func:`split_session`)."""
    train = config.training
    head = load_head(train.model_path, train.k, train.m, quantization=train.quantization)
    tail = load_tail(train.model_path, train.k, train.m, quantization=train.quantization)
    checkpoint = train.checkpoint_dir
    if trained and checkpoint is not None and (checkpoint / "client.json").is_file():
        state = json.loads((checkpoint / "client.json").read_text())
        tensors = load_adapter(checkpoint / "adapter.safetensors")
        for part in (head, tail):
            config.adapter.apply(part)
            load_adapter_state(part, tensors)
        return SplitParts(
            head, tail, config.adapter, state["session_id"], TrainedAgainst.from_metadata(state)
        )
    if not trained:
        return SplitParts(head, tail, AdapterSettings())  # LoRA with B = 0: the base model
    return SplitParts(head, tail, config.adapter)


@contextmanager
def split_session(
    client: BackboneClient,
    config: ClientConfig,
    keymanager: KeyManagerClient | None = None,
    *,
    trained: bool = True,
    ledger: PrivacyLedger | None = None,
    reconnect: RetryPolicy = RECONNECT,
    parts: SplitParts | None = None,
    body_adapter: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[SplitSession]:
    """The split model of ``config``. With ``trained``: the adapters of the training
    checkpoint (head and tail from ``adapter.safetensors``, the body from the session the
    checkpoint names), or without a checkpoint a new session of the [adapter] settings.
    Without ``trained``: the base model (a new session whose LoRA adapter is a no-op).
    A session opened here is deleted afterwards. With [training.perturbation] on, what
    the session sends is counted in ``ledger`` (a trainer's, in the same process), by
    default the one saved in the training checkpoint directory.

    ``parts`` (from :func:`load_parts`; ``trained`` is then theirs) shares head and tail
    already loaded. ``body_adapter`` (a session's exported body adapter): a new session
    of ``parts``' adapter settings holding a copy of it, not the checkpoint's session (so
    several sessions can serve one trained model at once); empty: a new session and
    nothing to copy (a backbone in shared adapter mode runs its one adapter in every
    session).

    A lost stream is reopened (waiting out a restarting backbone under ``reconnect``) and
    the generation replayed into it (:class:`RemoteBodyStage`). A session opened here
    that the backbone no longer has (it restarted without a state directory) is opened
    again with the same settings (and ``body_adapter`` imported again): it is the same
    body; the checkpoint's session cannot be replaced, and losing it is an error."""
    train = config.training
    if ledger is None and train.perturbation.enabled:
        ledger = PrivacyLedger(train.perturbation, directory=train.checkpoint_dir)
    if parts is None:
        if not trained and client.model_info().adapter_mode == "shared":
            raise ValueError(
                "the backbone trains one shared adapter (adapter_mode shared), so it cannot "
                "run the base model; evaluate the adapter alone"
            )
        parts = load_parts(config, trained=trained)
    session_id = parts.session_id if body_adapter is None else ""
    if train.encrypted and keymanager is None:
        raise ValueError("encrypted sessions need the key manager: set [security] keymanager")
    request = SessionRequest(
        k=train.k,
        m=train.m,
        adapter=parts.adapter,
        session_id=session_id,
        encrypted=train.encrypted,
    )
    session = client.open_session(request)
    for warning in mismatches(parts.trained_against, session.info.quantization, train.quantization):
        logger.warning("[generate] %s", warning)
    crypto = None
    if train.encrypted:
        assert keymanager is not None
        crypto = client_crypto(keymanager, session.session_id)
    if body_adapter:
        try:  # sealed with the crypto its stream uses: one sealer per session
            client.import_adapter(session.session_id, body_adapter, crypto)
        except BaseException:
            client.close_session(session.session_id)
            raise
    # "auto" chooses training's encodings; a token's hidden state is small: raw.
    encoding = "raw" if train.encoding == AUTO else train.encoding

    def reopen(current: str) -> tuple[str, GenerateStream]:
        nonlocal crypto
        reopened = _resume(client, replace(request, session_id=current), reconnect)
        if reopened is None:
            if session_id:
                raise RuntimeError(
                    f"the backbone lost session {current} of the training checkpoint (it "
                    "restarted without its state directory?): its trained body adapter is "
                    "gone, so generation cannot go on"
                )
            reopened = _resume(client, request, reconnect)
            assert reopened is not None
            logger.warning(
                "[generate] the backbone lost session %s; continuing in a new one", current
            )
            if train.encrypted:
                assert keymanager is not None
                crypto = client_crypto(keymanager, reopened.session_id)
            if body_adapter:
                client.import_adapter(reopened.session_id, body_adapter, crypto)
        stream = GenerateStream(client, reopened.session_id, encoding, crypto)
        return reopened.session_id, stream

    stream = GenerateStream(client, session.session_id, encoding, crypto)
    split = SplitSession(
        parts.head,
        parts.tail,
        session.session_id,
        stream,
        trained=bool(session_id) or body_adapter is not None,
        ledger=ledger,
        reopen=reopen,
    )
    try:
        yield split
    finally:
        split.stream.close()
        if not session_id:
            client.close_session(split.session_id)


def _resume(
    client: BackboneClient, request: SessionRequest, wait: RetryPolicy
) -> SessionInfo | None:
    """Open ``request``'s session (reopen it: ``session_id`` set), waiting out a backbone
    that is restarting; None where the backbone no longer has the session."""
    delays = wait.delays()
    while True:
        try:
            return client.open_session(request)
        except PermissionDeniedError:
            if not request.session_id:
                raise
            return None  # gone (or never ours: the backbone says the same)
        except StreamLostError as exc:
            delay = next(delays, None)
            if delay is None:
                raise
            logger.warning("[generate] %s; waiting for the backbone", exc)
            time.sleep(delay)


def sampling_options(config: ClientConfig, tokenizer: Any, **options: Any) -> SamplingOptions:
    """[generation] with the tokenizer's eos and pad tokens (and ``options`` on top)."""
    return replace(
        config.generation,
        stop_token_ids=config.generation.stop_token_ids or (int(tokenizer.eos_token_id),),
        pad_token_id=int(tokenizer.pad_token_id),
        **options,
    )


def generate_stream(
    client: BackboneClient,
    config: ClientConfig,
    prompts: list[str],
    keymanager: KeyManagerClient | None = None,
    *,
    ledger: PrivacyLedger | None = None,
    **options: Any,
) -> Iterator[TextDelta]:
    """Complete ``prompts`` (one batched generation) with the adapters of the training
    checkpoint (if any), yielding each prompt's new text as its tokens arrive: per step,
    a :class:`TextDelta` for each prompt with new text, and a ``finished`` one where a
    prompt's completion ends. What is sent is counted in ``ledger`` (see
    :func:`split_session`); a lost stream or restarted backbone is replayed, invisible
    here but for a slower step."""
    train = config.training
    tokenizer = AutoTokenizer.from_pretrained(str(train.model_path), local_files_only=True)
    with split_session(client, config, keymanager, ledger=ledger) as split:
        ids, mask = prompt_ids(tokenizer, prompts, chat_template=train.chat_template)
        generator = SplitGenerator(split.head, split.body(), split.tail)
        sampling = sampling_options(config, tokenizer, **options)
        yield from text_deltas(generator.stream(ids, mask, sampling), tokenizer, len(prompts))


def generate(
    client: BackboneClient,
    config: ClientConfig,
    prompts: list[str],
    keymanager: KeyManagerClient | None = None,
    *,
    ledger: PrivacyLedger | None = None,
    **options: Any,
) -> list[str]:
    """Complete ``prompts`` with the adapters of the training checkpoint (if any); what
    is sent is counted in ``ledger`` (see :func:`split_session`). The completions of
    :func:`generate_stream`, whole."""
    texts = [""] * len(prompts)
    for delta in generate_stream(client, config, prompts, keymanager, ledger=ledger, **options):
        texts[delta.index] += delta.text
    return texts


class Chat:
    """A conversation with the split model: each reply is generated from the whole
    conversation so far (the oldest turns are dropped when it outgrows the model). It
    starts from ``turns`` (user, assistant), e.g. those of a messages file."""

    def __init__(
        self,
        split: SplitSession,
        tokenizer: Any,
        options: SamplingOptions,
        *,
        system: str = "",
        turns: Sequence[tuple[str, str]] = (),
        chat_template: bool = True,
        max_positions: int = 2048,
    ) -> None:
        self.generator = SplitGenerator(split.head, split.body(), split.tail)
        self.tokenizer = tokenizer
        self.options = options
        self.system = system
        self.chat_template = chat_template
        self.start = list(turns)
        self.turns = list(turns)
        self.budget = max_positions - options.max_new_tokens
        if self.budget < 1:
            raise ValueError(
                f"max_new_tokens ({options.max_new_tokens}) leaves no room for a prompt in "
                f"the model's {max_positions} positions"
            )

    def _tokens(self, prompt: str) -> list[int]:
        while True:
            tokens = conversation_tokens(
                self.tokenizer,
                self.turns,
                prompt,
                system=self.system,
                chat_template=self.chat_template,
            )
            if len(tokens) <= self.budget:
                return tokens
            if not self.turns:
                return tokens[-self.budget :]
            self.turns.pop(0)

    def stream(self, prompt: str) -> Iterator[str]:
        """The reply to ``prompt``, text as it arrives (leading whitespace left out); the
        turn joins the conversation once the reply is complete."""
        tokens = self._tokens(prompt)
        ids = torch.tensor([tokens], dtype=torch.long)
        steps = self.generator.stream(ids, torch.ones_like(ids), self.options)
        reply = ""
        for delta in text_deltas(steps, self.tokenizer, 1):
            text = delta.text if reply.strip() else delta.text.lstrip()
            reply += delta.text
            if text:
                yield text
        self.turns.append((prompt, reply.strip()))

    def say(self, prompt: str) -> str:
        return "".join(self.stream(prompt)).strip()

    def reset(self) -> None:
        """Back to the turns it started from."""
        self.turns = list(self.start)


def make_trainer(
    client: BackboneClient, config: ClientConfig, keymanager: KeyManagerClient | None = None
) -> SplitTrainer:
    return SplitTrainer(
        client, config.training, config.adapter, config.optimizer, keymanager=keymanager
    )


@contextmanager
def federated_trainer(
    client: BackboneClient, config: ClientConfig, keymanager: KeyManagerClient | None = None
) -> Iterator[FederatedTrainer]:
    """A :class:`FederatedTrainer` for the [federated] section, with its aggregator channel."""
    federated = config.federated
    if federated is None:
        raise ValueError("the config has no [federated] section")
    tls = config.backbone.tls()
    channel = create_channel(
        federated.aggregator,
        tls,
        server_name=federated.server_name,
        options=config.backbone.options(),
    )
    with channel:
        if not config.training.federation:
            config = replace(
                config, training=replace(config.training, federation=federated.federation)
            )
        trainer = make_trainer(client, config, keymanager)
        yield FederatedTrainer(
            trainer,
            AggregatorClient(
                channel,
                chunk_bytes=min(config.backbone.chunk_bytes, UPLOAD_CHUNK_BYTES),
                # The [backbone] section's deadlines: one link, one set of settings.
                timeout_s=config.backbone.timeout_s,
                transfer_timeout_s=config.backbone.transfer_timeout_s,
                endpoint=Endpoint(
                    "aggregator", federated.aggregator, federated.server_name, tls.source_dir
                ),
            ),
            federated.federation,
            identity=certificate_identity(tls),
            record_dir=federated.record_updates,
            backbone=config.backbone.address,
            join_token=federated.join_token(),
        )


def certificate_identity(tls: TLSConfig) -> str:
    """The identity (subject common name) in this party's certificate; "" without TLS."""
    if tls.cert_chain is None:
        return ""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificates(tls.cert_chain)[0]
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""
