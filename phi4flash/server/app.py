"""OpenAI-compatible HTTP API over a phi4flash :class:`~phi4flash.Engine` (FastAPI).

Endpoints: ``POST /v1/chat/completions`` (server-sent events or one JSON body), ``GET /v1/models``,
``POST /v1/tokenize`` (non-standard, vLLM-shaped: ``{"count", "max_model_len"}``), ``GET /health`` and
``GET /metrics`` (Prometheus text format).

Each request runs ``engine.stream`` on a thread of its own that feeds an :class:`asyncio.Queue`, so the
event loop never blocks and the engine's scheduler batches concurrent requests. A request that loses its
client is cancelled (its ``threading.Event`` is set and the engine iterator closed) at once, which frees
its slot in the engine's batch.

Only :mod:`phi4flash.server` imports FastAPI; the core package never does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from phi4flash import Engine, GenerationConfig, PromptTooLongError, StreamEvent

from ._defaults import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE, DEFAULT_MAX_TOKENS
from .api_models import APIError, ChatCompletionRequest, TokenizeRequest, validation_error
from .runtime import END, Job, ServerState, wait_for_disconnect

logger = logging.getLogger(__name__)

_FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# ----------------------------------------------------------------------------------------------------------
# Tool calling, through phi4flash.tools when another part of the package provides it.


def _tools_module() -> Any | None:
    """phi4flash.tools if it is importable and has what the server needs, else None."""
    try:
        from phi4flash import tools  # noqa: PLC0415  (optional part of the package)
    except Exception:  # noqa: BLE001  (a broken optional module must not break serving)
        return None
    needed = ("attach_tools", "parse_tool_calls", "format_tool_call", "forced_tools", "ToolCallStreamParser")
    if all(hasattr(tools, name) for name in needed):
        return tools
    return None


def _history_tool_calls(tools_mod: Any | None, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write earlier assistant ``tool_calls`` back into their content in the model's own call format."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if m["role"] == "assistant" and calls:
            if tools_mod is None:
                raise APIError(400, "Tool calls in the history need tool calling, which this server lacks.",
                               param="messages", code="unsupported_parameter")
            text = (m.get("content") or "") + "".join(
                tools_mod.format_tool_call(call["function"]["name"], call["function"].get("arguments"))
                for call in calls)
            m = {k: v for k, v in m.items() if k != "tool_calls"} | {"content": text}
        out.append(m)
    return out


@dataclass
class PreparedChat:
    """A validated chat request made ready for the engine: plain messages and a validated config."""

    body: ChatCompletionRequest
    messages: list[dict[str, Any]]
    config: GenerationConfig
    tools_mod: Any = None  # phi4flash.tools when the answer may hold tool calls
    tools: list[dict[str, Any]] | None = None  # the request's tools as dicts, when they go into the prompt
    forced: list[dict[str, Any]] | None = None  # the tools one of which must be called
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_tokens_given(self) -> bool:
        """Whether the client set the token budget."""
        return self.body.max_tokens is not None or self.body.max_completion_tokens is not None


def _map_engine_error(exc: BaseException, engine: Engine, req: PreparedChat) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return APIError(400, f"This model's maximum context length is {engine.context_length} tokens: {exc}",
                        param="max_tokens" if req.max_tokens_given else "messages", code="context_length_exceeded")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_value")
    logger.error("generation failed", exc_info=(type(exc), exc, exc.__traceback__))
    return APIError(500, "The engine failed while generating; see the server log.", type="server_error",
                    code="engine_error")


# ----------------------------------------------------------------------------------------------------------
# Response bodies


@dataclass
class _Collected:
    reasoning: list[str] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)
    final: StreamEvent | None = None

    def add(self, event: StreamEvent) -> None:
        if event.done:
            self.final = event
        elif event.text:
            (self.reasoning if event.channel == "reasoning" else self.answer).append(event.text)


def _usage(event: StreamEvent | None) -> dict[str, Any]:
    m = event.metrics if event is not None else None
    prompt = m.prompt_tokens if m else 0
    completion = m.completion_tokens if m else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": m.reasoning_tokens if m else 0}}


def _finish_reason(event: StreamEvent | None) -> str:
    reason = event.metrics.finish_reason if event is not None else None
    return _FINISH_REASONS.get(str(reason), "stop")


def _tool_calls(tools_mod: Any, answer: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split the answer into content and OpenAI ``tool_calls`` with phi4flash.tools."""
    content, calls, invalid = tools_mod.parse_tool_calls(answer)
    if not calls:
        if invalid:
            logger.info("the model wrote %d tool call(s) that do not parse; returning them as text", len(invalid))
        return answer, []
    out = [{"index": i, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
           for i, call in enumerate(calls)]
    return content or None, out


def _stream_deltas(tools_mod: Any, items: list[Any]) -> Iterator[dict[str, Any]]:
    """OpenAI stream deltas for the items of phi4flash.tools' stream parser: text as ``content``, a call's
    first chunk with its id and name, later chunks with argument pieces (clients join them by index)."""
    for item in items:
        if item.kind == "text" and item.text:
            yield {"content": item.text}
        elif item.kind == "call" and item.name is not None:
            yield {"tool_calls": [{"index": item.index, "id": item.id, "type": "function",
                                   "function": {"name": item.name, "arguments": item.args}}]}
        elif item.kind == "call" and item.args:
            yield {"tool_calls": [{"index": item.index, "function": {"arguments": item.args}}]}
        elif item.kind == "invalid" and item.name is None:
            # a tag whose payload never named a tool: what the model wrote stays text, as without streaming
            yield {"content": tools_mod.TOOL_CALL_OPEN + item.text}


def _constrain(engine: Engine, req: PreparedChat) -> None:
    """Make the generation follow a forced tool call or the response_format schema (constrained decoding)."""
    param = "tool_choice" if req.forced else "response_format"
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise APIError(400, f"This server's engine cannot constrain its output, so '{param}' must be left out.",
                       param=param, code="unsupported_parameter")
    from phi4flash.constrained import constraint_for  # noqa: PLC0415  (only requests that need it pay for it)

    schema = None if req.forced or req.body.response_format is None else req.body.response_format.schema()
    try:
        req.config.constraint = constraint_for(tokenizer, tools=req.forced, schema=schema,
                                               max_new_tokens=req.config.max_new_tokens)
    except ValueError as exc:
        raise APIError(400, str(exc), param=param, code="invalid_value") from None


def _constrain_calls(engine: Engine, req: PreparedChat) -> None:
    """``tool_choice`` "auto": the model answers freely or calls, and a call it opens names one of the tools with
    the arguments its schema declares. An engine that cannot constrain (a remote one) generates unconstrained."""
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        return
    from phi4flash.constrained import optional_calls  # noqa: PLC0415

    req.config.constraint = optional_calls(tokenizer, req.tools or [], max_new_tokens=req.config.max_new_tokens)


def _prepare(body: ChatCompletionRequest) -> PreparedChat:
    """Plain messages with the tools attached and earlier calls written back, and the generation config."""
    req = PreparedChat(body, [m.plain() for m in body.messages], body.generation_config())
    if body.tools and body.tool_choice != "none":
        req.tools_mod = _tools_module()
        if req.tools_mod is None:
            raise APIError(400, "Tool calling is not available on this server.", param="tools",
                           code="unsupported_parameter")
        tools = req.tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
        req.messages = req.tools_mod.attach_tools(req.messages, tools)
        try:
            req.forced = req.tools_mod.forced_tools(tools, body.tool_choice)
        except ValueError as exc:
            raise APIError(400, str(exc), param="tool_choice", code="invalid_value") from None
    if any(m.get("tool_calls") for m in req.messages):
        req.messages = _history_tool_calls(_tools_module(), req.messages)
    return req


def _sse(data: dict[str, Any] | str) -> str:
    # ASCII-only JSON: clients that split lines with str.splitlines() would break on a raw U+2028 or U+0085.
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return f"data: {payload}\n\n"


class _BodyLimit:
    """ASGI middleware: a request body larger than ``limit`` bytes gets 413 (by its Content-Length at once, or
    when a streamed body passes the limit), before anything parses it."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"The request body is larger than {self.limit} bytes."
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await _error_response(APIError(413, too_large, code="payload_too_large"))(scope, receive, send)
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise StarletteHTTPException(413, too_large)
            return message

        await self.app(scope, limited, send)


# ----------------------------------------------------------------------------------------------------------
# The app


def create_app(engine_or_loader: Engine | Callable[[], Engine], *, api_key: str | None = None,
               model_name: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               default_max_tokens: int = DEFAULT_MAX_TOKENS,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """Build the OpenAI-compatible FastAPI app.

    Args:
        engine_or_loader: A loaded engine, or a callable returning one; a callable runs on a thread at
            startup and requests get 503 until it returns.
        api_key: When set, requests to ``/v1/*`` must send ``Authorization: Bearer <api_key>`` (401 otherwise).
            ``/health`` and ``/metrics`` stay open for probes and scrapers.
        model_name: The id served in ``/v1/models`` and accepted in ``model`` (404 for others); default the
            engine's ``model_name`` (which is always accepted too).
        max_queue: Most chat requests in flight at once, running in the engine's batch or waiting for a slot;
            one more gets 429.
        default_max_tokens: Completion budget when a request sets neither ``max_tokens`` nor
            ``max_completion_tokens`` (clamped to the context left after the prompt).
        max_body_bytes: Larger request bodies get 413.

    Returns:
        The FastAPI application; serve it with uvicorn (``phi4flash serve``) or Ray Serve.
    """
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue}")
    state = ServerState(engine_or_loader, api_key=api_key, model_name=model_name, max_queue=max_queue,
                        default_max_tokens=default_max_tokens, max_body_bytes=max_body_bytes)

    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loader_thread = None
        if state.engine is None and state.loader is not None:
            loader_thread = threading.Thread(target=state.load, name="phi4flash-load", daemon=True)
            loader_thread.start()
        yield

    app = FastAPI(title="phi4flash", description="OpenAI-compatible API for Phi-4-mini-flash-reasoning",
                  lifespan=contextlib.asynccontextmanager(lifespan), redoc_url=None)
    app.state.phi4flash = state
    app.add_middleware(_BodyLimit, limit=max_body_bytes)

    def count_chat_error(request: Request, status: int) -> None:
        if request.url.path.endswith("/chat/completions"):
            state.metrics.requests.labels(str(status)).inc()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        count_chat_error(request, exc.status)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        count_chat_error(request, 400)
        return _error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        return _error_response(APIError(500, "Internal server error; see the server log.", type="server_error",
                                        code="internal_error"))

    def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "Incorrect API key provided." if header else "Missing API key: send "
                           "'Authorization: Bearer <key>'.", code="invalid_api_key")

    authorized = [Depends(check_key)]

    def check_model(model: str | None) -> None:
        if model is not None and model not in state.model_names():
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{state.model_name}'.",
                           param="model", code="model_not_found")

    def model_card() -> dict[str, Any]:
        card: dict[str, Any] = {"id": state.model_name, "object": "model", "created": state.created,
                                "owned_by": "phi4flash"}
        if state.engine is not None:
            card.update(max_model_len=state.engine.context_length, device=state.engine.device,
                        dtype=state.engine.dtype)
        return card

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is None:
            status = "failed" if state.load_error else "loading"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.model_name, "in_flight": state.in_flight})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=authorized)
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}", dependencies=authorized)
    async def get_model(model_id: str) -> JSONResponse:
        check_model(model_id)
        return JSONResponse(model_card())

    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        engine = state.ready_engine()
        check_model(body.model)
        count = await anyio.to_thread.run_sync(engine.count_tokens, [m.plain() for m in body.messages])
        return JSONResponse({"count": count, "max_model_len": engine.context_length})

    app.add_api_route("/v1/tokenize", tokenize, methods=["POST"], dependencies=authorized)
    app.add_api_route("/tokenize", tokenize, methods=["POST"], dependencies=authorized, include_in_schema=False)

    @app.post("/v1/chat/completions", response_model=None, dependencies=authorized)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        started = time.perf_counter()
        engine = state.ready_engine()
        check_model(body.model)
        req = _prepare(body)
        slot = state.admit()
        try:
            prompt_tokens = await anyio.to_thread.run_sync(engine.count_tokens, req.messages)
            room = engine.context_length - prompt_tokens
            if room < 1:
                raise APIError(413, f"The prompt is {prompt_tokens} tokens; this model's maximum context length is "
                                    f"{engine.context_length} tokens.", param="messages",
                               code="context_length_exceeded")
            if req.max_tokens_given and req.config.max_new_tokens > room:
                raise APIError(400, f"This model's maximum context length is {engine.context_length} tokens; the "
                                    f"prompt is {prompt_tokens} tokens, so max_tokens can be at most {room}, not "
                                    f"{req.config.max_new_tokens}.", param="max_tokens",
                               code="context_length_exceeded")
            if not req.max_tokens_given:
                req.config.max_new_tokens = max(1, min(state.default_max_tokens, room))
            if req.forced or (body.response_format is not None and body.response_format.schema() is not None):
                _constrain(engine, req)
            elif req.tools_mod is not None:
                _constrain_calls(engine, req)
            job = Job(state, engine, req.messages, req.config, slot, started)
        except BaseException:
            slot.release()
            raise
        job.start()
        disconnected = asyncio.ensure_future(wait_for_disconnect(request))
        handed_off = False  # True once the job ended on its own or belongs to a StreamingResponse
        try:
            # Wait for the first event before answering, so errors raised before generation starts
            # (prompt too long, bad sampling values) still get a proper status code.
            first = await job.next(disconnected)
            if first is END:
                return Response(status_code=499)  # client gone; nothing is listening
            if isinstance(first, BaseException):
                raise _map_engine_error(first, engine, req)
            cid = f"chatcmpl-{uuid.uuid4().hex}"
            created = int(time.time())
            if body.stream:
                disconnected.cancel()  # from here StreamingResponse watches the connection
                state.metrics.requests.labels("200").inc()
                handed_off = True
                return StreamingResponse(_stream_body(job, first, cid, created, state.model_name, req, engine),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            collected = _Collected()
            item = first
            while item is not END:
                if isinstance(item, BaseException):
                    raise _map_engine_error(item, engine, req)
                collected.add(item)
                item = await job.next(disconnected)
            if job.aborted:
                return Response(status_code=499)
            handed_off = True
            answer = "".join(collected.answer)
            message: dict[str, Any] = {"role": "assistant", "content": answer,
                                       "reasoning_content": "".join(collected.reasoning) or None}
            finish = _finish_reason(collected.final)
            if req.tools_mod is not None:
                content, calls = _tool_calls(req.tools_mod, answer)
                if calls:
                    message["content"] = content
                    message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
                    finish = "tool_calls"
            state.metrics.requests.labels("200").inc()
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created,
                                 "model": state.model_name, "system_fingerprint": None,
                                 "choices": [{"index": 0, "message": message, "logprobs": None,
                                              "finish_reason": finish}],
                                 "usage": _usage(collected.final)})
        finally:
            disconnected.cancel()
            if not handed_off:
                job.abort()  # an error or a disconnect: stop the engine and free the slot now

    return app


async def _stream_body(job: Job, first: Any, cid: str, created: int, model: str, req: PreparedChat,
                       engine: Engine) -> AsyncIterator[str]:
    """Server-sent events of one streamed completion; cancelling this generator cancels the job."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                "system_fingerprint": None,
                                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return body

    include_usage = req.body.stream_options is not None and req.body.stream_options.include_usage
    tools_mod = req.tools_mod
    # With tools, text streams as it comes and each call as soon as its name is known, then its arguments.
    parser = tools_mod.ToolCallStreamParser() if tools_mod is not None else None
    completed = False
    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        collected = _Collected()
        item = first
        while item is not END:
            if isinstance(item, BaseException):
                err = _map_engine_error(item, engine, req)
                yield _sse(err.body())
                yield _sse("[DONE]")
                completed = True
                return
            collected.add(item)
            if item.text and not item.done:
                if item.channel == "reasoning":
                    yield _sse(chunk({"reasoning_content": item.text}))
                elif parser is None:
                    yield _sse(chunk({"content": item.text}))
                else:
                    for delta in _stream_deltas(tools_mod, parser.feed(item.text)):
                        yield _sse(chunk(delta))
            item = await job.next()
        finish = _finish_reason(collected.final)
        if parser is not None:
            for delta in _stream_deltas(tools_mod, parser.finish()):
                yield _sse(chunk(delta))
            if parser.calls:
                finish = "tool_calls"
        yield _sse(chunk({}, finish))
        if include_usage:
            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "system_fingerprint": None, "choices": [], "usage": _usage(collected.final)})
        yield _sse("[DONE]")
        completed = True
    finally:
        if not completed:
            job.abort()  # the client went away (or the server stops): free the engine slot now


@contextlib.contextmanager
def serve_in_background(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0,
                        startup_timeout: float = 120.0) -> Iterator[str]:
    """Run ``app`` on uvicorn in a background thread; yield its base URL (``http://host:port``).

    Meant for notebooks, tests and benchmarks. ``port=0`` binds a free port (the socket is bound before
    uvicorn starts, so there is no race for it). The server stops when the block exits.

    Args:
        app: The app from :func:`create_app`.
        host: Address to bind; loopback by default.
        port: Port to bind, 0 for any free one.
        startup_timeout: Seconds to wait for uvicorn to start.

    Yields:
        The base URL, without ``/v1``.
    """
    import socket  # noqa: PLC0415

    import uvicorn  # noqa: PLC0415

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="phi4flash-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://{'[' + host + ']' if ':' in host else host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
