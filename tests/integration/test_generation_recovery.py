"""Generation over a real backbone (its own process, mTLS) as a slow link needs it: one
request and one response message per decoded token, and a lost stream or a backbone
killed (SIGKILL) and restarted mid-generation invisible to the caller, who gets exactly
the tokens of an uninterrupted run (the client replays what it sent into a fresh KV
cache: clients/backbone.py RemoteBodyStage, docs/generation.md)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from backbone_kit import Deployment, deployment
from security_kit import SERVER_NAME, keymanager_kit
from transformers import AutoTokenizer

from splitfed.clients.app import ClientConfig, ReleasedStage, prompt_ids, split_session
from splitfed.clients.backbone import GenerateStream, RemoteBodyStage
from splitfed.clients.keys import KeyManagerClient
from splitfed.clients.trainer import TrainSettings
from splitfed.errors import InvalidArgumentError
from splitfed.models.adapters import AdapterSettings
from splitfed.models.generation import BodyStage, SamplingOptions, SplitGenerator
from splitfed.models.optim import OptimizerSettings
from splitfed.models.tiny import BUNDLED_DATASET
from splitfed.protocol.backbone import (
    GENERATE_REQUEST,
    GENERATE_RESPONSE,
    SERVICE,
    SessionRequest,
)
from splitfed.retry import RetryPolicy
from splitfed.security.ca import CertificateAuthority
from splitfed.security.perturbation import PerturbationSettings
from splitfed.security.releases import GENERATION, PrivacyLedger
from splitfed.serving import ConnectSettings
from splitfed.v1 import backbone_pb2

ADAPTER = AdapterSettings(kind="lora", r=2, alpha=4, seed=1)
PROMPTS = ["Add 1 and 2.", "What is the capital of a country that has a long name?"]
# No stop token: every run decodes all its steps, so a kill at step KILL_AT always lands.
GREEDY = SamplingOptions(max_new_tokens=10)
SAMPLED = SamplingOptions(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=50, seed=7)
KILL_AT = 4
# Waits out a restart of a few seconds on 2 busy cores.
PATIENT = RetryPolicy(max_attempts=120, initial_backoff_s=0.2, max_backoff_s=1.0)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = deployment(tmp_path_factory.mktemp("backbone"), layers=4, hidden_size=64)
    dep.start()
    yield dep
    dep.stop()


def client_config(dep: Deployment, **training: Any) -> ClientConfig:
    settings = TrainSettings(
        data=BUNDLED_DATASET, model_path=dep.model_path, k=1, m=1, chat_template=False
    )
    return ClientConfig(
        backbone=ConnectSettings(address=dep.address),
        training=replace(settings, **training),
        adapter=ADAPTER,
        optimizer=OptimizerSettings(),
        generation=GREEDY,
    )


class Interrupt:
    """A body stage that runs ``action`` just before its ``at``-th step (1-based)."""

    def __init__(self, body: BodyStage, at: int, action: Callable[[], None]) -> None:
        self.body, self.at, self.action, self.steps = body, at, action, 0

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if self.steps == self.at:
            self.action()
        return self.body.step(hidden, attention_mask)

    def reset(self) -> None:
        self.body.reset()


def generate(
    dep: Deployment,
    config: ClientConfig,
    options: SamplingOptions,
    action: Callable[[Any], None] | None = None,
    keys: KeyManagerClient | None = None,
    identity: str = "hospital-a",
) -> tuple[torch.Tensor, int]:
    """The tokens of ``PROMPTS``, with ``action(split)`` before step ``KILL_AT``; and
    how often the body rebuilt the backbone's cache."""
    tokenizer = AutoTokenizer.from_pretrained(str(dep.model_path), local_files_only=True)
    ids, mask = prompt_ids(tokenizer, PROMPTS, chat_template=False)
    channel, client = dep.connect(identity)
    with channel, split_session(client, config, keys, reconnect=PATIENT) as split:
        stage = split.body()
        remote = stage.body if isinstance(stage, ReleasedStage) else stage  # below releases
        assert isinstance(remote, RemoteBodyStage)
        if action is not None:
            stage = Interrupt(stage, KILL_AT, lambda: action(split))
        tokens = SplitGenerator(split.head, stage, split.tail).generate(ids, mask, options)
    return tokens, remote.recoveries


