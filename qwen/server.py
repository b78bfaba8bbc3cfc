"""An OpenAI-compatible HTTP API over a `GenerationEngine`: chat completions (with function calling), completions.

`create_app(engine, settings)` builds the FastAPI app and `serve` runs it under uvicorn; `openai_api.py` only parses
arguments and loads the checkpoint. Generation never runs on the event loop: the engine's thread decodes every request
together and hands events back with `call_soon_threadsafe`. Tokenizing a large prompt runs in a worker thread.

What one client may cost is bounded in `ServerSettings` (body size, body upload time, choices per request), and
abandoned work is cancelled: a client that hangs up, streaming or not, frees its slots at once, and SIGTERM ends every
request before uvicorn waits for connections to close.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import secrets
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any, ContextManager, TypeVar

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette.sse import EventSourceResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import react
from .engine import GenerationEngine, GenerationEvent, SamplingParamError, SamplingParams, chat_stop_token_ids
from .qwen_generation_utils import make_context


T = TypeVar("T")


@dataclass
class ServerSettings:
    """What the server is called, who may use it, and every limit on what one request may cost."""

    model_name: str = "qwen"  # the id /v1/models lists
    # Off (the default), a request may name any model, as the original server allowed: its README's client sends
    # model="Qwen". On, a name other than `model_name` gets 404 model_not_found, as vLLM answers.
    strict_model_name: bool = False
    api_key: str | None = None  # sent by OpenAI SDKs as `Authorization: Bearer KEY`
    api_auth: tuple[str, str] | None = None  # HTTP basic auth, as the original `--api-auth user:pass`
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    cors_allow_credentials: bool = False
    collect_garbage: bool = True  # gc + CUDA cache release whenever the engine goes idle (`--disable-gc` turns off)
    # A body above this gets 413 before any of it is parsed. Qwen's longest context (32k tokens) is a few hundred kB
    # of JSON even as escaped Chinese; 8 MiB leaves room for long conversations that the prompt builder truncates.
    max_request_bytes: int = 8 * 2**20
    # Choices one request may ask for: `n`, times the prompts of a /v1/completions list. Every choice is a queued
    # engine request, served in arrival order: 100 prompts with n=16 once held a 4-token request back for 3 minutes.
    max_choices: int = 16
    # A body that has not fully arrived after this many seconds gets 408, so that slow uploads cannot hold
    # connections (and a stop of the server) forever.
    body_timeout_s: float = 60.0
    # After SIGTERM or SIGINT every request is cancelled at once; connections still open after this many seconds (a
    # body still uploading, a client not reading its reply) are then closed.
    shutdown_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.cors_allow_credentials and "*" in self.cors_origins:
            raise ValueError("CORS credentials cannot be combined with the origin '*'; list the allowed origins.")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("The API key is empty; give a non-empty key, or none to serve without one.")
        if self.api_auth is not None and (len(self.api_auth) != 2 or not all(part for part in self.api_auth)):
            raise ValueError("Basic auth needs a non-empty user and a non-empty password, given as user:password.")
        for name in ("max_request_bytes", "max_choices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("body_timeout_s", "shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0 seconds, got {getattr(self, name)}.")


# The request field behind each SamplingParams field, for the `param` of an error.
REQUEST_FIELD = {"max_new_tokens": "max_tokens"}


class APIError(Exception):
    """An error the client caused, reported in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


SHUTTING_DOWN = "The server is shutting down; send the request again (to another instance, or once it is back)."


class ClientDisconnected(Exception):
    """The client closed its connection before its reply was ready; its engine requests are cancelled."""


# --------------------------------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


# Replies repeat the request's model name in every streamed chunk: a name of megabytes would be serialized once per
# token, on the event loop every stream shares.
MAX_MODEL_NAME_CHARS = 1024


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=MAX_MODEL_NAME_CHARS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)  # the upper bound is ServerSettings.max_choices
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        values = [value] if isinstance(value, str) else value
        if len(values) > 4 or any(not isinstance(v, str) or not v for v in values):
            raise ValueError("stop takes up to 4 non-empty strings")
        return values


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]]
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False


