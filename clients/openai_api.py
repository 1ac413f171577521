"""``splitfed serve openai``: an OpenAI-compatible HTTP API over the split model
(docs/openai.md). This module maps HTTP to the engine (clients/engine.py): request
models, their checks, responses and server-sent events in OpenAI's shapes, errors as
``{"error": {"message", "type", "param", "code"}}``, an API key, a request size limit,
Prometheus metrics, and the uvicorn server that runs it (:class:`HttpServer`).

One module, over 500 lines: the request models, their checks and the response shapes are
one contract (OpenAI's), read and changed together."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitfed.clients.engine import BackboneUnavailableError, Delta, OverloadedError
from splitfed.files import StrPath
from splitfed.models.generation import SamplingOptions

logger = logging.getLogger(__name__)

REQUESTS = Counter(
    "splitfed_openai_requests",
    "HTTP requests answered by the OpenAI-compatible API, by path and status code.",
    ["path", "code"],
)
REQUEST_SECONDS = Histogram(
    "splitfed_openai_request_duration_seconds",
    "Time from a request's arrival to its last byte (a stream's end), by path.",
    ["path"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
ERRORS = Counter(
    "splitfed_openai_errors",
    "Errors answered, by OpenAI error type and code.",
    ["type", "code"],
)
PATHS = (
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/health",
    "/metrics",
)
# OpenAI's limit on stop strings.
MAX_STOPS = 4
# How often a request whose answer is not streaming yet looks whether its client left.
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class ApiSettings:
    """What ``splitfed serve openai``'s options set."""

    # The one model served (what requests' ``model`` must name).
    model_name: str
    # Required as ``Authorization: Bearer <key>`` ("": no key).
    api_key: str = ""
    # Larger request bodies are refused (413) before more than this is read.
    max_request_bytes: int = 1 << 20
    # The most tokens one request may ask for (max_tokens).
    max_tokens: int = 4096
    # The most rows one request generates together (prompts x n).
    max_batch: int = 8

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must not be empty")
        for name in ("max_request_bytes", "max_tokens", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class TicketLike(Protocol):
    def stream(
        self,
        rows: Sequence[Sequence[int]],
        sampling: SamplingOptions,
        stops: Sequence[str] = (),
        cancel: threading.Event | None = None,
    ) -> Iterator[Delta]: ...

    def release(self) -> None: ...


class EngineLike(Protocol):
    """What the API needs of :class:`~splitfed.clients.engine.Engine` (tests fake it)."""

    concurrency: int
    max_queued: int
    max_positions: int
    defaults: SamplingOptions

    def prompt_ids(self, prompt: str) -> list[int]: ...

    def chat_ids(self, system: str, turns: Sequence[tuple[str, str]], prompt: str) -> list[int]: ...

    def admit(self) -> TicketLike: ...

    @property
    def idle_sessions(self) -> int: ...


# --- errors ---------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        ERRORS.labels(self.type, self.code or "").inc()
        return JSONResponse(self.body(), status_code=self.status)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _validation_error(exc: RequestValidationError) -> ApiError:
    error = exc.errors()[0]
    loc = [str(p) for p in error.get("loc", ()) if p != "body"]
    # A union's members add their type to the path (e.g. messages.0.content.str).
    loc = [p for p in loc if "[" not in p and p not in ("str", "int", "float", "bool")]
    param = ".".join(loc) or None
    if error.get("type") == "extra_forbidden":
        return invalid(f"Unrecognized request argument supplied: {param}", param)
    if error.get("type") == "json_invalid":
        return invalid("We could not parse the JSON body of your request.", None)
    if error.get("type") == "missing":
        return invalid(f"Missing required parameter: '{param}'.", param, "missing_required")
    return invalid(f"Invalid value for '{param}': {error.get('msg', 'invalid')}.", param)


# --- requests -------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints take. Fields that would change results and are not
    supported are accepted only at their no-op values (see :func:`_refusals`)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Ignored: they change nothing generated.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        # Joined as a messages row's parts are for training (clients/data.py).
        return "\n".join(part.text for part in self.content)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None


def _refusals(body: _Common) -> None:
    """400 for a field whose value would change the result and is not supported."""
    checks: list[tuple[str, bool]] = [
        ("presence_penalty", bool(body.presence_penalty)),
        ("frequency_penalty", bool(body.frequency_penalty)),
        ("logit_bias", bool(body.logit_bias)),
    ]
    if isinstance(body, CompletionRequest):
        checks += [
            ("logprobs", body.logprobs is not None),
            ("echo", bool(body.echo)),
            ("best_of", body.best_of not in (None, 1)),
            ("suffix", bool(body.suffix)),
        ]
    if isinstance(body, ChatRequest):
        fmt = (body.response_format or {}).get("type", "text")
        checks += [
            ("logprobs", bool(body.logprobs)),
            ("top_logprobs", body.top_logprobs is not None),
            ("tools", bool(body.tools)),
            ("tool_choice", body.tool_choice not in (None, "none")),
            ("functions", bool(body.functions)),
            ("function_call", body.function_call not in (None, "none")),
            ("response_format", fmt != "text"),
            ("modalities", body.modalities not in (None, ["text"])),
        ]
    for field, refused in checks:
        if refused:
            raise invalid(
                f"'{field}' is not supported by splitfed serve openai (it would change the "
                "result); leave it out",
                field,
                "unsupported_parameter",
            )


def conversation(messages: Sequence[ChatMessage]) -> tuple[str, list[tuple[str, str]], str]:
    """Messages as (system, earlier (user, assistant) turns, the last user message):
    system messages first, then user and assistant alternating, ending with the user."""
    system: list[str] = []
    rest = list(messages)
    while rest and rest[0].role in ("system", "developer"):
        system.append(rest.pop(0).text())
    roles = [m.role for m in rest]
    expected = ["user", "assistant"] * (len(rest) // 2) + ["user"]
    if roles != expected[: len(rest)] or not rest or roles[-1] != "user":
        raise invalid(
            "messages must be system messages first, then user and assistant messages "
            f"alternating, ending with a user message; got {', '.join(m.role for m in messages)}",
            "messages",
        )
    turns = [(rest[i].text(), rest[i + 1].text()) for i in range(0, len(rest) - 1, 2)]
    return "\n\n".join(system), turns, rest[-1].text()


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise invalid(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    return [s for s in stops if s]


def plan_sampling(
    engine: EngineLike,
    settings: ApiSettings,
    body: _Common,
    rows: Sequence[Sequence[int]],
    requested: int | None,
    prompt_param: str,
    param: str = "max_tokens",
) -> SamplingOptions:
    """The request's sampling options on top of the config's [generation], within the
    model's positions and the server's limits."""
    longest = max(len(r) for r in rows)
    room = engine.max_positions - longest
    if room < 1:
        raise invalid(
            f"the prompt is {longest} tokens; this model has {engine.max_positions} positions",
            prompt_param,
            "context_length_exceeded",
        )
    if requested is not None:
        if requested > settings.max_tokens:
            raise invalid(
                f"{param} is {requested}; this server allows at most {settings.max_tokens}",
                param,
            )
        if requested > room:
            raise invalid(
                f"This model's maximum context length is {engine.max_positions} tokens. "
                f"However, you requested {longest + requested} tokens ({longest} in the "
                f"prompt, {requested} for the completion).",
                param,
                "context_length_exceeded",
            )
        tokens = requested
    else:
        tokens = min(engine.defaults.max_new_tokens, settings.max_tokens, room)
    options: dict[str, Any] = {"max_new_tokens": tokens}
    if body.temperature is not None:
        options["do_sample"] = body.temperature > 0
        if body.temperature > 0:
            options["temperature"] = body.temperature
    if body.top_p is not None:
        options["top_p"] = body.top_p
    if body.seed is not None:
        options["seed"] = body.seed
    return replace(engine.defaults, **options)


# --- responses ------------------------------------------------------------------------


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class _Job:
    """One request's generation: its rows and how its choices look."""

    chat: bool
    model: str
    rows: list[list[int]]
    prompt_tokens: int
    sampling: SamplingOptions
    stops: list[str]
    include_usage: bool

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"

    def head(self, chunk: bool) -> dict[str, Any]:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def choice(self, index: int, text: str, finish: str | None, chunk: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        if chunk:
            delta = {"content": text} if finish is None else {}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}

    def chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> str:
        body = {**self.head(True), "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return json.dumps(body)


_END = object()


class _Worker:
    """A ticket's generation in the engine's thread pool, its deltas handed to the event
    loop through a queue; ``cancel`` stops it at its next step."""

    def __init__(self, executor: ThreadPoolExecutor, ticket: TicketLike, job: _Job) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancel = threading.Event()
        self.ticket, self.job = ticket, job
        executor.submit(self._run)

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens
            self.cancel.set()

    def _run(self) -> None:
        try:
            job = self.job
            for delta in self.ticket.stream(job.rows, job.sampling, job.stops, self.cancel):
                self._put(delta)
            self._put(_END)
        except BaseException as exc:
            self._put(exc)
        finally:
            self.ticket.release()

    async def next(self) -> Any:
        return await self.queue.get()

    async def watch(self, request: Request) -> None:
        """Cancel the generation once the client has gone: while the request waits for a
        session or its first token, and for an answer that is not streamed (a streamed
        one notices a disconnect itself when it writes)."""
        while not self.cancel.is_set():
            if await request.is_disconnected():
                self.cancel.set()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)


def _error_of(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BackboneUnavailableError):
        return ApiError(503, str(exc), type="server_error", code="backbone_unavailable")
    if isinstance(exc, ValueError):
        return invalid(str(exc))
    logger.error("[openai] generation failed: %s", exc, exc_info=exc)
    return ApiError(500, f"generation failed: {exc}", type="server_error", code="internal_error")


# --- the app --------------------------------------------------------------------------


class _Guard:
    """Pure ASGI: the API key (every path but /health), the request size limit (413
    before more than ``max_request_bytes`` is read, with or without Content-Length),
    and the request metrics."""

    def __init__(self, app: ASGIApp, settings: ApiSettings) -> None:
        self.app, self.settings = app, settings
        self.key = settings.api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in PATHS else "other"
        started, status = time.perf_counter(), [500]

        async def sent(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None:
                receive, refusal = await self._body(scope, receive)
            if refusal is not None:
                await refusal.response()(scope, receive, sent)
            else:
                await self.app(scope, receive, sent)
        finally:
            REQUESTS.labels(path, str(status[0])).inc()
            REQUEST_SECONDS.labels(path).observe(time.perf_counter() - started)

    def _refusal(self, scope: Scope) -> ApiError | None:
        if not self.key or scope["path"] == "/health":
            return None
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return ApiError(
                401,
                "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )
        return None

    async def _body(self, scope: Scope, receive: Receive) -> tuple[Receive, ApiError | None]:
        limit = self.settings.max_request_bytes
        too_large = ApiError(
            413,
            f"the request body is larger than this server accepts ({limit} bytes)",
            code="request_too_large",
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return receive, too_large
        if scope["method"] in ("GET", "HEAD"):
            return receive, None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive, None  # disconnected: the app sees it
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return receive, too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect

        return replay, None


def build_app(engine: EngineLike, settings: ApiSettings) -> FastAPI:
    """The OpenAI-compatible API over ``engine`` (routes in docs/openai.md)."""
    executor = ThreadPoolExecutor(
        engine.concurrency + engine.max_queued, thread_name_prefix="openai-generate"
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="splitfed OpenAI-compatible API",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(_Guard, settings=settings)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        return _error_of(exc).response()

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "splitfed"}

    def check_model(model: str) -> None:
        if model != settings.model_name:
            raise ApiError(
                404,
                f"The model '{model}' does not exist; this server serves '{settings.model_name}'.",
                param="model",
                code="model_not_found",
            )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "idle_sessions": engine.idle_sessions}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        check_model(model)
        return model_card()

    async def run(request: Request, job: _Job, stream: bool) -> Response:
        try:
            ticket = engine.admit()
        except OverloadedError as exc:
            raise ApiError(429, str(exc), type="rate_limit_error", code="overloaded") from None
        worker = _Worker(executor, ticket, job)
        watcher = asyncio.create_task(worker.watch(request))
        try:
            # The first delta (or the error) before answering: a backbone that is down is
            # a 503, not a stream that breaks.
            first = await worker.next()
            if isinstance(first, BaseException):
                raise _error_of(first)
            if stream:
                watcher.cancel()  # the stream sees the disconnect from here on
                return EventSourceResponse(_events(job, worker, first), sep="\n")
            texts = [""] * len(job.rows)
            ends: list[tuple[str, int]] = [("length", 0)] * len(job.rows)
            item = first
            while item is not _END:
                if isinstance(item, BaseException):
                    raise _error_of(item)
                texts[item.index] += item.text
                if item.finish_reason is not None:
                    ends[item.index] = (item.finish_reason, item.tokens)
                item = await worker.next()
        except BaseException:
            worker.cancel.set()  # a request cancelled or failed here stops its generation
            raise
        finally:
            watcher.cancel()
        choices = [job.choice(i, t, ends[i][0], False) for i, t in enumerate(texts)]
        completion = sum(tokens for _, tokens in ends)
        return JSONResponse(
            {
                **job.head(False),
                "choices": choices,
                "usage": _usage(job.prompt_tokens, completion),
                "system_fingerprint": None,
            }
        )

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        check_model(body.model)
        _refusals(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise invalid("prompt must not be an empty list", "prompt")
        _check_batch(settings, len(prompts), body.n)
        ids = await run_in_threadpool(lambda: [engine.prompt_ids(p) for p in prompts])
        rows = [r for r in ids for _ in range(body.n)]
        sampling = plan_sampling(engine, settings, body, rows, body.max_tokens, "prompt")
        job = _job(False, body, rows, sum(map(len, ids)), sampling)
        return await run(request, job, body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest) -> Response:
        check_model(body.model)
        _refusals(body)
        _check_batch(settings, 1, body.n)
        system, turns, prompt = conversation(body.messages)
        ids = await run_in_threadpool(engine.chat_ids, system, turns, prompt)
        rows = [ids] * body.n
        requested, param = body.max_completion_tokens, "max_completion_tokens"
        if requested is None:
            requested, param = body.max_tokens, "max_tokens"
        sampling = plan_sampling(engine, settings, body, rows, requested, "messages", param)
        return await run(request, _job(True, body, rows, len(ids), sampling), body.stream)

    return app


def _check_batch(settings: ApiSettings, prompts: int, n: int) -> None:
    if prompts * n > settings.max_batch:
        raise invalid(
            f"{prompts} prompt(s) x n={n} is {prompts * n} completions; this server "
            f"generates at most {settings.max_batch} per request",
            "n",
        )


def _job(
    chat: bool, body: _Common, rows: list[list[int]], prompt_tokens: int, sampling: SamplingOptions
) -> _Job:
    include = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    return _Job(chat, body.model, rows, prompt_tokens, sampling, _stops(body.stop), include)


async def _events(job: _Job, worker: _Worker, first: Any) -> AsyncIterator[str]:
    """A streamed response's server-sent events: OpenAI's chunks, then ``[DONE]``. Ends
    the generation when the client goes (the response's task is cancelled)."""
    completion = 0
    try:
        if job.chat:  # the role first, as OpenAI does
            yield job.chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(len(job.rows))
                ]
            )
        item = first
        while item is not _END:
            if isinstance(item, BaseException):
                yield json.dumps(_error_of(item).body())
                return
            if item.text:
                yield job.chunk([job.choice(item.index, item.text, None, True)])
            if item.finish_reason is not None:
                completion += item.tokens
                yield job.chunk([job.choice(item.index, "", item.finish_reason, True)])
            item = await worker.next()
        if job.include_usage:
            yield job.chunk([], _usage(job.prompt_tokens, completion))
        yield "[DONE]"
    finally:
        worker.cancel.set()


# --- the server -----------------------------------------------------------------------


class HttpServer:
    """``app`` under uvicorn in a thread of this process, on a socket bound at
    construction (port 0: a free one, in :attr:`port`): what ``splitfed serve openai``
    runs (splitfed/cli/serve.py ``run_until_signalled``), and tests and benchmarks
    start with :func:`serve_in_thread`."""

    def __init__(
        self,
        app: ASGIApp,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        grace_s: float = 5.0,
        tls_cert: StrPath | None = None,
        tls_key: StrPath | None = None,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("HTTPS needs both a certificate and its key (--tls-cert, --tls-key)")
        self.tls = tls_cert is not None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as exc:
            self.socket.close()
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.socket.listen(128)  # connections wait here until uvicorn accepts them
        self.host = host
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=max(1, int(grace_s)),
            access_log=False,
            ssl_certfile=None if tls_cert is None else str(tls_cert),
            ssl_keyfile=None if tls_key is None else str(tls_key),
        )
        try:
            config.load()  # the certificate and key are read here: errors before serving
        except (OSError, ssl.SSLError) as exc:
            self.socket.close()
            raise ValueError(f"cannot use the TLS certificate {tls_cert} and key: {exc}") from None
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The API's base URL (what ``openai.OpenAI(base_url=...)`` takes)."""
        return f"{'https' if self.tls else 'http'}://{self.address}/v1"

    def start(self) -> HttpServer:
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="openai-http"
        )
        self._thread.start()
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let running requests finish (streams up to the grace period
        given at construction), and wait for the server's thread."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join()
        self.socket.close()

    def __enter__(self) -> HttpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_in_thread(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tls_cert: StrPath | None = None,
    tls_key: StrPath | None = None,
) -> HttpServer:
    """Start ``app`` on ``host:port`` (port 0: a free one) in a thread, HTTPS with
    ``tls_cert`` and ``tls_key``; ``url`` is its base URL, ``stop()`` (or ``with``)
    ends it."""
    return HttpServer(app, host, port, tls_cert=tls_cert, tls_key=tls_key).start()


def wait_ready(server: HttpServer, timeout_s: float = 30.0) -> None:
    """Wait until uvicorn has started (its lifespan ran); connecting works before."""
    deadline = time.monotonic() + timeout_s
    while not server.server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("the HTTP server did not start")
        time.sleep(0.01)
