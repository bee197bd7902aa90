"""The OpenAI-compatible API on the app's own port: any OpenAI client (the `openai` package,
Open WebUI, LangChain...) can chat with every registered model by its registry id.

    GET  /v1/models              the models the backend can serve now: `id` (registry id),
                                 `owned_by`, `parent` (an adapter's base, as vLLM lists LoRA
                                 modules), `kind`
    GET  /v1/models/{id}         one of them
    POST /v1/chat/completions    `model` (a registry id), `messages` (system / developer / user /
                                 assistant, text content), `temperature`, `top_p`, `max_tokens`
                                 (or `max_completion_tokens`), `seed`, `stop`, `stream`
                                 (+ `stream_options.include_usage`), and `repetition_penalty` as
                                 vLLM takes it; a field left out is the model's own default (its
                                 run's manifest), as in the UI. `n` must be 1.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="unused")
    client.chat.completions.create(model="adapter:smollm2-medqa",
                                   messages=[{"role": "user", "content": "What is metformin?"}])

Requests go through the same `Backend` as the UI, so the same limits and the same waiting line
apply to both. Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`:
unknown model 404, a bad field 400 naming it, a request over the limits 400, a full waiting line
429 with Retry-After, a registered model the backend cannot serve now 503, a missing or wrong
key 401 (when the app was started with `--api-key-env`). Unknown fields are ignored, as OpenAI
does. A client that disconnects cancels its generation.
"""

# no `from __future__ import annotations`: FastAPI reads the route functions' annotations
# (`request: Request`, imported inside build_routes) as objects

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from medchat.backend import (Backend, BackendError, ChatRequest, GenerationSettings, LimitError,
                             Limits, ModelUnavailableError, OverloadedError, SettingsError, Stream)
from medchat.chat_format import prompt_ids
from medchat.errors import without_local_paths
from medchat.registry import ModelEntry, UnknownModelError
from medchat.remote_backend import entry_tokenizer

__all__ = ["ApiError", "build_routes", "completion_request", "model_card"]

log = logging.getLogger(__name__)

OWNER = "medchat"
RETRY_AFTER_S = 1
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# our GenerationSettings field -> the OpenAI field a client sent it as
FIELD_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
               "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop"}
# fields OpenAI defines that change the answer and are not supported here: refused when set to
# anything but their neutral value, so nobody gets a silently different answer
UNSUPPORTED = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0),
               "logprobs": (False,), "top_logprobs": (0,), "tools": ([],),
               "functions": ([],), "logit_bias": ({},), "response_format": ({"type": "text"},),
               "prediction": (), "audio": (), "modalities": (["text"],)}


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (status, message, type_,
                                                                        param, code)
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _param_of(message: str) -> str | None:
    """The field an error message starts with ("temperature: ..."), in OpenAI's naming."""
    head = message.split(":", 1)[0].strip()
    if head in FIELD_NAMES:
        return FIELD_NAMES[head]
    if head in ("message", "history", "system prompt", "messages") or head.startswith("messages"):
        return "messages"
    return None


def api_error(e: BaseException) -> ApiError:
    """A backend error as the API answers it (without this machine's paths)."""
    text = without_local_paths(str(e))
    if isinstance(e, UnknownModelError):
        return ApiError(404, text, param="model", code="model_not_found")
    if isinstance(e, OverloadedError):
        return ApiError(429, text, type_="rate_limit_error", code="server_busy",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, ModelUnavailableError):
        return ApiError(503, text, type_="service_unavailable", param="model",
                        code="model_unavailable", headers={"Retry-After": "5"})
    if isinstance(e, (SettingsError, LimitError)):
        return ApiError(400, text, param=_param_of(text),
                        code="limit_exceeded" if isinstance(e, LimitError) else "invalid_value")
    if isinstance(e, BackendError):
        return ApiError(400, text, param=_param_of(text))
    return ApiError(500, f"the server failed: {type(e).__name__}", type_="server_error")


# -- reading a request ---------------------------------------------------------------------------