def kill_and_restart(dep: Deployment) -> Callable[[Any], None]:
    """SIGKILL the backbone; restart it on its port (state directory kept) in the
    background, so that the client finds it down and waits for it."""

    def action(_: Any) -> None:
        assert dep.process is not None
        os.kill(dep.process.pid, signal.SIGKILL)
        dep.process.stop()  # reaps it
        threading.Thread(target=dep.start, daemon=True).start()

    return action


def lose_stream(split: Any) -> None:
    split.stream.close()  # cancels the call: the next step finds it lost


class Counting:
    """Messages of the Generate stream as gRPC serialises and parses them."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.received: list[Any] = []

    def serialize(self, frame: Any) -> bytes:
        raw = GENERATE_REQUEST.serialize(frame)
        self.sent.append(backbone_pb2.GenerateRequest.FromString(raw))  # as sent
        return raw

    def parse(self, raw: bytes) -> Any:
        self.received.append(backbone_pb2.GenerateResponse.FromString(raw))
        return GENERATE_RESPONSE.parse(raw)


def test_a_decode_step_is_one_message_each_way(backbone: Deployment) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(backbone.model_path), local_files_only=True)
    ids, mask = prompt_ids(tokenizer, PROMPTS, chat_template=False)
    channel, client = backbone.connect()
    counting = Counting()
    with channel:
        client.generate_call = channel.stream_stream(
            f"/{SERVICE.full_name}/Generate",
            request_serializer=counting.serialize,
            response_deserializer=counting.parse,
        )
        session = client.open_session(SessionRequest(k=1, m=1, adapter=ADAPTER)).session_id
        head, tail = _parts(backbone)
        stream = GenerateStream(client, session, "raw")
        generator = SplitGenerator(head, RemoteBodyStage(stream), tail)
        tokens = generator.generate(ids, mask, GREEDY)
        stream.close()
        client.close_session(session)
    assert tokens.shape == (2, GREEDY.max_new_tokens)
    forwards = [m for m in counting.sent if m.op == backbone_pb2.GENERATE_OP_FORWARD]
    answers = [m for m in counting.received if m.op == backbone_pb2.GENERATE_OP_FORWARD]
    # The prompt: h1 and its mask; then each of the other steps one message, h1 alone.
    assert [m.extend_mask for m in forwards[:2]] == [False, False]
    decode = forwards[2:]
    assert len(decode) == GREEDY.max_new_tokens - 1
    assert all(m.extend_mask and m.chunk.header.name == "h1" for m in decode)
    assert all(list(m.chunk.header.shape) == [2, 1, 64] for m in decode)
    assert len(answers) == GREEDY.max_new_tokens  # one h2 message per step
    # RESET at the start: the only other message each way.
    assert len(counting.sent) == len(forwards) + 1
    assert len(counting.received) == len(answers) + 1


def _parts(dep: Deployment) -> tuple[Any, Any]:
    from splitfed.models.loading import load_head, load_tail

    return load_head(dep.model_path, 1, 1), load_tail(dep.model_path, 1, 1)


def test_extend_mask_without_a_mask_to_extend_is_refused(backbone: Deployment) -> None:
    channel, client = backbone.connect()
    op = backbone_pb2.GENERATE_OP_FORWARD
    with channel:
        session = client.open_session(SessionRequest(k=1, m=1, adapter=ADAPTER)).session_id
        # No earlier forward on the stream.
        stream = GenerateStream(client, session, "raw")
        stream._stream.send_tensor(
            torch.zeros(1, 1, 64), "h1", GENERATE_REQUEST, "raw", op=op, extend_mask=True
        )
        with pytest.raises(InvalidArgumentError, match="needs an earlier forward"):
            stream._stream.receive_tensor()
        stream.close()
        # Rows that differ from the mask's.
        stream = GenerateStream(client, session, "raw")
        stream.reset()  # the session's cache, from the stream before
        stream.forward(torch.zeros(2, 3, 64), torch.ones(2, 3, dtype=torch.long))
        stream._stream.send_tensor(
            torch.zeros(1, 1, 64), "h1", GENERATE_REQUEST, "raw", op=op, extend_mask=True
        )
        with pytest.raises(InvalidArgumentError, match="rows"):
            stream._stream.receive_tensor()
        stream.close()
        # After RESET, nothing to extend either; a full mask is still accepted.
        stream = GenerateStream(client, session, "raw")
        stream.reset()  # the session's cache, from the stream before
        stream.forward(torch.zeros(2, 3, 64), torch.ones(2, 3, dtype=torch.long))
        stream.reset()
        stream._stream.send_tensor(
            torch.zeros(2, 1, 64), "h1", GENERATE_REQUEST, "raw", op=op, extend_mask=True
        )
        with pytest.raises(InvalidArgumentError, match="needs an earlier forward"):
            stream._stream.receive_tensor()
        stream.close()
        stream = GenerateStream(client, session, "raw")
        stream.reset()
        out = stream.forward(torch.zeros(2, 3, 64), torch.ones(2, 3, dtype=torch.long))
        assert out.shape == (2, 3, 64)
        stream.close()
        client.close_session(session)


def test_a_lost_stream_is_replayed_and_the_tokens_are_unchanged(
    backbone: Deployment, tmp_path: Path
) -> None:
    config = client_config(backbone)
    expected, _ = generate(backbone, config, GREEDY)
    got, recoveries = generate(backbone, config, GREEDY, lose_stream)
    assert recoveries == 1
    assert torch.equal(got, expected)
    # Perturbed: the replay resends the released values (the same noise: the same call
    # of a fresh ledger) and is no new release; one forward per token is counted.
    noisy = PerturbationSettings(clip_norm=0.05, noise_multiplier=1.2, seed=9, generation=True)
    plain = client_config(backbone, perturbation=noisy, checkpoint_dir=tmp_path / "plain")
    lost = client_config(backbone, perturbation=noisy, checkpoint_dir=tmp_path / "lost")
    expected, _ = generate(backbone, plain, GREEDY)
    got, recoveries = generate(backbone, lost, GREEDY, lose_stream)
    assert recoveries == 1
    assert torch.equal(got, expected)
    assert _generation_releases(plain) == _generation_releases(lost) == GREEDY.max_new_tokens


def _generation_releases(config: ClientConfig) -> int:
    ledger = PrivacyLedger(config.training.perturbation, directory=config.training.checkpoint_dir)
    return ledger.covered()[GENERATION]


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_backbone_killed_mid_generation_changes_no_token(
    backbone: Deployment, options: SamplingOptions
) -> None:
    config = client_config(backbone)
    expected, _ = generate(backbone, config, options)
    got, recoveries = generate(backbone, config, options, kill_and_restart(backbone))
    assert recoveries >= 1
    assert torch.equal(got, expected)


def test_a_session_the_restarted_backbone_lost_is_opened_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a state directory the restarted backbone has forgotten the session: one
    opened for generation alone is opened again with the same settings (the same body)."""
    dep = deployment(tmp_path, layers=4, hidden_size=64, state_dir=None)
    dep.start()
    try:
        config = client_config(dep)
        expected, _ = generate(dep, config, GREEDY)
        got, recoveries = generate(dep, config, GREEDY, kill_and_restart(dep))
        assert recoveries >= 1
        assert torch.equal(got, expected)
        assert "continuing in a new one" in caplog.text
    finally:
        dep.stop()


@pytest.mark.slow
def test_an_encrypted_generation_survives_a_backbone_restart(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("generation test CA")
    with pytest.MonkeyPatch.context() as mp:
        km = keymanager_kit(tmp_path / "km", mp, ca=ca)
        km.start()
        dep = deployment(
            tmp_path / "backbone",
            layers=4,
            hidden_size=64,
            ca=ca,
            security={"keymanager": km.address, "keymanager_server_name": SERVER_NAME},
        )
        dep.start()
        try:
            party = km.enroll("alice")
            keys = km.client(party)
            config = client_config(dep, encrypted=True)
            expected, _ = generate(dep, config, GREEDY, keys=keys, identity="alice")
            got, recoveries = generate(
                dep, config, GREEDY, kill_and_restart(dep), keys=keys, identity="alice"
            )
            assert recoveries >= 1
            assert torch.equal(got, expected)
        finally:
            dep.stop()
            km.stop()
