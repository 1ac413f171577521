"""The OpenAI-compatible API (clients/openai_api.py) over a fake engine, in-process
(FastAPI's TestClient: no socket): request mapping, the checks and refusals, errors in
OpenAI's shape with their status codes, streaming events, the API key and the size
limit; and the engine's stop strings (clients/engine.py StopText)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient

from splitfed.clients.engine import (
    BackboneUnavailableError,
    Delta,
    OverloadedError,
    StopText,
)
from splitfed.clients.openai_api import ApiSettings, ChatMessage, build_app, conversation
from splitfed.models.generation import SamplingOptions

MODEL = "tiny-adapter"
KEY = "s3cret-key"


@dataclass
class FakeEngine:
    """Tokens are characters; each row's completion is ``reply`` in two pieces."""

    reply: str = "Hello there"
    concurrency: int = 2
    max_queued: int = 1
    max_positions: int = 64
    defaults: SamplingOptions = field(
        default_factory=lambda: SamplingOptions(max_new_tokens=8, stop_token_ids=(2,))
    )
    failure: BaseException | None = None
    overloaded: bool = False
    calls: list[tuple[list[list[int]], SamplingOptions, list[str]]] = field(default_factory=list)
    chats: list[tuple[str, list[tuple[str, str]], str]] = field(default_factory=list)
    released: int = 0

    idle_sessions = 2

    def prompt_ids(self, prompt: str) -> list[int]:
        return [ord(c) for c in prompt]

    def chat_ids(self, system: str, turns: Sequence[tuple[str, str]], prompt: str) -> list[int]:
        self.chats.append((system, list(turns), prompt))
        return [ord(c) for c in prompt]

    def admit(self) -> FakeTicket:
        if self.overloaded:
            raise OverloadedError("2 requests are generating and 1 waiting; try again later")
        return FakeTicket(self)


@dataclass
class FakeTicket:
    engine: FakeEngine

    def stream(
        self,
        rows: Sequence[Sequence[int]],
        sampling: SamplingOptions,
        stops: Sequence[str] = (),
        cancel: threading.Event | None = None,
    ) -> Iterator[Delta]:
        self.engine.calls.append(([list(r) for r in rows], sampling, list(stops)))
        if self.engine.failure is not None:
            raise self.engine.failure
        half = len(self.engine.reply) // 2
        for index in range(len(rows)):
            yield Delta(index, self.engine.reply[:half])
        for index in range(len(rows)):
            yield Delta(index, self.engine.reply[half:], "length", sampling.max_new_tokens)

    def release(self) -> None:
        self.engine.released += 1


def client_for(engine: FakeEngine, **settings: Any) -> TestClient:
    app = build_app(engine, ApiSettings(MODEL, **settings))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def api(engine: FakeEngine) -> Iterator[TestClient]:
    with client_for(engine) as client:
        yield client


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def chat(content: str = "Hi", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def test_models_lists_the_one_model(api: TestClient) -> None:
    body = api.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert api.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    error = error_of(api.get("/v1/models/gpt-4"), 404)
    assert error["code"] == "model_not_found"


def test_a_completion_maps_prompts_n_and_sampling(api: TestClient, engine: FakeEngine) -> None:
    response = api.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": ["ab", "xyz"],
            "n": 2,
            "max_tokens": 5,
            "temperature": 0.7,
            "top_p": 0.9,
            "seed": 11,
            "stop": "\n",
            "user": "someone",
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert {c["text"] for c in body["choices"]} == {"Hello there"}
    assert {c["finish_reason"] for c in body["choices"]} == {"length"}
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}
    rows, sampling, stops = engine.calls[0]
    assert rows == [[97, 98], [97, 98], [120, 121, 122], [120, 121, 122]]
    assert sampling == SamplingOptions(
        max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, seed=11, stop_token_ids=(2,)
    )
    assert stops == ["\n"]
    assert engine.released == 1


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, SamplingOptions(max_new_tokens=8, stop_token_ids=(2,))),  # the config's
        ({"temperature": 0}, SamplingOptions(max_new_tokens=8, stop_token_ids=(2,))),
        ({"max_completion_tokens": 3}, SamplingOptions(max_new_tokens=3, stop_token_ids=(2,))),
        (
            {"temperature": 1.5, "seed": 3},
            SamplingOptions(
                max_new_tokens=8, do_sample=True, temperature=1.5, seed=3, stop_token_ids=(2,)
            ),
        ),
    ],
)
def test_chat_sampling_on_top_of_the_config(
    api: TestClient, engine: FakeEngine, fields: dict[str, Any], expected: SamplingOptions
) -> None:
    response = api.post("/v1/chat/completions", json=chat(**fields))
    assert response.status_code == 200, response.text
    assert engine.calls[0][1] == expected


