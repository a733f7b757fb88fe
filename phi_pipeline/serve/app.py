"""The HTTP side: OpenAI's routes on FastAPI, requests turned into engine jobs, errors in OpenAI's
shape. The model itself is only touched by the engine thread (and the tokenizer, stateless, here)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phi_pipeline.bundle.layout import MANIFEST
from phi_pipeline.runtime.genai import PromptFormatError, Sampling
from phi_pipeline.runtime.engine import (
    Delta, Engine, EngineSettings, Failed, Finished, Handle, Job, NotAccepting, QueueFull, serving_engine,
)
from phi_pipeline.serve.adapters import AdapterChangeError, Changes, ServedAdapters
from phi_pipeline.serve.web_routes import web_router
from phi_pipeline.serve.protocol import (
    ChatCompletionRequest, Completion, CompletionRequest, LoadLoraAdapterRequest, UnloadLoraAdapterRequest,
    UnsupportedOption, error_body, model_card, now,
)

log = logging.getLogger("phi_pipeline.serve")
API_KEY_ENV = "PHI_PIPELINE_API_KEY"


@dataclass(frozen=True)
class ServeSettings:
    bundle: Path
    threads: int | None = None
    """Decoder intra-op threads (None: onnxruntime-genai's default, one on CPU)."""
    api_key: str | None = None
    """Required as `Authorization: Bearer KEY` on /v1/* when set."""
    max_tokens: int = 1024
    """Bound of a request's max_tokens (400 past it) and its default where the context allows."""
    max_body_bytes: int = 1 << 20
    """Request bodies past this get 413."""
    engine: EngineSettings = field(default_factory=EngineSettings)
    engine_kind: str = "auto"
    """Which engine serves: auto (the batched one where the bundle allows it), batched or genai."""
    public_key: Path | None = None
    """Adapter reloads also check the bundle's signature with this key (serve/adapters.py)."""


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def _not_accepting(state: str) -> APIError:
    reasons = {"loading": "the model is still loading", "draining": "the server is shutting down",
               "failed": "the model failed to load", "stopped": "the server has stopped"}
    return APIError(503, f"{reasons.get(state, state)}; retry later", "service_unavailable_error", code=state)


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Every problem of a request body in one message, and the first offending field."""
    parts, params = [], []
    for e in errors:
        if e["type"] == "json_invalid":
            return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}", None
        error = e.get("ctx", {}).get("error")
        loc = [str(x) for x in e["loc"] if x != "body"]
        if isinstance(error, UnsupportedOption):
            loc, msg = [error.field], str(error)
        elif e["type"] == "extra_forbidden":
            msg = "unrecognized request argument"
        elif e["type"] == "missing" and not loc:
            msg = "give a JSON object body"
        else:
            msg = e["msg"]
        name = ".".join(loc) or None
        params.append(name)
        parts.append(f"{name}: {msg}" if name else msg)
    return "; ".join(parts), next((p for p in params if p), None)


def create_app(settings: ServeSettings, engine: Engine | None = None) -> FastAPI:
    """The server for one bundle; `engine` (tests) replaces the one that would load it."""
    manifest = json.loads((settings.bundle / MANIFEST).read_text())
    base_id = manifest["pipeline"]
    adapters = [a["name"] for a in manifest["adapters"]]
    models = {base_id: None, **{a: a for a in adapters}}
    created = now()
    engine = engine or serving_engine(settings.bundle, settings.threads, settings.engine, settings.engine_kind)
    served = ServedAdapters(settings.bundle, settings.public_key)
    changing = asyncio.Lock()

    async def change_adapters(plan: Callable[[], Changes]) -> Changes:
        """Check a change against the bundle on disk (off the event loop: it hashes the bundle), let the engine
        swap the weights between two steps, then route requests to the new set."""
        async with changing:
            try:
                changes = await asyncio.to_thread(plan)
                if changes:
                    await asyncio.wrap_future(engine.call(lambda: engine.swap_adapters(changes)))
            except AdapterChangeError as exc:
                raise APIError(exc.status, str(exc)) from None
            except NotAccepting as exc:
                raise _not_accepting(str(exc)) from None
            except ValueError as exc:  # the engine refused the weights (another graph) or cannot swap
                raise APIError(400, str(exc)) from None
            served.applied(changes)
            for name, change in changes.items():
                if change is None:
                    models.pop(name, None)
                else:
                    models[name] = name
            return changes

    async def reload_on_signal() -> None:
        log.info("SIGHUP: reloading the adapters of %s", settings.bundle)
        try:
            changes = await change_adapters(served.reload)
        except APIError as exc:
            log.error("adapter reload refused: %s", exc)
            return
        loaded = sorted(n for n, c in changes.items() if c is not None)
        dropped = sorted(n for n, c in changes.items() if c is None)
        log.info("adapters reloaded: %s new or changed, %s no longer served", ", ".join(loaded) or "none",
                 ", ".join(dropped) or "none")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        loop = asyncio.get_running_loop()
        # signals reach the main thread only (a server run in a thread, as in tests, has no SIGHUP reload)
        with contextlib.suppress(ValueError, RuntimeError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_on_signal()))
        yield
        engine.stop(timeout=30)

    # With a key, the generated API docs would be open to anyone who can reach the port (vLLM's issue #18892):
    # they are not served then (a browser cannot send the Bearer header the API routes ask for).
    closed = {"docs_url": None, "redoc_url": None, "openapi_url": None} if settings.api_key else {}
    app = FastAPI(title=f"phi-pipeline serve: {base_id}", lifespan=lifespan, **closed)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.state.engine = engine  # server.py drains it on Ctrl-C

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {exc}", "server_error"), status_code=500)

    bearer = HTTPBearer(auto_error=False)

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        key = settings.api_key
        if key is None:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        body: dict[str, Any] = {"status": "ok" if engine.state == "ready" else engine.state}
        if engine.error:
            body["error"] = engine.error
        cache = getattr(engine, "prefix_cache", None)
        if cache is not None:
            body["prefix_cache"] = cache.stats()
        steps = getattr(engine, "step_times", None)
        if steps is not None:  # the batched engine's
            body["steps"] = steps.stats()
        return JSONResponse(body, status_code=200 if engine.state == "ready" else 503)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return resources.files("phi_pipeline.serve").joinpath("static/index.html").read_text()

    app.include_router(web_router(settings.bundle, settings.api_key))

    def card(model_id: str) -> dict[str, Any]:
        return model_card(model_id, created, None if model_id == base_id else base_id)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card(m) for m in models]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(authorized)])
    async def get_model(model_id: str) -> dict[str, Any]:
        return card(_resolve(model_id)[0])

    def _resolve(model_id: str) -> tuple[str, str | None]:
        if model_id not in models:
            raise APIError(404, f"The model `{model_id}` does not exist. Models: {', '.join(models)}.",
                           param="model", code="model_not_found")
        return model_id, models[model_id]

    def _job(body: ChatCompletionRequest | CompletionRequest, adapter: str | None) -> Job:
        if engine.state != "ready" or engine.model is None:
            raise _not_accepting(engine.state)
        model = engine.model
        try:
            if isinstance(body, ChatCompletionRequest):
                text = model.messages_prompt([m.as_template_message() for m in body.messages], adapter)
            else:
                text = body.prompt
        except PromptFormatError as exc:
            raise APIError(400, str(exc), param="messages") from None
        prompt = model.encode(text)
        context, limit = engine.context_length, body.token_limit
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
        if limit is not None and limit > settings.max_tokens:
            raise APIError(400, f"{param}={limit} is more than this server allows ({settings.max_tokens}; "
                           "see phi-pipeline serve --max-tokens)", param=param, code="invalid_value")
        where = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        if not prompt:
            raise APIError(400, "the prompt is empty: give some text", param=where)
        if len(prompt) + (limit or 1) > context:
            asked = f"{len(prompt)} in the prompt" + (f" + {limit} to generate" if limit else "")
            raise APIError(400, f"This model's maximum context length is {context} tokens; the request needs "
                           f"{asked}. Shorten the prompt or lower {param}.", param=where, code="context_length_exceeded")
        max_tokens = limit if limit is not None else min(settings.max_tokens, context - len(prompt))
        sampling = Sampling(body.temperature, body.top_p, body.top_k, body.seed)
        if body.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens={body.min_tokens} is more than max_tokens={max_tokens}", param="min_tokens")
        return Job(prompt, adapter, max_tokens, sampling, tuple(body.stop_list), body.min_tokens)

    def _submit(job: Job) -> Handle:
        try:
            return engine.submit(job, asyncio.get_running_loop())
        except QueueFull:
            raise APIError(429, f"all {engine.settings.max_active} generators are busy and "
                           f"{engine.settings.max_queue} requests are waiting; retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except NotAccepting as exc:
            raise _not_accepting(str(exc)) from None

    async def _complete(request: Request, body: ChatCompletionRequest | CompletionRequest, chat: bool) -> Any:
        model_id, adapter = _resolve(body.model)
        job = _job(body, adapter)
        handle = _submit(job)
        out = Completion(chat, model_id)
        if body.stream:
            return _Stream(_stream(handle, out, body.include_usage), handle)
        watcher = asyncio.create_task(_watch_disconnect(request, handle))
        try:
            text = []
            while True:
                event = await handle.events.get()
                if isinstance(event, Delta):
                    text.append(event.text)
                elif isinstance(event, Finished):
                    return out.whole("".join(text), event.finish_reason, event.prompt_tokens, event.completion_tokens)
                else:
                    raise APIError(500, event.message, "server_error", code="engine_error")
        finally:
            watcher.cancel()
            handle.cancel()  # a no-op once finished; frees the generator when this task was cancelled

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(authorized)], response_class=PlainTextResponse)
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> str:
        await change_adapters(lambda: served.load(body.lora_name, body.lora_path))
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(authorized)], response_class=PlainTextResponse)
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> str:
        await change_adapters(lambda: served.unload(body.lora_name))
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        return await _complete(request, body, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request, body: CompletionRequest) -> Any:
        return await _complete(request, body, chat=False)

    return app


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is larger than this server accepts ({max_bytes} bytes)")


class BodyLimit:
    """413 in OpenAI's shape for bodies past `max_bytes`. Not FastAPI's max_body_size: that one answers
    a too-large Content-Length in plain text, which OpenAI clients cannot parse."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            error = BodyTooLarge(self.max_bytes)
            await JSONResponse(error_body(error.detail, "invalid_request_error"), 413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # a chunked body: raised inside the body read, answered by _http
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)


def _sse(data: dict[str, Any] | str) -> bytes:
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data))


class _Stream(EventSourceResponse):
    """A stream that cancels its request however it ends: the client went away (even before the
    first event) or the response was cancelled; a no-op once the request has finished."""

    def __init__(self, content: AsyncIterator[bytes], handle: Handle):
        super().__init__(content)
        self.handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()


async def _stream(handle: Handle, out: Completion, include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI's stream: the role first (chat), content deltas, the finish reason, usage if asked,
    [DONE]. A failure mid-stream ends it with an error event."""
    if out.chat:
        yield _sse(out.chunk(None, first=True, include_usage=include_usage))
    while True:
        event = await handle.events.get()
        if isinstance(event, Delta):
            yield _sse(out.chunk(event.text, include_usage=include_usage))
        elif isinstance(event, Finished):
            yield _sse(out.chunk(None, event.finish_reason, include_usage=include_usage))
            if include_usage:
                yield _sse(out.usage_chunk(event.prompt_tokens, event.completion_tokens))
            break
        else:
            assert isinstance(event, Failed)
            yield _sse(error_body(event.message, "server_error", code="engine_error"))
            break
    yield _sse("[DONE]")


async def _watch_disconnect(request: Request, handle: Handle) -> None:
    """Cancel `handle` when the client of a non-streamed request goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return