def chat_prompt_ids(
    tokenizer: Any, messages: list[dict[str, Any]], functions: list[dict[str, Any]] | None, max_window_size: int
) -> list[int]:
    """ChatML prompt ids for OpenAI-style messages, with the ReAct transcript when there are functions.

    Raises ValueError for a conversation that cannot be written as a prompt (the message says which entry).
    """
    system, history, query = react.build_react_conversation(messages, functions)
    if query is not None:
        return make_context(tokenizer, query, history=history, system=system, max_window_size=max_window_size)[1]
    # After a tool result (or an assistant message) the model continues the last assistant turn.
    earlier, question, partial = react.continuation_parts(history)
    _, ids = make_context(tokenizer, question, history=earlier, system=system, max_window_size=max_window_size)
    return ids + tokenizer.encode(partial, allowed_special=set(), disallowed_special=())


# --------------------------------------------------------------------------------------------------------------------
# In front of the routes: authentication and the request body
# --------------------------------------------------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


# Before an answer given without reading the body (401, 413), up to this many times max_request_bytes of it are read
# and dropped. Closing a socket that still holds unread bytes makes the kernel send a reset, and a client that writes
# its whole body before reading (httpx, the OpenAI SDKs) then often loses the answer and reports a connection error.
DRAIN_FACTOR = 4


class RequestGate:
    """ASGI middleware: authentication, then the whole request body read under `max_request_bytes` and
    `body_timeout_s`, so that no route ever starts on an oversized or never-ending body.

    The limit holds for a declared Content-Length (refused before a byte is kept) and for chunked bodies without one
    (refused at the first chunk past the limit). Routes get the body as one message; later `receive` calls reach the
    server's own, which is how a route learns that its client hung up (`http.disconnect`).

    A plain ASGI class rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware wraps `receive` and runs
    the route in another task. Starlette's own body limit middleware is recent (absent from versions requirements.txt
    allows) and answers in plain text, not in OpenAI's error shape.
    """

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings
        headers = Headers(scope=scope)
        # A client that waits for `100 Continue` has sent no body yet: there is nothing to drain.
        body_on_its_way = headers.get("expect", "").lower() != "100-continue"
        if scope["method"] != "OPTIONS" and scope["path"].startswith("/v1/") and not _authorized(headers, settings):
            error = APIError(401, "Missing or wrong API key or credentials.", kind="authentication_error",
                             code="invalid_api_key")
            challenge = {"WWW-Authenticate": 'Basic realm="qwen"'} if settings.api_auth is not None else {}
            await self._refuse(error, challenge, body_on_its_way, scope, receive, send)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > settings.max_request_bytes:
            drain = body_on_its_way and int(declared) <= DRAIN_FACTOR * settings.max_request_bytes
            await self._refuse(self._too_large(), {}, drain, scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(self._read_body(receive), settings.body_timeout_s)
        except _BodyTooLarge:
            await self._refuse(self._too_large(), {}, True, scope, receive, send)
            return
        except asyncio.TimeoutError:
            error = APIError(408, f"The request body did not arrive within {settings.body_timeout_s:g} s.",
                             code="request_timeout")
            await error.response({"Connection": "close"})(scope, receive, send)
            return
        if body is None:
            return  # the client left before sending its whole request: nobody to answer

        delivered = False

        async def receive_after_body() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, receive_after_body, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than this server's limit of "
                             f"{self.settings.max_request_bytes} bytes.", code="request_too_large")

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The request's body, or None if the client disconnected first; _BodyTooLarge past the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.settings.max_request_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, error: APIError, headers: dict[str, str], drain: bool, scope: Scope, receive: Receive,
                      send: Send) -> None:
        """Answer `error` and close the connection, after reading and dropping the rest of the body when `drain`
        (up to DRAIN_FACTOR times the limit, within the body timeout)."""
        if drain:
            try:
                await asyncio.wait_for(self._drain(receive), self.settings.body_timeout_s)
            except asyncio.TimeoutError:
                pass  # a body too slow to wait for: answer anyway
        await error.response({**headers, "Connection": "close"})(scope, receive, send)

    async def _drain(self, receive: Receive) -> None:
        size = 0
        while size <= DRAIN_FACTOR * self.settings.max_request_bytes:
            message = await receive()
            size += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return


# --------------------------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------------------------

# Bodies below this size are tokenized on the event loop (well under a millisecond); larger ones in a worker thread,
# so that /health and every stream keep being served meanwhile (a 100 MB prompt once froze the loop for 3.6 s).
INLINE_PROMPT_BYTES = 64 * 1024


class OpenStreams:
    """How many streamed replies are still being sent. Changed on the event loop only; `serve`'s stop thread reads
    it."""

    def __init__(self) -> None:
        self.count = 0


