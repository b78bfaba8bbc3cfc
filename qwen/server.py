"""An OpenAI-compatible HTTP API over a `GenerationEngine`: chat completions (with function calling), completions.

`create_app(engine, settings)` builds the FastAPI app and `serve` runs it under uvicorn; `openai_api.py` only parses
arguments and loads the checkpoint. Generation never runs on the event loop: the engine's thread decodes every request
together and hands events back with `call_soon_threadsafe`. Tokenizing a large prompt runs in a worker thread.

As in vLLM's serving layer, requests and replies are pydantic models (below: request bodies, then response bodies);
a route checks its request and settles a `RequestContext`, `fan_out` submits the request's choices (`n` per prompt,
seeded one apart), and a `Serving` subclass per endpoint turns their events into chunks or one whole reply.

What one client may cost is bounded in `ServerSettings` (body size, body upload time, choices per request), and
abandoned work is cancelled: a client that hangs up, streaming or not, frees its slots at once, and SIGTERM ends every
request before uvicorn waits for connections to close.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import gc
import secrets
import signal
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any, ClassVar, ContextManager, Literal, TypeVar

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer
from sse_starlette.sse import EventSourceResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import react
from .chat_turn import (ChatTurn, SamplingParamError, SamplingParams, chat_stop_token_ids, messages_turn,
                        reply_budget, wanted_new_tokens)
from .engine import GenerationEngine, GenerationEvent, RequestHandle


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

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.kind, param=self.param, code=self.code))

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body().model_dump(mode="json"), status_code=self.status, headers=headers)


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


# --------------------------------------------------------------------------------------------------------------------
# Response bodies: what goes on the wire, field for field, as OpenAI's API sends it
# --------------------------------------------------------------------------------------------------------------------


class ResponseModel(BaseModel):
    """A reply body. Unknown fields are refused, so that validating a reply against its model checks every field.

    OpenAI leaves some fields out of a reply when they do not apply (a message's `function_call`, a chunk's `usage`)
    and sends others as null (`logprobs`); the names in `omitted_when_none` are left out when None. (Pydantic's own
    per-field rule for that is newer than the versions requirements.txt allows.)
    """

    model_config = ConfigDict(extra="forbid")
    omitted_when_none: ClassVar[frozenset[str]] = frozenset()

    # No return annotation: with one, the serialization schema (and /docs) would show a bare dict.
    @model_serializer(mode="wrap")
    def _leave_out_absent(self, handler: SerializerFunctionWrapHandler):
        data = handler(self)
        for name in self.omitted_when_none:
            if name in data and data[name] is None:
                del data[name]
        return data


class UsageInfo(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class FunctionCall(ResponseModel):
    name: str
    arguments: str  # the JSON text the model wrote, as OpenAI sends it: not parsed, possibly not valid JSON


class ToolCall(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(ToolCall):
    index: int  # which of the reply's calls this piece belongs to; a ReAct reply makes one call, sent whole


# Why a choice ended: `function_call` answers a request that gave `functions`, `tool_calls` one that gave `tools`.
ChatFinishReason = Literal["stop", "length", "function_call", "tool_calls"]
CompletionFinishReason = Literal["stop", "length"]


class ChatMessage(ResponseModel):
    omitted_when_none = frozenset({"function_call", "tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: str | None  # null only beside a call that came without a thought
    function_call: FunctionCall | None = None
    tool_calls: list[ToolCall] | None = None


class ChatCompletionChoice(ResponseModel):
    index: int
    message: ChatMessage
    finish_reason: ChatFinishReason
    logprobs: None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(ResponseModel):
    """What a chunk adds to a choice's message: the role once, then content pieces, or a whole call."""

    omitted_when_none = frozenset({"role", "content", "function_call", "tool_calls"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    function_call: FunctionCall | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    finish_reason: ChatFinishReason | None = None


class ChatCompletionChunk(ResponseModel):
    omitted_when_none = frozenset({"usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]  # empty in the usage chunk
    usage: UsageInfo | None = None  # only in the last chunk, when stream_options.include_usage asks for it


class CompletionStreamChoice(ResponseModel):
    index: int
    text: str
    finish_reason: CompletionFinishReason | None = None
    logprobs: None = None


class CompletionChoice(CompletionStreamChoice):
    finish_reason: CompletionFinishReason


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(ResponseModel):
    omitted_when_none = frozenset({"usage"})

    id: str
    object: Literal["text_completion"] = "text_completion"  # as OpenAI names its completion chunks
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "qwen"


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthStatus(ResponseModel):
    status: Literal["ok"] = "ok"
    running: int  # requests being decoded
    waiting: int  # requests queued for a slot


class ErrorInfo(ResponseModel):
    message: str
    type: str  # invalid_request_error, authentication_error, server_error
    param: str | None = None  # the request field at fault
    code: str | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


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
    async def health() -> HealthStatus:
        return HealthStatus(running=engine.running, waiting=engine.waiting)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.model_name)])

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

    def requested_tokens(body: SamplingFields) -> int | None:
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if limit is not None and limit <= 0:
            raise APIError(400, "max_tokens must be at least 1.", param="max_tokens")
        return limit

    def check_room(limit: int | None, prompt_tokens: int, param: str) -> None:
        """A prompt that fills the context, or a max_tokens the context cannot hold, is the client's error (400), as
        OpenAI's API has it; without max_tokens the reply takes what the context has left."""
        room = engine.max_context - prompt_tokens
        if room <= 0:
            raise APIError(400, f"The prompt has {prompt_tokens} tokens, more than this model's context of "
                                f"{engine.max_context}.", param=param, code="context_length_exceeded")
        if limit is not None and limit > room:
            raise APIError(400, f"max_tokens={limit} plus the prompt's {prompt_tokens} tokens exceeds this model's "
                                f"context of {engine.max_context}.", param="max_tokens",
                           code="context_length_exceeded")

    def sampling_overrides(body: SamplingFields) -> dict[str, Any]:
        return {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                "repetition_penalty": body.repetition_penalty, "presence_penalty": body.presence_penalty,
                "frequency_penalty": body.frequency_penalty, "seed": body.seed}

    def checked_sampling(make: Callable[[], SamplingParams]) -> SamplingParams:
        try:
            return make()
        except SamplingParamError as error:
            raise APIError(400, str(error), param=REQUEST_FIELD.get(error.field, error.field)) from error

    def completion_sampling(body: CompletionRequest, prompt_tokens: int) -> SamplingParams:
        """A raw completion is not a chat turn: the chat stop ids and the request's stops, the reply's budget as a
        turn's (`reply_budget`)."""
        limit = requested_tokens(body)
        check_room(limit, prompt_tokens, "prompt")
        budget = reply_budget(wanted_new_tokens(limit, generation_config), prompt_tokens, engine.max_context)
        return checked_sampling(lambda: SamplingParams.from_generation_config(
            generation_config, **sampling_overrides(body), max_new_tokens=budget, stop_token_ids=stop_token_ids,
            stop_strings=tuple(body.stop or ())))

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

    def new_context(prompts: list[PromptJob], body: SamplingFields, id_prefix: str, model: str,
                    turn: ChatTurn | None = None, legacy_functions: bool = False) -> RequestContext:
        return RequestContext(
            engine=engine, prompts=prompts, n=body.n, completion_id=f"{id_prefix}-{uuid.uuid4().hex}",
            created=int(time.time()), model=model,
            include_usage=body.stream_options is not None and body.stream_options.include_usage,
            streaming=streaming, turn=turn, legacy_functions=legacy_functions,
        )

    async def reply(serving: Serving, stream: bool, request: Request) -> Response:
        if stream:
            return EventSourceResponse(serving.stream(), ping=15)
        try:
            response = await _unless_disconnected(request, serving.whole())
        finally:
            after_request()
        return JSONResponse(response.model_dump(mode="json"))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        model = reply_model(body.model)
        check_choices(body.n, "n")
        try:
            functions = react.normalize_tools(body.functions, body.tools, body.tool_choice, body.function_call)
        except ValueError as error:
            raise APIError(400, str(error), param="tools" if body.tools is not None else "functions") from error
        limit = requested_tokens(body)
        try:
            # The library's chat turn, as every front end builds it: the window policy, the reply's budget, the
            # stops (with tools, where a tool's result would begin) and the ReAct parser.
            turn = await off_loop_if_large(request, lambda: messages_turn(
                tokenizer, body.messages, functions, generation_config, engine.max_context, max_new_tokens=limit,
                stop_strings=body.stop or ()))
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from error
        check_room(limit, len(turn.prompt_ids), "messages")
        params = checked_sampling(lambda: turn.sampling_params(**sampling_overrides(body)))
        context = new_context([PromptJob(turn.prompt_ids, params)], body, "chatcmpl", model, turn=turn,
                              legacy_functions=body.functions is not None)
        return await reply(ChatServing(context), body.stream, request)

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        model = reply_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or list of strings.", param="prompt")
        if body.stream and len(prompts) > 1:
            raise APIError(400, "Streaming takes a single prompt.", param="prompt")
        check_choices(len(prompts) * body.n, "n" if body.n > 1 else "prompt")
        encoded = await off_loop_if_large(
            request, lambda: [tokenizer.encode(p, allowed_special=set(), disallowed_special=()) for p in prompts])
        jobs = [PromptJob(ids, completion_sampling(body, len(ids)), echo=text if body.echo else "")
                for ids, text in zip(encoded, prompts)]
        return await reply(CompletionServing(new_context(jobs, body, "cmpl", model)), body.stream, request)

    app.state.engine = engine
    app.state.settings = settings
    app.state.open_streams = open_streams
    return app


# --------------------------------------------------------------------------------------------------------------------
# Serving: one request's choices, from the engine to the reply
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptJob:
    """One prompt of a request and how to decode it; each of the request's `n` choices decodes it once."""

    ids: list[int]
    params: SamplingParams
    echo: str = ""  # completions asked to echo: the prompt's text, sent before each of its choices' text


@dataclass(frozen=True)
class RequestContext:
    """Everything a reply is made from, settled before the engine sees the request.

    Choice `i` decodes prompt `i // n` with seed `_choice_seed(seed, i % n)`: a chat request has one prompt, a
    completion request one or more (one, when streamed).
    """

    engine: GenerationEngine
    prompts: list[PromptJob]
    n: int  # choices per prompt
    completion_id: str
    created: int  # Unix time, the same in every chunk
    model: str  # the name the reply reports
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts
    streaming: Callable[[], ContextManager[None]]  # held open while a stream is being sent (see `create_app`)
    turn: ChatTurn | None = None  # chat: the turn answered (with tools, it gives each choice its ReAct parser)
    legacy_functions: bool = False  # chat: the request gave `functions`, so calls come back as `function_call`

    @property
    def choice_count(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(prompt.ids) for prompt in self.prompts)

    def prompt_of(self, index: int) -> PromptJob:
        return self.prompts[index // self.n]

    def choice_params(self, index: int) -> SamplingParams:
        params = self.prompt_of(index).params
        return replace(params, seed=_choice_seed(params.seed, index % self.n))


def _choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed when a request asks for several: the request's seed plus the index, modulo 2**64 as
    torch's generators read seeds, so that a seed at the top of the range still gives n distinct streams."""
    return None if seed is None else (seed + index) % 2**64


async def fan_out(context: RequestContext) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Submit every choice of the request to the engine and yield `(choice index, event)` in the order the engine
    produces them, until every choice has had its last event. Leaving early (an error, a client gone, the generator
    closed) cancels every choice, freeing its slot or its place in the queue."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, GenerationEvent]] = asyncio.Queue()
    handles: list[RequestHandle] = []
    try:
        for index in range(context.choice_count):
            deliver = functools.partial(_deliver, loop, events, index)
            try:
                handles.append(context.engine.submit(context.prompt_of(index).ids, context.choice_params(index),
                                                     on_event=deliver))
            except ValueError as error:
                raise APIError(400, str(error), param="messages", code="context_length_exceeded") from error
            except RuntimeError as error:  # the engine is shut down
                raise APIError(503, SHUTTING_DOWN, kind="server_error") from error
        unfinished = len(handles)
        while unfinished:
            index, event = await events.get()
            if event.finish_reason is not None:
                unfinished -= 1
            yield index, event
    finally:
        for handle in handles:
            handle.cancel()  # a no-op once finished


def _deliver(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[tuple[int, GenerationEvent]], index: int,
             event: GenerationEvent) -> None:
    """Runs on the engine's thread: hands one choice's event to the event loop."""
    loop.call_soon_threadsafe(events.put_nowait, (index, event))


def _engine_error(event: GenerationEvent) -> APIError | None:
    """The error a request's last event stands for, if any."""
    if event.finish_reason == "error":
        return APIError(500, f"Generation failed: {event.error}", kind="server_error")
    if event.finish_reason == "cancelled":  # only the engine's shutdown cancels a request whose client is still here
        return APIError(503, SHUTTING_DOWN, kind="server_error")
    return None


def _finish(reason: str | None) -> CompletionFinishReason:
    return "length" if reason == "length" else "stop"


class Serving(ABC):
    """One endpoint's replies to one request: the events `fan_out` yields become a stream of chunks or one whole
    response. Subclasses say only how events become chunks and choices."""

    def __init__(self, context: RequestContext) -> None:
        self.context = context

    @abstractmethod
    def opening_chunks(self) -> list[ResponseModel]:
        """Chunks sent before any generated text."""

    @abstractmethod
    def event_chunks(self, index: int, event: GenerationEvent) -> list[ResponseModel]:
        """The chunks for one event of choice `index` (its last one, finished without error, included)."""

    @abstractmethod
    def usage_chunk(self, usage: UsageInfo) -> ResponseModel:
        """The last chunk, when the request asked for usage."""

    @abstractmethod
    def response(self, texts: list[str], finals: list[GenerationEvent], usage: UsageInfo) -> ResponseModel:
        """The whole reply, from each choice's text and last event."""

    async def stream(self) -> AsyncIterator[str]:
        """The reply as server-sent event data: chunks, then `[DONE]`; or an error event once the status is sent."""
        context = self.context
        completion_tokens = 0
        with context.streaming():
            try:
                for chunk in self.opening_chunks():
                    yield chunk.model_dump_json()
                async with contextlib.aclosing(fan_out(context)) as events:
                    async for index, event in events:
                        if event.finish_reason is not None:
                            if (error := _engine_error(event)) is not None:
                                yield error.body().model_dump_json()
                                return
                            completion_tokens += event.completion_tokens
                        for chunk in self.event_chunks(index, event):
                            yield chunk.model_dump_json()
                if context.include_usage:
                    yield self.usage_chunk(UsageInfo.of(context.prompt_tokens, completion_tokens)).model_dump_json()
                yield "[DONE]"
            except APIError as error:  # the engine refused the request (shut down) after the stream's status was sent
                yield error.body().model_dump_json()

    async def whole(self) -> ResponseModel:
        """The reply once every choice has finished; APIError at the first choice that failed."""
        count = self.context.choice_count
        pieces: list[list[str]] = [[] for _ in range(count)]
        finals: list[GenerationEvent | None] = [None] * count
        async with contextlib.aclosing(fan_out(self.context)) as events:
            async for index, event in events:
                pieces[index].append(event.text)
                if event.finish_reason is not None:
                    if (error := _engine_error(event)) is not None:
                        raise error
                    finals[index] = event
        done = [final for final in finals if final is not None]
        if len(done) != count:  # fan_out ends only once every choice has had its last event
            raise RuntimeError("the engine ended a request without a final event")
        usage = UsageInfo.of(self.context.prompt_tokens, sum(final.completion_tokens for final in done))
        return self.response(["".join(parts) for parts in pieces], done, usage)


class ChatServing(Serving):
    """/v1/chat/completions: text becomes message content; with functions, the ReAct text is parsed into a call."""

    def __init__(self, context: RequestContext) -> None:
        super().__init__(context)
        self._parsers = [context.turn.reply_parser() if context.turn is not None else None
                         for _ in range(context.choice_count)]

    def _chunk(self, choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        context = self.context
        return ChatCompletionChunk(id=context.completion_id, created=context.created, model=context.model,
                                   choices=choices, usage=usage)

    def _call_finish(self) -> ChatFinishReason:
        return "function_call" if self.context.legacy_functions else "tool_calls"

    def opening_chunks(self) -> list[ResponseModel]:
        return [self._chunk([ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
                for index in range(self.context.choice_count)]

    def event_chunks(self, index: int, event: GenerationEvent) -> list[ResponseModel]:
        parser = self._parsers[index]
        if parser is None:
            deltas = [DeltaMessage(content=event.text)] if event.text else []
        else:
            items = parser.feed(event.text) if event.text else []
            if event.finish_reason is not None:
                items += parser.finish()
            deltas = [self._delta(item) for item in items]
        chunks: list[ResponseModel] = [self._chunk([ChatCompletionStreamChoice(index=index, delta=delta)])
                                       for delta in deltas]
        if event.finish_reason is not None:
            reason = self._call_finish() if parser is not None and parser.called else _finish(event.finish_reason)
            chunks.append(self._chunk([ChatCompletionStreamChoice(index=index, delta=DeltaMessage(),
                                                                  finish_reason=reason)]))
        return chunks

    def _delta(self, item: react.StreamEvent) -> DeltaMessage:
        """One ReAct stream event as a delta: content text, or a whole function/tool call."""
        if item.kind == "content":
            return DeltaMessage(content=item.text)
        call = FunctionCall(name=item.name, arguments=item.arguments)
        if self.context.legacy_functions:
            return DeltaMessage(function_call=call)
        return DeltaMessage(tool_calls=[DeltaToolCall(index=0, id=react.new_tool_call_id(), function=call)])

    def usage_chunk(self, usage: UsageInfo) -> ResponseModel:
        return self._chunk([], usage=usage)

    def response(self, texts: list[str], finals: list[GenerationEvent], usage: UsageInfo) -> ResponseModel:
        choices = [self._choice(index, text, final.finish_reason)
                   for index, (text, final) in enumerate(zip(texts, finals))]
        context = self.context
        return ChatCompletionResponse(id=context.completion_id, created=context.created, model=context.model,
                                      choices=choices, usage=usage)

    def _choice(self, index: int, text: str, reason: str | None) -> ChatCompletionChoice:
        """A finished choice's message, with the call parsed out of ReAct text when there are functions."""
        if self.context.turn is None or not self.context.turn.uses_tools:
            return ChatCompletionChoice(index=index, message=ChatMessage(content=text), finish_reason=_finish(reason))
        parsed = react.parse_react_output(text)
        if parsed.function_name is None:
            return ChatCompletionChoice(index=index, message=ChatMessage(content=parsed.content),
                                        finish_reason=_finish(reason))
        call = FunctionCall(name=parsed.function_name, arguments=parsed.arguments)
        if self.context.legacy_functions:
            message = ChatMessage(content=parsed.content, function_call=call)
        else:
            call_id = react.new_tool_call_id()
            message = ChatMessage(content=parsed.content, tool_calls=[ToolCall(id=call_id, function=call)])
        return ChatCompletionChoice(index=index, message=message, finish_reason=self._call_finish())


class CompletionServing(Serving):
    """/v1/completions: text is sent as it comes, after the prompt when the request asked for an echo."""

    def _chunk(self, choices: list[CompletionStreamChoice], usage: UsageInfo | None = None) -> CompletionChunk:
        context = self.context
        return CompletionChunk(id=context.completion_id, created=context.created, model=context.model,
                               choices=choices, usage=usage)

    def opening_chunks(self) -> list[ResponseModel]:
        return [self._chunk([CompletionStreamChoice(index=index, text=self.context.prompt_of(index).echo)])
                for index in range(self.context.choice_count) if self.context.prompt_of(index).echo]

    def event_chunks(self, index: int, event: GenerationEvent) -> list[ResponseModel]:
        finish = None if event.finish_reason is None else _finish(event.finish_reason)
        if not event.text and finish is None:
            return []
        return [self._chunk([CompletionStreamChoice(index=index, text=event.text, finish_reason=finish)])]

    def usage_chunk(self, usage: UsageInfo) -> ResponseModel:
        return self._chunk([], usage=usage)

    def response(self, texts: list[str], finals: list[GenerationEvent], usage: UsageInfo) -> ResponseModel:
        choices = [CompletionChoice(index=index, text=self.context.prompt_of(index).echo + text,
                                    finish_reason=_finish(final.finish_reason))
                   for index, (text, final) in enumerate(zip(texts, finals))]
        context = self.context
        return CompletionResponse(id=context.completion_id, created=context.created, model=context.model,
                                  choices=choices, usage=usage)


# --------------------------------------------------------------------------------------------------------------------
# Engine <-> asyncio
# --------------------------------------------------------------------------------------------------------------------


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


__all__ = [
    "APIError", "ChatCompletionChunk", "ChatCompletionRequest", "ChatCompletionResponse", "CompletionChunk",
    "CompletionRequest", "CompletionResponse", "ErrorResponse", "HealthStatus", "ModelList", "RequestContext",
    "RequestGate", "ServerSettings", "UsageInfo", "create_app", "fan_out", "serve",
]