def _number(body: dict, name: str, integer: bool = False) -> float | int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (integer and isinstance(value, float) and not value.is_integer()):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{name}: expected {kind}, got {json.dumps(value)[:60]}", param=name,
                       code="invalid_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"{name}: must be a finite number", param=name, code="invalid_value")
    return int(value) if integer else value


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}[{j}]: only text parts ({{\"type\": \"text\", "
                               "\"text\": ...}) are supported", param=where, code="invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}: expected a string or a list of text parts", param=where,
                   code="invalid_type")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages: expected a non-empty list of messages", param="messages",
                       code="invalid_type")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where}: expected an object with role and content",
                           param="messages", code="invalid_type")
        role = ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise ApiError(400, f"{where}.role: {str(m.get('role'))[:40]!r} is not supported "
                           "(system, developer, user or assistant)", param="messages",
                           code="invalid_value")
        if role == "system" and i != 0:
            raise ApiError(400, f"{where}: a system message may only come first",
                           param="messages", code="invalid_value")
        out.append({"role": role, "content": _text(m.get("content"), f"{where}.content")})
    if out[-1]["role"] != "user":
        raise ApiError(400, "messages: the last message must be the user's", param="messages",
                       code="invalid_value")
    return out


def _stop(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise ApiError(400, "stop: expected a string or a list of non-empty strings",
                       param="stop", code="invalid_type")
    return tuple(value)


@dataclass
class Completion:
    """A checked /v1/chat/completions request."""

    request: ChatRequest
    stream: bool
    include_usage: bool


def completion_request(body: Any, entry_for) -> Completion:
    """Check a request body (every field and type; unknown fields ignored) and make the
    backend request. `entry_for(model_id)` returns the registry entry (or raises)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: expected the id of a model, as GET /v1/models lists",
                       param="model", code="invalid_type")
    messages = _messages(body.get("messages"))
    n = _number(body, "n", integer=True)
    if n not in (None, 1):
        raise ApiError(400, "n: only 1 answer per request is supported", param="n",
                       code="invalid_value")
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise ApiError(400, f"{name}: not supported by this server", param=name,
                           code="unsupported_parameter")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: expected true or false", param="stream",
                       code="invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False),
                                                       bool):
        raise ApiError(400, "stream_options: expected {\"include_usage\": true|false}",
                       param="stream_options", code="invalid_type")
    max_tokens = _number(body, "max_completion_tokens", integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", integer=True)
    temperature = _number(body, "temperature")
    top_p = _number(body, "top_p")
    repetition_penalty = _number(body, "repetition_penalty")
    seed = _number(body, "seed", integer=True)
    stop = _stop(body.get("stop"))
    entry: ModelEntry = entry_for(model)
    try:
        settings = GenerationSettings.from_defaults(
            entry.generation, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop)
    except SettingsError as e:
        raise api_error(e) from None
    return Completion(ChatRequest(entry.id, messages, settings), stream,
                      bool(options.get("include_usage")))


# -- answering -----------------------------------------------------------------------------------

def model_card(entry: ModelEntry, created: int) -> dict:
    """One /v1/models entry (vLLM's shape: an adapter's `parent` is its base's id)."""
    return {"id": entry.id, "object": "model", "created": created, "owned_by": OWNER,
            "root": entry.id, "parent": "base" if entry.kind == "adapter" else None,
            "kind": entry.kind, "name": entry.label}


def _usage(stream: Stream) -> dict:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.new_tokens,
            "total_tokens": stream.prompt_tokens + stream.new_tokens}


def _finish(stream: Stream) -> str:
    return "length" if stream.finish_reason == "length" else "stop"


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None,
           usage: dict | None = None) -> str:
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": model, "system_fingerprint": None,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]}
    if usage is not None:
        body["choices"] = []
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def body_limit(limits: Limits) -> int:
    """Largest request body read: the text limits, JSON-escaped (6 bytes a character at most),
    plus room for the other fields."""
    chars = limits.max_message_chars + limits.max_history_chars + limits.max_system_chars
    return 6 * chars + 64 * 1024


