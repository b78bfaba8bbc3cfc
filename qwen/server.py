"""An OpenAI-compatible HTTP API over a `GenerationEngine`: chat completions (with function calling), completions.

`create_app(engine, settings)` builds the FastAPI app; `openai_api.py` only parses arguments, loads the checkpoint and
runs uvicorn. Generation never runs on the event loop: the engine's thread decodes every request together and hands
events back with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import react
from .engine import GenerationEngine, GenerationEvent, SamplingParamError, SamplingParams, chat_stop_token_ids
from .qwen_generation_utils import make_context


@dataclass
class ServerSettings:
    """What the server is called and who may use it."""

    model_name: str = "qwen"
    api_key: str | None = None  # sent by OpenAI SDKs as `Authorization: Bearer KEY`
    api_auth: tuple[str, str] | None = None  # HTTP basic auth, as the original `--api-auth user:pass`
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    cors_allow_credentials: bool = False
    collect_garbage: bool = True  # gc + CUDA cache release whenever the engine goes idle (`--disable-gc` turns off)

    def __post_init__(self) -> None:
        if self.cors_allow_credentials and "*" in self.cors_origins:
            raise ValueError("CORS credentials cannot be combined with the origin '*'; list the allowed origins.")


# The request field behind each SamplingParams field, for the `param` of an error.
REQUEST_FIELD = {"max_new_tokens": "max_tokens"}


class APIError(Exception):
    """An error the client caused, reported in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# --------------------------------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
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
# The app
# --------------------------------------------------------------------------------------------------------------------


def create_app(engine: GenerationEngine, settings: ServerSettings | None = None) -> FastAPI:
    """The HTTP app serving `engine`'s model under `settings.model_name`."""
    settings = settings or ServerSettings()
    tokenizer = engine.tokenizer
    generation_config = engine.model.generation_config
    stop_token_ids = chat_stop_token_ids(tokenizer)
    app = FastAPI(title="Qwen OpenAI-compatible API", docs_url=None, redoc_url=None)
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
        if first.get("type") == "json_invalid":
            message = "The request body is not valid JSON."
        return APIError(400, message, param=".".join(where) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail), kind="invalid_request_error").response()

    @app.middleware("http")
    async def _authenticate(request: Request, call_next):
        if request.method != "OPTIONS" and request.url.path.startswith("/v1/") and not _authorized(request, settings):
            response = APIError(401, "Missing or wrong API key or credentials.", kind="authentication_error",
                                code="invalid_api_key").response()
            if settings.api_auth is not None:
                response.headers["WWW-Authenticate"] = 'Basic realm="qwen"'
            return response
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": engine.running}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "qwen"}
        return {"object": "list", "data": [card]}

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {settings.model_name!r}.",
                           param="model", code="model_not_found")

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

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        try:
            functions = react.normalize_tools(body.functions, body.tools, body.tool_choice, body.function_call)
        except ValueError as error:
            raise APIError(400, str(error), param="tools" if body.tools is not None else "functions") from error
        max_window = min(getattr(generation_config, "max_window_size", None) or engine.max_context, engine.max_context)
        try:
            prompt_ids = chat_prompt_ids(tokenizer, body.messages, functions, max_window)
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
                             settings.model_name, body.stream_options, after_request),
                ping=15,
            )
        results = await asyncio.gather(*[_run_to_end(engine, prompt_ids, p) for p in choices_params])
        after_request()
        choices, completion_tokens = [], 0
        for index, (text, event) in enumerate(results):
            _raise_engine_error(event)
            completion_tokens += event.completion_tokens
            message, finish_reason = _chat_message(text, event.finish_reason, functions, legacy)
            choices.append({"index": index, "message": message, "finish_reason": finish_reason, "logprobs": None})
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": settings.model_name,
            "choices": choices, "usage": _usage(len(prompt_ids), completion_tokens),
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or list of strings.", param="prompt")
        if body.stream and len(prompts) > 1:
            raise APIError(400, "Streaming takes a single prompt.", param="prompt")
        encoded = [tokenizer.encode(p, allowed_special=set(), disallowed_special=()) for p in prompts]
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
                _stream_completion(engine, ids, [p for _, p in jobs], completion_id, created, settings.model_name,
                                   body.stream_options, prompts[0] if body.echo else "", after_request),
                ping=15,
            )
        results = await asyncio.gather(*[_run_to_end(engine, ids, p) for ids, p in jobs])
        after_request()
        choices, completion_tokens = [], 0
        for index, ((text, event), (ids, _)) in enumerate(zip(results, jobs)):
            _raise_engine_error(event)
            completion_tokens += event.completion_tokens
            prefix = prompts[index // body.n] if body.echo else ""
            choices.append({"index": index, "text": prefix + text, "finish_reason": _finish(event.finish_reason),
                            "logprobs": None})
        prompt_tokens = sum(len(ids) for ids in encoded)
        return {
            "id": completion_id, "object": "text_completion", "created": created, "model": settings.model_name,
            "choices": choices, "usage": _usage(prompt_tokens, completion_tokens),
        }

    app.state.engine = engine
    app.state.settings = settings
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


def _raise_engine_error(event: GenerationEvent) -> None:
    if event.finish_reason == "error":
        raise APIError(500, f"Generation failed: {event.error}", kind="server_error")


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


def _error_chunk(event: GenerationEvent) -> str:
    """A failed generation inside a stream, whose HTTP status was already sent."""
    return json.dumps({"error": {"message": f"Generation failed: {event.error}", "type": "server_error",
                                 "param": None, "code": None}})


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
                       stream_options, after_request) -> AsyncIterator[str]:
    parsers = [react.ReActStreamParser() if functions else None for _ in choice_params]
    completion_tokens = 0
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
                if event.finish_reason == "error":
                    yield _error_chunk(event)
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
    finally:
        after_request()


def _stream_delta(item: Any, legacy: bool) -> tuple[dict, bool]:
    """One ReAct stream event as an OpenAI delta: content text, or a whole function/tool call."""
    if item.kind == "content":
        return {"content": item.text}, False
    call = {"name": item.name, "arguments": item.arguments}
    if legacy:
        return {"function_call": call}, True
    return {"tool_calls": [{"index": 0, "id": react.new_tool_call_id(), "type": "function", "function": call}]}, True


async def _stream_completion(engine, prompt_ids, choice_params, completion_id, created, model, stream_options,
                             echo: str, after_request) -> AsyncIterator[str]:
    completion_tokens = 0
    try:
        if echo:
            for index in range(len(choice_params)):
                yield _chunk("text_completion", completion_id, created, model,
                             [{"index": index, "text": echo, "finish_reason": None, "logprobs": None}])
        async for index, event in _merge([_events(engine, prompt_ids, p) for p in choice_params]):
            finish = None
            if event.finish_reason is not None:
                if event.finish_reason == "error":
                    yield _error_chunk(event)
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
    finally:
        after_request()


def _authorized(request: Request, settings: ServerSettings) -> bool:
    if settings.api_key is None and settings.api_auth is None:
        return True
    header = request.headers.get("authorization", "")
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


__all__ = ["APIError", "ServerSettings", "chat_prompt_ids", "create_app"]
