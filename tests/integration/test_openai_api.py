"""``splitfed serve openai`` against a real backbone over mTLS (its own process, a tiny
llama), talked to by real clients: the official ``openai`` package and ``curl``.

One deployment for the module: a checkpoint trained for one step, a client model
directory whose tokenizer has a chat template, the engine (two pool sessions: the
checkpoint's and a copy of its body adapter) and the HTTP server in this process on
127.0.0.1 port 0; the CLI once as a subprocess. Completions carry the tokens of the SDK's
``generate()`` for the same prompt, seed and sampling settings (the reference is taken
before the server holds the checkpoint's session)."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import torch
from backbone_kit import SERVER_NAME, Deployment, deployment
from click.testing import CliRunner
from helpers import fresh_log, wait_until
from security_kit import SERVER_NAME as KEYMANAGER_NAME
from security_kit import keymanager_kit
from transformers import AutoTokenizer

from splitfed.cli import cli
from splitfed.cli.launcher import ServiceProcess
from splitfed.clients.app import ClientConfig, backbone_client, generate, keymanager_for
from splitfed.clients.backbone import BackboneClient
from splitfed.clients.engine import Engine, collect
from splitfed.clients.keys import KeyManagerClient
from splitfed.clients.openai_api import ApiSettings, HttpServer, build_app, serve_in_thread
from splitfed.clients.trainer import SplitTrainer, TrainSettings
from splitfed.models.adapters import AdapterSettings
from splitfed.models.generation import SamplingOptions
from splitfed.models.optim import OptimizerSettings
from splitfed.models.tiny import BUNDLED_DATASET
from splitfed.security.ca import CertificateAuthority
from splitfed.serving import ConnectSettings, SecuritySettings

pytestmark = pytest.mark.slow

MODEL = "tiny-adapter"
KEY = "test-key-0123"
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
PROMPTS = ["Add 1 and 2.", "Name a colour."]
NEW_TOKENS = 8
SAMPLED = {"do_sample": True, "temperature": 1.3, "seed": 7}


@dataclass
class Served:
    dep: Deployment
    config: ClientConfig
    config_path: Path
    engine: Engine
    server: HttpServer
    # generate() of each prompt, greedy and sampled (SAMPLED)
    greedy: dict[str, str]
    sampled: dict[str, str]
    # generate() of PROMPTS as one batch, 4 tokens
    batched: list[str]

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.url, api_key=key, max_retries=0)


def client_config(dep: Deployment, root: Path) -> tuple[ClientConfig, Path]:
    """A config whose model directory is the backbone's with a chat template, and its
    TOML file (for the CLI)."""
    model = root / "client-model"
    shutil.copytree(dep.model_path, model)
    tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(str(model))
    dep.ca.issue("hospital-a", "client").write(root / "client-tls")
    training = TrainSettings(
        data=BUNDLED_DATASET,
        model_path=model,
        k=1,
        m=1,
        batch_size=2,
        max_steps=1,
        max_length=32,
        checkpoint_dir=root / MODEL,
    )
    # No stop token the tiny model emits: every generation runs its max_tokens.
    generation = SamplingOptions(max_new_tokens=NEW_TOKENS, stop_token_ids=(5,))
    config = ClientConfig(
        backbone=ConnectSettings(
            address=dep.address, server_name=SERVER_NAME, tls_dir=root / "client-tls"
        ),
        training=training,
        adapter=AdapterSettings(r=2, alpha=4, seed=1),
        optimizer=OptimizerSettings(learning_rate=5e-2),
        generation=generation,
    )
    path = root / "client.toml"  # for the CLI: the same, without the checkpoint
    path.write_text(
        "[backbone]\n"
        f'address = "{dep.address}"\nserver_name = "{SERVER_NAME}"\n'
        f'tls_dir = "{root / "client-tls"}"\n'
        "[training]\n"
        f'data = "{BUNDLED_DATASET}"\nmodel_path = "{model}"\nk = 1\nm = 1\n'
        "[adapter]\nr = 2\nalpha = 4\n"
        f"[generation]\nmax_new_tokens = {NEW_TOKENS}\nstop_token_ids = [5]\n"
    )
    return config, path


def train_checkpoint(
    client: BackboneClient, config: ClientConfig, keys: KeyManagerClient | None = None
) -> None:
    """The config's training (one step): its checkpoint, and its session's trained body."""
    trainer = SplitTrainer(
        client, config.training, config.adapter, config.optimizer, keymanager=keys
    )
    trainer.run()
    trainer.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("openai")
    dep = deployment(root, layers=3, hidden_size=32)
    dep.start()
    try:
        config, path = client_config(dep, root)
        with backbone_client(config.backbone) as client:
            train_checkpoint(client, config)
            greedy = {p: generate(client, config, [p])[0] for p in PROMPTS}
            sampled = {p: generate(client, config, [p], **SAMPLED)[0] for p in PROMPTS}
            batched = generate(client, config, PROMPTS, max_new_tokens=4)
        with Engine.from_config(config, concurrency=2, max_queued=2) as engine:
            settings = ApiSettings(MODEL, api_key=KEY)
            with serve_in_thread(build_app(engine, settings)) as server:
                yield Served(dep, config, path, engine, server, greedy, sampled, batched)
    finally:
        dep.stop()


def test_the_pool_serves_the_checkpoint_and_a_copy_of_its_body(served: Served) -> None:
    sessions = [slot.split for slot in served.engine._slots]
    assert all(s is not None and s.trained for s in sessions)
    state = json.loads((served.config.training.checkpoint_dir / "client.json").read_text())  # type: ignore[operator]
    assert sessions[0] is not None and sessions[0].session_id == state["session_id"]
    assert sessions[1] is not None and sessions[1].session_id != state["session_id"]
    trained = served.engine.client.export_adapter(sessions[0].session_id)
    copied = served.engine.client.export_adapter(sessions[1].session_id)
    assert trained.keys() == copied.keys() and trained
    for name, tensor in trained.items():
        torch.testing.assert_close(copied[name], tensor, rtol=0, atol=0)
    assert any(bool(t.abs().sum() > 0) for n, t in trained.items() if "lora_B" in n)  # trained
    assert served.greedy[PROMPTS[0]] != served.sampled[PROMPTS[0]]


def test_chat_and_completion_give_the_tokens_of_generate(served: Served) -> None:
    api = served.client()
    assert [m.id for m in api.models.list().data] == [MODEL]
    for prompt in PROMPTS:
        reply = api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0
        )
        assert reply.choices[0].message.content == served.greedy[prompt]
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens == NEW_TOKENS
        sampled = api.completions.create(model=MODEL, prompt=prompt, temperature=1.3, seed=7)
        assert sampled.choices[0].text == served.sampled[prompt]
    both = api.completions.create(model=MODEL, prompt=PROMPTS, temperature=0, max_tokens=4)
    assert [c.text for c in both.choices] == served.batched  # one batch, as generate's
    assert both.usage is not None and both.usage.completion_tokens == 8


def test_chat_streams_through_the_openai_package(served: Served) -> None:
    # The README's example.
    client = openai.OpenAI(base_url=served.server.url, api_key=KEY)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == served.greedy[PROMPTS[0]]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == NEW_TOKENS


def test_a_stop_string_cuts_the_completion(served: Served) -> None:
    reference = served.greedy[PROMPTS[0]]
    stop = reference[len(reference) // 2 :][:2]
    cut = reference[: reference.find(stop)]
    api = served.client()
    reply = api.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, stop=[stop])
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (cut, "stop")


def test_errors_raise_the_openai_exceptions(served: Served) -> None:
    with pytest.raises(openai.AuthenticationError):
        served.client("wrong").models.list()
    api = served.client()
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], presence_penalty=1.0
        )
    assert refused.value.param == "presence_penalty"


def test_concurrent_requests_give_the_tokens_they_give_alone(served: Served) -> None:
    api = served.client()
    start = threading.Barrier(len(PROMPTS))
    replies: dict[str, str] = {}

    def ask(prompt: str) -> None:
        start.wait()
        reply = api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0
        )
        replies[prompt] = reply.choices[0].message.content or ""

    threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert replies == served.greedy


def cancelled(served: Served) -> float:
    text = httpx2.get(
        served.server.url.removesuffix("/v1") + "/metrics",
        headers={"Authorization": f"Bearer {KEY}"},
    ).text
    for line in text.splitlines():
        if line.startswith('splitfed_openai_generation_seconds_count{outcome="cancelled"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_goes_mid_stream_frees_its_session(served: Served) -> None:
    before = cancelled(served)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": 400,
        "stream": True,
    }
    with (
        httpx2.Client(headers={"Authorization": f"Bearer {KEY}"}) as http,
        http.stream("POST", served.server.url + "/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    # The connection is closed: the generation stops at its next step.
    assert wait_until(lambda: served.engine.idle_sessions == 2, timeout_s=30)
    assert wait_until(lambda: cancelled(served) == before + 1, timeout_s=10)
    reply = served.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0
    )
    assert reply.choices[0].message.content == served.greedy[PROMPTS[0]]


def test_a_client_that_goes_before_a_whole_answer_stops_its_generation(served: Served) -> None:
    # Not streamed: the server notices the closed connection while it generates.
    before = cancelled(served)
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 480}
    timeout = httpx2.Timeout(10.0, read=0.3)
    with (
        httpx2.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout) as http,
        pytest.raises(httpx2.ReadTimeout),
    ):
        http.post(served.server.url + "/completions", json=body)
    assert wait_until(lambda: cancelled(served) == before + 1, timeout_s=30)
    assert wait_until(lambda: served.engine.idle_sessions == 2, timeout_s=10)


def test_https_with_a_certificate(served: Served, tmp_path: Path) -> None:
    ca = CertificateAuthority.create("hospital-a CA")
    ca.issue("openai-endpoint", "backbone", ip_addresses=["127.0.0.1"]).write(tmp_path)
    app = build_app(served.engine, ApiSettings(MODEL, api_key=KEY))
    trusted = ssl.create_default_context(cafile=tmp_path / "ca.pem")
    with (
        serve_in_thread(
            app, tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem"
        ) as server,
        httpx2.Client(verify=trusted) as http,
    ):
        assert server.url.startswith("https://127.0.0.1:")
        api = openai.OpenAI(base_url=server.url, api_key=KEY, http_client=http)
        reply = api.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0)
        assert reply.choices[0].text == served.greedy[PROMPTS[0]]
        with pytest.raises(httpx2.ConnectError):  # plain HTTP, or a CA it does not know
            httpx2.get(server.url + "/models", verify=True)
    with pytest.raises(ValueError, match="needs both a certificate and its key"):
        serve_in_thread(app, tls_cert=tmp_path / "cert.pem")


def test_the_cli_serves_curl_and_refuses_an_open_listen_without_a_key(
    served: Served, tmp_path: Path
) -> None:
    args = ["serve", "openai", "--config", str(served.config_path)]
    env = {k: v for k, v in os.environ.items() if k != "SPLITFED_OPENAI_API_KEY"}
    refused = CliRunner(env=env).invoke(cli, [*args, "--listen", "0.0.0.0:0"])
    assert refused.exit_code == 2
    assert "not a loopback address: give --api-key-file" in refused.output
    (tmp_path / "key").write_text(KEY + "\n")
    half = CliRunner(env=env).invoke(cli, [*args, "--tls-cert", str(tmp_path / "key")])
    assert half.exit_code == 2
    assert "give --tls-cert and --tls-key together" in half.output
    process = ServiceProcess(
        "openai",
        [*args, "--listen", "127.0.0.1:0", "--api-key-file", str(tmp_path / "key")],
        log_path=fresh_log(tmp_path / "openai.log"),
    )
    address = process.start(timeout_s=120)
    try:
        body = {
            "model": "client-model",  # the model directory's name: no checkpoint
            "messages": [{"role": "user", "content": PROMPTS[0]}],
            "stream": True,
            "temperature": 0,
        }
        result = subprocess.run(
            [
                *("curl", "-sN", f"http://{address}/v1/chat/completions"),
                *("-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json"),
                *("-d", json.dumps(body)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        data = [
            line.removeprefix("data: ")
            for line in result.stdout.splitlines()
            if line.startswith("data: ")
        ]
        assert data[-1] == "[DONE]"
        chunks: list[dict[str, Any]] = [json.loads(d) for d in data[:-1]]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert len(text) > 0
        # The tokens of `splitfed generate` with the same config and prompt.
        generated = CliRunner().invoke(
            cli, ["generate", "--config", str(served.config_path), "--prompt", PROMPTS[0]]
        )
        assert generated.exit_code == 0, generated.output
        assert generated.output == f"> {PROMPTS[0]}\n{text}\n"
        denied = subprocess.run(
            ["curl", "-s", f"http://{address}/v1/models"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(denied.stdout)["error"]["code"] == "invalid_api_key"
    finally:
        assert process.stop() == 0


def test_in_shared_adapter_mode_the_pool_opens_sessions_of_its_own(tmp_path: Path) -> None:
    # Every session of a shared-mode backbone runs its one adapter: the pool's other
    # sessions are new ones (nothing copied), never the checkpoint's session twice.
    dep = deployment(tmp_path, layers=3, hidden_size=32, adapter_mode="shared")
    dep.start()
    try:
        config, _ = client_config(dep, tmp_path)
        with backbone_client(config.backbone) as client:
            train_checkpoint(client, config)
            expected = generate(client, config, [PROMPTS[0]])[0]
        state = json.loads((tmp_path / MODEL / "client.json").read_text())
        with Engine.from_config(config, concurrency=2) as engine:
            sessions = [slot.split.session_id for slot in engine._slots if slot.split]
            assert sessions[0] == state["session_id"] and len(set(sessions)) == 2
            rows = [engine.prompt_ids(PROMPTS[0])]
            start = threading.Barrier(2)
            texts: list[str] = []

            def ask() -> None:
                start.wait()
                with engine.admit() as ticket:
                    texts.append(collect(ticket.stream(rows, engine.defaults), 1)[0].text)

            threads = [threading.Thread(target=ask) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert texts == [expected, expected]
    finally:
        dep.stop()


def test_an_encrypted_checkpoint_is_copied_sealed_into_the_pools_sessions(
    tmp_path: Path,
) -> None:
    # Encrypted sessions: the body adapter leaves the checkpoint's session sealed under
    # its keys and enters the copy sealed under the copy's own.
    ca = CertificateAuthority.create("openai test CA")
    with pytest.MonkeyPatch.context() as mp:
        km = keymanager_kit(tmp_path / "km", mp, ca=ca)
        km.start()
        dep = deployment(
            tmp_path / "backbone",
            layers=3,
            hidden_size=32,
            ca=ca,
            security={"keymanager": km.address, "keymanager_server_name": KEYMANAGER_NAME},
        )
        dep.start()
        try:
            plain, _ = client_config(dep, tmp_path)
            config = replace(
                plain,
                backbone=replace(plain.backbone, tls_dir=km.enroll("hospital-a")),
                training=replace(plain.training, encrypted=True),
                security=SecuritySettings(
                    keymanager=km.address, keymanager_server_name=KEYMANAGER_NAME, renew=False
                ),
            )
            with backbone_client(config.backbone) as client, keymanager_for(config) as keys:
                train_checkpoint(client, config, keys)
                expected = generate(client, config, [PROMPTS[0]], keys)[0]
            with Engine.from_config(config, concurrency=2) as engine:
                assert all(slot.split is not None and slot.split.trained for slot in engine._slots)
                rows = [engine.prompt_ids(PROMPTS[0])]
                for _ in engine._slots:  # one after the other: each session once
                    with engine.admit() as ticket:
                        got = collect(ticket.stream(rows, engine.defaults), 1)[0].text
                    assert got == expected
        finally:
            dep.stop()
            km.stop()