def build_routes(backend: Backend, api_key: str | None = None) -> list:
    """The /v1 routes (FastAPI), to be served with the Gradio app on its port."""
    # fastapi is imported here (gradio brings it): importing this module,
    # as every `medchat` command does through the server, stays cheap
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from fastapi.routing import APIRoute
    from fastapi.concurrency import run_in_threadpool

    router = APIRouter(prefix="/v1")
    max_body = body_limit(backend.limits)

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> Any:
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > max_body:
            raise ApiError(413, f"the request body is {size} bytes; at most {max_body} are "
                           "accepted", code="request_too_large")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_body:
                raise ApiError(413, f"the request body is over {max_body} bytes",
                               code="request_too_large")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # nested too deep too
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    def entry_for(model_id: str) -> ModelEntry:
        try:
            return backend.registry.get(model_id)
        except UnknownModelError as e:
            raise api_error(e) from None

    @router.get("/models")
    async def list_models(request: Request):
        try:
            check_key(request)
        except ApiError as e:
            return error_response(e)
        created = int(time.time())
        return JSONResponse({"object": "list", "data": [model_card(e, created)
                                                        for e in backend.models()]})

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        try:
            check_key(request)
            entry = entry_for(model_id)
            if entry.id in backend.unavailable():
                raise ApiError(404, f"{model_id} cannot be served right now: "
                               f"{backend.unavailable()[entry.id]}", param="model",
                               code="model_not_found")
        except ApiError as e:
            return error_response(e)
        return JSONResponse(model_card(entry, int(time.time())))

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_key(request)
            c = completion_request(await read_json(request), entry_for)
            try:
                # waits in the backend's line for a slot (or is told the line is full)
                stream = await run_in_threadpool(backend.stream, c.request)
            except Exception as e:  # every backend error has its answer; others are 500
                if not isinstance(e, (BackendError, UnknownModelError)):
                    log.exception("chat completion failed to start")
                raise api_error(e) from None
        except ApiError as e:
            return error_response(e)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if c.stream:
            return StreamingResponse(_sse(stream, cid, created, c.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        return await _whole(request, stream, cid, created)

    @router.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's /tokenize for chat messages: the prompt ids a model's manifest gives them
        (what `RemoteBackend.connect` compares with its own rendering)."""
        try:
            check_key(request)
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be a JSON object")
            entry = entry_for(body.get("model") if isinstance(body.get("model"), str) else "")
            messages = _messages(body.get("messages"))
            if body.get("add_generation_prompt", True) is not True:
                raise ApiError(400, "add_generation_prompt: only true is supported",
                               param="add_generation_prompt")
            tok = await run_in_threadpool(entry_tokenizer, backend.registry, entry)
            ids = await run_in_threadpool(prompt_ids, tok, messages)
        except ApiError as e:
            return error_response(e)
        except Exception as e:  # every backend error has its answer; others are 500
            if not isinstance(e, (BackendError, OSError, ValueError)):
                log.exception("tokenize failed")
            return error_response(api_error(e))
        return JSONResponse({"count": len(ids), "tokens": ids})

    # vLLM serves /tokenize beside /v1, not under it: both paths answer
    routes = list(router.routes)
    for route in list(routes):
        if route.path == "/v1/tokenize":
            routes.append(APIRoute("/tokenize", route.endpoint, methods=["POST"]))
    return routes


async def _next(it) -> str | None:
    """The next piece of a stream's iterator (read in a worker thread), None at its end."""
    from fastapi.concurrency import run_in_threadpool

    def step():
        return next(it, None)

    return await run_in_threadpool(step)


async def _sse(stream: Stream, cid: str, created: int, include_usage: bool):
    """A stream as OpenAI's server-sent events; closing it (the client left) cancels it."""
    it = iter(stream)
    try:
        yield _chunk(cid, created, stream.model, {"role": "assistant", "content": ""})
        try:
            while (piece := await _next(it)) is not None:
                yield _chunk(cid, created, stream.model, {"content": piece})
        except Exception as e:  # the generation failed midway: tell the client, then end
            err = api_error(e)
            yield f"data: {json.dumps(err.body())}\n\n"
            return
        yield _chunk(cid, created, stream.model, {}, _finish(stream))
        if include_usage:
            yield _chunk(cid, created, stream.model, {}, usage=_usage(stream))
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()  # no-op when it finished; stops it when the client went away


async def _whole(request, stream: Stream, cid: str, created: int):
    """The whole answer as one response; a client that disconnects meanwhile cancels it."""
    from fastapi.responses import JSONResponse
    from fastapi.concurrency import run_in_threadpool

    task = asyncio.ensure_future(run_in_threadpool(stream.result))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                stream.cancel()
        text = task.result()
    except Exception as e:
        err = api_error(e)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
    finally:
        stream.cancel()
    return JSONResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": stream.model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": _finish(stream)}],
        "usage": _usage(stream)})