def test_a_chat_maps_system_turns_and_content_parts(api: TestClient, engine: FakeEngine) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Add 1"}, {"type": "text", "text": "and 2"}],
        },
    ]
    response = api.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"] == "Hello there"
    assert body["usage"]["prompt_tokens"] == len("Add 1\nand 2")
    assert engine.chats == [("Be brief.", [("Hi", "Hello.")], "Add 1\nand 2")]


def test_conversation_needs_alternating_turns_ending_with_the_user() -> None:
    def of(*roles: str) -> list[ChatMessage]:
        return [ChatMessage(role=r, content=r) for r in roles]  # type: ignore[arg-type]

    assert conversation(of("developer", "user")) == ("developer", [], "user")
    assert conversation(of("system", "system", "user", "assistant", "user")) == (
        "system\n\nsystem",
        [("user", "assistant")],
        "user",
    )
    for roles in [
        ("assistant",),
        ("user", "assistant"),
        ("user", "user"),
        ("user", "system", "user"),
    ]:
        with pytest.raises(Exception, match="alternating"):
            conversation(of(*roles))


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {"presence_penalty": 0.5}, "presence_penalty"),
        ("/v1/chat/completions", {"frequency_penalty": -1}, "frequency_penalty"),
        ("/v1/chat/completions", {"logit_bias": {"5": 1}}, "logit_bias"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"best_of": 2}, "best_of"),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
        ("/v1/completions", {"logprobs": 1}, "logprobs"),
    ],
)
def test_fields_that_change_results_are_refused_by_name(
    api: TestClient, engine: FakeEngine, path: str, fields: dict[str, Any], param: str
) -> None:
    base = chat() if "chat" in path else {"model": MODEL, "prompt": "x"}
    error = error_of(api.post(path, json={**base, **fields}), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"]
    assert engine.calls == []


def test_their_no_op_values_are_accepted(api: TestClient) -> None:
    fields = {
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logprobs": False,
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "parallel_tool_calls": True,
    }
    assert api.post("/v1/chat/completions", json=chat(**fields)).status_code == 200
    assert (
        api.post(
            "/v1/completions", json={"model": MODEL, "prompt": "x", "echo": False, "best_of": 1}
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (chat(frobnicate=1), "frobnicate", "Unrecognized request argument"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "Missing required"),
        (chat(temperature=3), "temperature", "Invalid value"),
        (chat(n=0), "n", "Invalid value"),
        ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", ""),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
            "",
        ),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
        (chat(n=9), "n", "at most 8"),
        (chat(max_tokens=5000), "max_tokens", "at most 4096"),
        (chat(max_completion_tokens=63), "max_completion_tokens", "maximum context length is 64"),
        (chat("x" * 64), "messages", "64 positions"),
    ],
)
def test_invalid_requests_are_400_naming_the_field(
    api: TestClient, body: dict[str, Any], param: str, message: str
) -> None:
    error = error_of(api.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == param
    assert message in error["message"]


def test_the_default_length_is_capped_by_the_positions(api: TestClient, engine: FakeEngine) -> None:
    assert api.post("/v1/chat/completions", json=chat("x" * 60)).status_code == 200
    assert engine.calls[0][1].max_new_tokens == 4  # 64 positions - 60 of prompt


def test_bad_json_unknown_paths_and_methods_answer_in_the_error_shape(api: TestClient) -> None:
    response = api.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert "parse the JSON" in error_of(response, 400)["message"]
    assert error_of(api.get("/v1/engines"), 404)["code"] == "not_found"
    assert error_of(api.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"


def test_an_unknown_model_is_404(api: TestClient, engine: FakeEngine) -> None:
    error = error_of(api.post("/v1/chat/completions", json={**chat(), "model": "gpt-4o"}), 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert engine.calls == []


def test_a_full_queue_is_429(engine: FakeEngine, api: TestClient) -> None:
    engine.overloaded = True
    error = error_of(api.post("/v1/chat/completions", json=chat()), 429)
    assert error["type"] == "rate_limit_error"


@pytest.mark.parametrize("stream", [False, True])
def test_a_backbone_that_is_down_is_503_and_the_server_goes_on(
    engine: FakeEngine, api: TestClient, stream: bool
) -> None:
    engine.failure = BackboneUnavailableError("the backbone is unavailable: connection refused")
    error = error_of(api.post("/v1/chat/completions", json=chat(stream=stream)), 503)
    assert "connection refused" in error["message"]
    assert engine.released == 1
    engine.failure = None
    assert api.post("/v1/chat/completions", json=chat(stream=stream)).status_code == 200


def test_an_unexpected_failure_is_500(engine: FakeEngine, api: TestClient) -> None:
    engine.failure = RuntimeError("boom")
    error = error_of(api.post("/v1/completions", json={"model": MODEL, "prompt": "x"}), 500)
    assert error["type"] == "server_error"


def events(response: Any) -> list[str]:
    lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
    return [line.removeprefix("data: ") for line in lines]


def test_a_chat_stream_is_openai_chunks_then_done(api: TestClient) -> None:
    response = api.post(
        "/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True})
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    data = events(response)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10}
    assert all(c["usage"] is None for c in chunks[:-1])


def test_a_completion_stream_has_text_completion_chunks(api: TestClient) -> None:
    response = api.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
    data = events(response)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello there"
    assert "usage" not in chunks[0]


def test_the_api_key_is_required_except_for_health(engine: FakeEngine) -> None:
    with client_for(engine, api_key=KEY) as api:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]:
            error = error_of(api.get("/v1/models", headers=headers), 401)
            assert error["code"] == "invalid_api_key"
        error_of(api.post("/v1/chat/completions", json=chat()), 401)
        assert engine.calls == []
        good = {"Authorization": f"Bearer {KEY}"}
        assert api.get("/v1/models", headers=good).status_code == 200
        assert api.post("/v1/chat/completions", json=chat(), headers=good).status_code == 200
        assert api.get("/metrics", headers=good).status_code == 200
        assert api.get("/health").json()["status"] == "ok"


def test_a_body_over_the_limit_is_413_with_or_without_content_length(engine: FakeEngine) -> None:
    with client_for(engine, max_request_bytes=200) as api:
        big = json.dumps(chat("x" * 300)).encode()
        error = error_of(api.post("/v1/chat/completions", content=big), 413)
        assert "200 bytes" in error["message"]

        def chunked() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
            for start in range(0, len(big), 50):
                yield big[start : start + 50]

        response = api.post(
            "/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}
        )
        error_of(response, 413)
        small = json.dumps(chat("x")).encode()
        response = api.post(
            "/v1/chat/completions",
            content=iter([small[:10], small[10:]]),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 200, response.text
        assert engine.calls and len(engine.calls) == 1


def test_metrics_count_requests_and_errors(api: TestClient) -> None:
    api.post("/v1/chat/completions", json=chat())
    api.post("/v1/chat/completions", json={**chat(), "model": "nope"})
    text = api.get("/metrics").text
    assert 'splitfed_openai_requests_total{code="200",path="/v1/chat/completions"}' in text
    assert (
        'splitfed_openai_errors_total{code="model_not_found",type="invalid_request_error"}' in text
    )
    assert "splitfed_openai_queue_wait_seconds_bucket" in text


def test_stop_strings_cut_the_text_and_hold_back_a_possible_start() -> None:
    row = StopText(["\n\n", "END"])
    assert row.add("Hello E") == "Hello "  # "E" may start END
    assert row.add("N") == ""
    assert row.add("ough") == "ENough"
    assert row.add(" then\n") == " then"
    assert row.add("\nmore") == ""
    assert row.stopped and row.text.startswith("Hello ENough then\n\n")
    plain = StopText([])
    assert plain.add("abc") == "abc" and plain.finish() == ""
    held = StopText(["xyz"])
    assert held.add("ab x") == "ab " and held.finish() == "x"
    first = StopText(["b", "a"])  # the earliest stop in the text wins
    assert first.add("cab") == "c" and first.stopped