def create_app(engine: GenerationEngine, settings: ServerSettings | None = None) -> FastAPI:
    """The HTTP app serving `engine`'s model under `settings.model_name`; `app.state.open_streams` (OpenStreams)
    counts the streams being sent."""
    settings = settings or ServerSettings()
    tokenizer = engine.tokenizer
    generation_config = engine.model.generation_config
    stop_token_ids = chat_stop_token_ids(tokenizer)
    app = FastAPI(title="Qwen OpenAI-compatible API")  # /docs and /redoc describe the API, as the original's did
    app.add_middleware(RequestGate, settings=settings)
    # Added last, so outermost: preflights are answered before authentication, and errors the gate returns (401,
    # 413) carry the CORS headers a browser needs to read them.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials=settings.cors_allow_credentials,
        allow_methods=["*"],
        allow_headers=["*"],
    )

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":  # its location is a character offset, not a field
            return APIError(400, "The request body is not valid JSON.").response()
        return APIError(400, message, param=".".join(where) or None).response()

    @app.exception_handler(ClientDisconnected)
    async def _client_disconnected(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody is left to read it

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail), kind="invalid_request_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "qwen"}
        return {"object": "list", "data": [card]}

    def reply_model(name: str | None) -> str:
        """The model name a reply reports: the one the request gave (as the original server and vLLM report it), else
        `settings.model_name`. With `strict_model_name`, any other name than that gets 404."""
        if not name:
            return settings.model_name
        if settings.strict_model_name and name != settings.model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {settings.model_name!r}.",
                           param="model", code="model_not_found")
        return name

    def check_choices(count: int, param: str) -> None:
        if count > settings.max_choices:
            raise APIError(400, f"This request asks for {count} choices (n times the prompts); this server gives at "
                                f"most {settings.max_choices} per request.", param=param)

    def sampling(body: SamplingFields, prompt_tokens: int, extra_stops: list[str]) -> SamplingParams:
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        room = engine.max_context - prompt_tokens
        if room <= 0:
            raise APIError(400, f"The prompt has {prompt_tokens} tokens, more than this model's context of "
                                f"{engine.max_context}.", param="messages", code="context_length_exceeded")
        if limit is not None and limit <= 0:
            raise APIError(400, "max_tokens must be at least 1.", param="max_tokens")
        if limit is not None and limit > room:
            raise APIError(400, f"max_tokens={limit} plus the prompt's {prompt_tokens} tokens exceeds this model's "
                                f"context of {engine.max_context}.", param="max_tokens",
                           code="context_length_exceeded")
        default_max = getattr(generation_config, "max_new_tokens", None) or 512
        try:
            return SamplingParams.from_generation_config(
                generation_config,
                max_new_tokens=limit if limit is not None else min(default_max, room),
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                repetition_penalty=body.repetition_penalty,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                seed=body.seed,
                stop_token_ids=stop_token_ids,
                stop_strings=tuple(body.stop or ()) + tuple(extra_stops),
            )
        except SamplingParamError as error:
            raise APIError(400, str(error), param=REQUEST_FIELD.get(error.field, error.field)) from error

    if settings.collect_garbage:
        # A full collection walks every tracked object: with the model, tokenizer and libraries loaded that took
        # 0.4 s on a CPU, holding the event loop (and every other stream) each time the server went idle. What exists
        # now lives as long as the server, so it is frozen out of collection; only objects requests made are walked.
        gc.freeze()

    def after_request() -> None:
        if settings.collect_garbage and engine.running == 0:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    open_streams = OpenStreams()

    @contextlib.contextmanager
    def streaming() -> Iterator[None]:
        """Around a stream's generator, once it runs: counted in `open_streams`, then the clean-up of a request."""
        open_streams.count += 1
        try:
            yield
        finally:
            open_streams.count -= 1
            after_request()

    async def off_loop_if_large(request: Request, work: Callable[[], T]) -> T:
        if len(await request.body()) < INLINE_PROMPT_BYTES:  # the body FastAPI already read, cached
            return work()
        return await asyncio.to_thread(work)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = reply_model(body.model)
        check_choices(body.n, "n")
        try:
            functions = react.normalize_tools(body.functions, body.tools, body.tool_choice, body.function_call)
        except ValueError as error:
            raise APIError(400, str(error), param="tools" if body.tools is not None else "functions") from error
        max_window = min(getattr(generation_config, "max_window_size", None) or engine.max_context, engine.max_context)
        try:
            prompt_ids = await off_loop_if_large(
                request, lambda: chat_prompt_ids(tokenizer, body.messages, functions, max_window))
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from error
        params = sampling(body, len(prompt_ids), react.stop_words(functions))
        legacy = body.functions is not None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        seeds = [_choice_seed(params.seed, i) for i in range(body.n)]
        choices_params = [_with_seed(params, seed) for seed in seeds]

        if body.stream:
            return EventSourceResponse(
                _stream_chat(engine, prompt_ids, choices_params, functions, legacy, completion_id, created,
                             model, body.stream_options, streaming),
                ping=15,
            )
        try:
            results = await _unless_disconnected(
                request, asyncio.gather(*[_run_to_end(engine, prompt_ids, p) for p in choices_params]))
        finally:
            after_request()
        choices, completion_tokens = [], 0
        for index, (text, event) in enumerate(results):
            if (error := _engine_error(event)) is not None:
                raise error
            completion_tokens += event.completion_tokens
            message, finish_reason = _chat_message(text, event.finish_reason, functions, legacy)
            choices.append({"index": index, "message": message, "finish_reason": finish_reason, "logprobs": None})
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": _usage(len(prompt_ids), completion_tokens),
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        model = reply_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or list of strings.", param="prompt")
        if body.stream and len(prompts) > 1:
            raise APIError(400, "Streaming takes a single prompt.", param="prompt")
        check_choices(len(prompts) * body.n, "n" if body.n > 1 else "prompt")
        encoded = await off_loop_if_large(
            request, lambda: [tokenizer.encode(p, allowed_special=set(), disallowed_special=()) for p in prompts])
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        jobs = []
        for ids in encoded:
            params = sampling(body, len(ids), [])
            for i in range(body.n):
                jobs.append((ids, _with_seed(params, _choice_seed(params.seed, i))))
        if body.stream:
            ids, params = jobs[0]
            return EventSourceResponse(
                _stream_completion(engine, ids, [p for _, p in jobs], completion_id, created, model,
                                   body.stream_options, prompts[0] if body.echo else "", streaming),
                ping=15,
            )
        try:
            results = await _unless_disconnected(
                request, asyncio.gather(*[_run_to_end(engine, ids, p) for ids, p in jobs]))
        finally:
            after_request()
        choices, completion_tokens = [], 0
        for index, ((text, event), (ids, _)) in enumerate(zip(results, jobs)):
            if (error := _engine_error(event)) is not None:
                raise error
            completion_tokens += event.completion_tokens
            prefix = prompts[index // body.n] if body.echo else ""
            choices.append({"index": index, "text": prefix + text, "finish_reason": _finish(event.finish_reason),
                            "logprobs": None})
        prompt_tokens = sum(len(ids) for ids in encoded)
        return {
            "id": completion_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": _usage(prompt_tokens, completion_tokens),
        }

    app.state.engine = engine
    app.state.settings = settings
    app.state.open_streams = open_streams
    return app


# --------------------------------------------------------------------------------------------------------------------
# Engine <-> asyncio
# --------------------------------------------------------------------------------------------------------------------


def _choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed when a request asks for several: the request's seed plus the index, modulo 2**64 as
    torch's generators read seeds, so that a seed at the top of the range still gives n distinct streams."""
    return None if seed is None else (seed + index) % 2**64


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    return replace(params, seed=seed)


async def _events(engine: GenerationEngine, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationEvent]:
    """The engine's events for one request, as an async iterator; leaving early cancels the request."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
    try:
        handle = engine.submit(prompt_ids, params, on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
    except ValueError as error:
        raise APIError(400, str(error), param="messages", code="context_length_exceeded") from error
    except RuntimeError as error:  # the engine is shut down
        raise APIError(503, SHUTTING_DOWN, kind="server_error") from error
    try:
        while True:
            event = await events.get()
            yield event
            if event.finish_reason is not None:
                return
    finally:
        handle.cancel()  # a no-op once finished; frees the slot when the client went away


async def _run_to_end(engine: GenerationEngine, prompt_ids: list[int], params: SamplingParams) -> tuple[str, GenerationEvent]:
    text = ""
    async for event in _events(engine, prompt_ids, params):
        text += event.text
        if event.finish_reason is not None:
            return text, event
    raise RuntimeError("the engine ended a request without a final event")


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; or, as soon as the client hangs up first, ClientDisconnected with `work` cancelled (which
    cancels its engine requests, freeing their slots or their places in the queue).

    A stream learns of a hang-up from sse-starlette, which cancels its generator; a plain reply has to listen itself.
    The request's body is read by then, so the next ASGI message is the disconnect.
    """
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait((task, listener), return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        task.cancel()  # a no-op when it finished
    if task.done() and not task.cancelled():
        return task.result()
    await asyncio.gather(task, return_exceptions=True)  # its `finally`s cancel the engine requests
    raise ClientDisconnected


def _engine_error(event: GenerationEvent) -> APIError | None:
    """The error a request's last event stands for, if any."""
    if event.finish_reason == "error":
        return APIError(500, f"Generation failed: {event.error}", kind="server_error")
    if event.finish_reason == "cancelled":  # only the engine's shutdown cancels a request whose client is still here
        return APIError(503, SHUTTING_DOWN, kind="server_error")
    return None


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _chat_message(text: str, reason: str | None, functions: list[dict] | None, legacy: bool) -> tuple[dict, str]:
    """The assistant message and finish reason for a finished reply, tool calls parsed out of ReAct text."""
    if not functions:
        return {"role": "assistant", "content": text}, _finish(reason)
    parsed = react.parse_react_output(text)
    if parsed.function_name is None:
        return {"role": "assistant", "content": parsed.content}, _finish(reason)
    call = {"name": parsed.function_name, "arguments": parsed.arguments}
    if legacy:
        return {"role": "assistant", "content": parsed.content, "function_call": call}, "function_call"
    tool_call = {"id": react.new_tool_call_id(), "type": "function", "function": call}
    return {"role": "assistant", "content": parsed.content, "tool_calls": [tool_call]}, "tool_calls"


def _chunk(kind: str, completion_id: str, created: int, model: str, choices: list[dict], usage: dict | None = None) -> str:
    chunk = {"id": completion_id, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return json.dumps(chunk, ensure_ascii=False)


async def _merge(streams: list[AsyncIterator[GenerationEvent]]) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Events of several requests as they come, tagged with the request's index."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, GenerationEvent | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[GenerationEvent]) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, event = await queue.get()
            if event is None:
                remaining -= 1
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()


async def _stream_chat(engine, prompt_ids, choice_params, functions, legacy, completion_id, created, model,
                       stream_options, streaming: Callable[[], ContextManager[None]]) -> AsyncIterator[str]:
    parsers = [react.ReActStreamParser() if functions else None for _ in choice_params]
    completion_tokens = 0
    with streaming():  # counted while open (see `serve`); the idle clean-up after it
        try:
            for index in range(len(choice_params)):
                yield _chunk("chat.completion.chunk", completion_id, created, model,
                             [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            streams = [_events(engine, prompt_ids, p) for p in choice_params]
            async for index, event in _merge(streams):
                parser = parsers[index]
                deltas: list[dict] = []
                called = False
                if parser is None:
                    if event.text:
                        deltas.append({"content": event.text})
                else:
                    events = parser.feed(event.text) if event.text else []
                    if event.finish_reason is not None:
                        events += parser.finish()
                    for item in events:
                        delta, is_call = _stream_delta(item, legacy)
                        deltas.append(delta)
                        called = called or is_call
                for delta in deltas:
                    yield _chunk("chat.completion.chunk", completion_id, created, model,
                                 [{"index": index, "delta": delta, "finish_reason": None}])
                if event.finish_reason is not None:
                    if (error := _engine_error(event)) is not None:  # the stream's status was sent: an error event
                        yield json.dumps(error.body())
                        return
                    completion_tokens += event.completion_tokens
                    reason = ("function_call" if legacy else "tool_calls") if (called or (parser and parser.called)) \
                        else _finish(event.finish_reason)
                    yield _chunk("chat.completion.chunk", completion_id, created, model,
                                 [{"index": index, "delta": {}, "finish_reason": reason}])
            if stream_options is not None and stream_options.include_usage:
                yield _chunk("chat.completion.chunk", completion_id, created, model, [],
                             usage=_usage(len(prompt_ids), completion_tokens))
            yield "[DONE]"
        except APIError as error:  # the engine refused the request (shut down) after the stream's status was sent
            yield json.dumps(error.body())


def _stream_delta(item: Any, legacy: bool) -> tuple[dict, bool]:
    """One ReAct stream event as an OpenAI delta: content text, or a whole function/tool call."""
    if item.kind == "content":
        return {"content": item.text}, False
    call = {"name": item.name, "arguments": item.arguments}
    if legacy:
        return {"function_call": call}, True
    return {"tool_calls": [{"index": 0, "id": react.new_tool_call_id(), "type": "function", "function": call}]}, True


async def _stream_completion(engine, prompt_ids, choice_params, completion_id, created, model, stream_options,
                             echo: str, streaming: Callable[[], ContextManager[None]]) -> AsyncIterator[str]:
    completion_tokens = 0
    with streaming():  # counted while open (see `serve`); the idle clean-up after it
        try:
            if echo:
                for index in range(len(choice_params)):
                    yield _chunk("text_completion", completion_id, created, model,
                                 [{"index": index, "text": echo, "finish_reason": None, "logprobs": None}])
            async for index, event in _merge([_events(engine, prompt_ids, p) for p in choice_params]):
                finish = None
                if event.finish_reason is not None:
                    if (error := _engine_error(event)) is not None:  # the stream's status was sent: an error event
                        yield json.dumps(error.body())
                        return
                    completion_tokens += event.completion_tokens
                    finish = _finish(event.finish_reason)
                if event.text or finish:
                    yield _chunk("text_completion", completion_id, created, model,
                                 [{"index": index, "text": event.text, "finish_reason": finish, "logprobs": None}])
            if stream_options is not None and stream_options.include_usage:
                yield _chunk("text_completion", completion_id, created, model, [],
                             usage=_usage(len(prompt_ids), completion_tokens))
            yield "[DONE]"
        except APIError as error:  # the engine refused the request (shut down) after the stream's status was sent
            yield json.dumps(error.body())


def _authorized(headers: Headers, settings: ServerSettings) -> bool:
    if settings.api_key is None and settings.api_auth is None:
        return True
    header = headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if settings.api_key is not None and scheme.lower() == "bearer":
        return secrets.compare_digest(credentials.strip(), settings.api_key)
    if settings.api_auth is not None and scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(credentials.strip()).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return secrets.compare_digest(user, settings.api_auth[0]) & secrets.compare_digest(password, settings.api_auth[1])
    return False


# --------------------------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------------------------


class _EngineStoppingServer(uvicorn.Server):
    """uvicorn's server, shutting the engine down as soon as a stop signal arrives. On its own uvicorn would wait for
    every request in flight to finish generating (minutes, for long replies and abandoned queues) before stopping.

    uvicorn itself hears of the stop only once every stream has sent the error event that tells its client why it
    ends (or after `wait_s`): sse-starlette ends all streams at once when uvicorn begins its shutdown, and under load
    that cut streams off before their last event, leaving clients with a reply that just stops.
    """

    def __init__(self, config: uvicorn.Config, engine: GenerationEngine, open_streams: OpenStreams,
                 wait_s: float) -> None:
        super().__init__(config)
        self._engine, self._open_streams, self._wait_s = engine, open_streams, wait_s
        self._stopping = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._stopping:  # a second signal (a second Ctrl+C forces uvicorn's exit) or uvicorn's own repeat
            super().handle_exit(sig, frame)
            return
        self._stopping = True
        self._engine.shutdown()  # sets flags only: safe inside a signal handler
        threading.Thread(target=self._stop_once_streams_end, args=(sig, frame), daemon=True).start()

    def _stop_once_streams_end(self, sig: int, frame: FrameType | None) -> None:
        deadline = time.monotonic() + self._wait_s
        while self._open_streams.count and time.monotonic() < deadline:
            time.sleep(0.02)
        super().handle_exit(sig, frame)  # sets uvicorn's flags, which its loop polls


def serve(engine: GenerationEngine, settings: ServerSettings, host: str, port: int) -> None:
    """Serve `engine` on host:port until SIGTERM or SIGINT (Ctrl+C), then stop within seconds and return.

    The signal ends every queued and running request at once: a waiting client gets a 503 error (an error event, in a
    stream), which OpenAI SDKs retry. uvicorn then waits up to `settings.shutdown_timeout_s` for connections still
    open before closing them. The engine is left to the caller to close.
    """
    app = create_app(engine, settings)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=settings.shutdown_timeout_s)
    server = _EngineStoppingServer(config, engine, app.state.open_streams, settings.shutdown_timeout_s)
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        server.run()
        return
    # Once shut down, uvicorn restores the handlers it found and raises the stop signal again, so that the process
    # dies of it. A stop that was asked for and completed is a clean exit (status 0, as systemd and Docker expect), so
    # the handler it finds is the server's own, which absorbs that repeat; a signal arriving before uvicorn installs
    # its handlers stops the server too.
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in stop_signals}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["APIError", "RequestGate", "ServerSettings", "chat_prompt_ids", "create_app", "serve"]
