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
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from phi4flash import Engine, GenerationConfig, PromptTooLongError, StreamEvent

from ._defaults import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE, DEFAULT_MAX_TOKENS

logger = logging.getLogger(__name__)

_ROLES = {"system", "developer", "user", "assistant", "tool"}
_FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}
# Names of engine.stats() entries that mean "waiting for a batch slot" and "in the running batch".
_QUEUE_KEYS = ("queue_depth", "waiting", "queued", "pending")
_BATCH_KEYS = ("batch_size", "running", "active")


class APIError(Exception):
    """An error returned to the client as an OpenAI error object with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The ``{"error": {...}}`` JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# ----------------------------------------------------------------------------------------------------------
# Request parsing: plain functions over the decoded JSON, so every bad field gets a 400 naming it.


@dataclass
class ChatRequest:
    """A validated chat-completions request."""

    model: str | None
    messages: list[dict[str, Any]]
    config: GenerationConfig
    max_tokens_given: bool
    stream: bool = False
    include_usage: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_schema: dict[str, Any] | bool | None = None  # the JSON schema of response_format, if any
    extra: dict[str, Any] = field(default_factory=dict)


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _expect(body: dict[str, Any], name: str, kinds: tuple[type, ...], label: str) -> Any:
    """Return ``body[name]`` (None when absent or null) after checking its JSON type."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise APIError(400, f"Invalid type for '{name}': expected {label}, but got {_type_name(value)}.", param=name,
                       code="invalid_type")
    return value


def _message_content(message: dict[str, Any], index: int) -> str | None:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{index}].content: only text parts are supported "
                                    "(objects {\"type\": \"text\", \"text\": ...}).",
                               param=f"messages[{index}].content", code="invalid_value")
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"Invalid type for 'messages[{index}].content': expected a string or an array of text "
                        f"parts, but got {_type_name(content)}.", param=f"messages[{index}].content",
                   code="invalid_type")


def parse_messages(raw: Any) -> list[dict[str, Any]]:
    """Validate OpenAI chat messages and return plain phi4flash message dicts.

    Args:
        raw: The ``messages`` field of the request body.

    Returns:
        Messages with a string ``content`` (text parts joined); ``developer`` becomes ``system``;
        ``tool_calls``, ``tool_call_id`` and ``name`` are kept for the tool-calling template.

    Raises:
        APIError: 400 naming the bad message.
    """
    if raw is None:
        raise APIError(400, "Missing required parameter: 'messages'.", param="messages",
                       code="missing_required_parameter")
    if not isinstance(raw, list):
        raise APIError(400, f"Invalid type for 'messages': expected an array, but got {_type_name(raw)}.",
                       param="messages", code="invalid_type")
    if not raw:
        raise APIError(400, "'messages' must contain at least one message.", param="messages", code="empty_array")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise APIError(400, f"Invalid type for 'messages[{i}]': expected an object, but got "
                                f"{_type_name(message)}.", param=f"messages[{i}]", code="invalid_type")
        role = message.get("role")
        if role not in _ROLES:
            raise APIError(400, f"Invalid value for 'messages[{i}].role': {role!r}; expected one of "
                                f"{sorted(_ROLES)}.", param=f"messages[{i}].role", code="invalid_value")
        content = _message_content(message, i)
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            raise APIError(400, f"'messages[{i}].content' is required for role {role!r}.",
                           param=f"messages[{i}].content", code="missing_required_parameter")
        plain: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if message.get(key) is not None:
                plain[key] = message[key]
        out.append(plain)
    return out


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded chat-completions body.

    Args:
        body: The decoded JSON.

    Returns:
        The request with its :class:`~phi4flash.GenerationConfig` validated.

    Raises:
        APIError: 400 naming the first bad field.
    """
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, not {_type_name(body)}.", code="invalid_type")
    model = _expect(body, "model", (str,), "a string")
    messages = parse_messages(body.get("messages"))
    number = (int, float)
    temperature = _expect(body, "temperature", number, "a number")
    top_p = _expect(body, "top_p", number, "a number")
    top_k = _expect(body, "top_k", (int,), "an integer")
    min_p = _expect(body, "min_p", number, "a number")
    repetition_penalty = _expect(body, "repetition_penalty", number, "a number")
    max_tokens = _expect(body, "max_tokens", (int,), "an integer")
    max_completion_tokens = _expect(body, "max_completion_tokens", (int,), "an integer")
    seed = _expect(body, "seed", (int,), "an integer")
    n = _expect(body, "n", (int,), "an integer")
    stream = _expect(body, "stream", (bool,), "a boolean") or False
    stream_options = _expect(body, "stream_options", (dict,), "an object") or {}
    stop = _expect(body, "stop", (str, list), "a string or an array of strings")
    tools = _expect(body, "tools", (list,), "an array")
    for name in ("presence_penalty", "frequency_penalty"):
        value = _expect(body, name, number, "a number")
        if value:
            raise APIError(400, f"'{name}' is not supported (only 0); use 'repetition_penalty'.", param=name,
                           code="unsupported_parameter")
    if _expect(body, "logprobs", (bool,), "a boolean"):
        raise APIError(400, "'logprobs' is not supported.", param="logprobs", code="unsupported_parameter")
    response_schema = _response_schema(_expect(body, "response_format", (dict,), "an object"))
    if n is not None and n != 1:
        raise APIError(400, f"Invalid value for 'n': {n}; only n=1 is supported.", param="n", code="unsupported_value")
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "Invalid type for 'stream_options.include_usage': expected a boolean.",
                       param="stream_options.include_usage", code="invalid_type")
    if stream_options and not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true.", param="stream_options",
                       code="invalid_value")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise APIError(400, "Invalid type for 'stop': expected a string or an array of strings.", param="stop",
                       code="invalid_type")
    if max_completion_tokens is not None:
        max_tokens = max_completion_tokens
        max_tokens_param = "max_completion_tokens"
    else:
        max_tokens_param = "max_tokens"
    config = GenerationConfig()
    if temperature is not None:
        config.temperature = float(temperature)
    if top_p is not None:
        config.top_p = float(top_p)
    if top_k is not None:
        config.top_k = top_k
    if min_p is not None:
        config.min_p = float(min_p)
    if repetition_penalty is not None:
        config.repetition_penalty = float(repetition_penalty)
    if max_tokens is not None:
        config.max_new_tokens = max_tokens
    config.seed = seed
    config.stop = [stop] if isinstance(stop, str) else list(stop or [])
    try:
        config.validate()
    except ValueError as exc:
        param = str(exc).removeprefix("invalid ").split("=", 1)[0]
        param = max_tokens_param if param == "max_new_tokens" else param
        raise APIError(400, str(exc), param=param, code="invalid_value") from None
    return ChatRequest(model=model, messages=messages, config=config, max_tokens_given=max_tokens is not None,
                       stream=stream, include_usage=include_usage, tools=tools or None,
                       tool_choice=body.get("tool_choice"), response_schema=response_schema)


def _response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | bool | None:
    """The JSON schema that ``response_format`` asks the answer to follow; None for plain text."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema") if response_format else None
        schema = spec.get("schema", {"type": "object"}) if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise APIError(400, "response_format json_schema needs 'json_schema': {\"name\": ..., \"schema\": {...}}.",
                           param="response_format.json_schema", code="invalid_value")
        return schema
    raise APIError(400, f"Invalid response_format type {kind!r}: use 'text', 'json_object' or 'json_schema'.",
                   param="response_format.type", code="invalid_value")


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
            text = m.get("content") or ""
            for call in calls:
                fn = call.get("function", {}) if isinstance(call, dict) else {}
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise APIError(400, "Each tool call needs function.name.", param="messages",
                                   code="invalid_value")
                text += tools_mod.format_tool_call(fn["name"], fn.get("arguments"))
            m = {k: v for k, v in m.items() if k != "tool_calls"} | {"content": text}
        out.append(m)
    return out


# ----------------------------------------------------------------------------------------------------------
# Metrics


class _EngineStatsCollector:
    """Exposes ``engine.stats()`` (when the engine has it) as gauges at scrape time."""

    def __init__(self, state: _State) -> None:
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._state.engine_stats()
        if stats is None:
            return
        queue = next((stats[k] for k in _QUEUE_KEYS if isinstance(stats.get(k), (int, float))), None)
        batch = next((stats[k] for k in _BATCH_KEYS if isinstance(stats.get(k), (int, float))), None)
        if queue is not None:
            yield GaugeMetricFamily("phi4flash_queue_depth", "Requests waiting for a slot in the engine's batch.",
                                    value=float(queue))
        if batch is not None:
            yield GaugeMetricFamily("phi4flash_batch_size", "Requests in the engine's running decode batch.",
                                    value=float(batch))
        for key, value in sorted(stats.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key.isidentifier():
                yield GaugeMetricFamily(f"phi4flash_engine_{key}", f"engine.stats()['{key}']", value=float(value))


class _Metrics:
    def __init__(self, state: _State) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("phi4flash_requests", "Chat-completion requests by HTTP status.", ["status"],
                                registry=r)
        self.finished = Counter("phi4flash_completions", "Completions by finish reason.", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("phi4flash_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter("phi4flash_completion_tokens", "Tokens generated (reasoning + answer).",
                                         registry=r)
        self.reasoning_tokens = Counter("phi4flash_reasoning_tokens", "Reasoning tokens generated.", registry=r)
        self.ttft = Histogram("phi4flash_time_to_first_token_seconds",
                              "From the request's arrival to its first generated token (queueing included).",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.decode_speed = Histogram("phi4flash_decode_tokens_per_second",
                                      "Per-request decode speed (tokens after the first / seconds since it).",
                                      buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000), registry=r)
        self.duration = Histogram("phi4flash_request_duration_seconds", "Whole request time.",
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=r)
        self.in_flight = Gauge("phi4flash_requests_in_flight",
                               "Admitted chat requests not yet finished (running or waiting for a batch slot).",
                               registry=r)
        self.in_flight.set_function(lambda: state.in_flight)
        self.max_queue = Gauge("phi4flash_max_queue", "Admission limit: more requests in flight get 429.", registry=r)
        self.max_queue.set(state.max_queue)
        r.register(_EngineStatsCollector(state))


# ----------------------------------------------------------------------------------------------------------
# Server state and the per-request job


class _State:
    def __init__(self, engine_or_loader: Engine | Callable[[], Engine], *, api_key: str | None,
                 model_name: str | None, max_queue: int, default_max_tokens: int, max_body_bytes: int) -> None:
        self.engine: Engine | None = None
        self.loader: Callable[[], Engine] | None = None
        if isinstance(engine_or_loader, Engine):
            self.engine = engine_or_loader
        elif callable(engine_or_loader):
            self.loader = engine_or_loader
        else:
            raise TypeError("create_app needs an Engine or a callable that returns one")
        self.load_error: str | None = None
        self.api_key = api_key
        self._model_name = model_name
        self.max_queue = max_queue
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = max_body_bytes
        self.in_flight = 0
        self._lock = threading.Lock()
        self.metrics = _Metrics(self)
        self.created = int(time.time())

    @property
    def model_name(self) -> str:
        if self._model_name:
            return self._model_name
        return self.engine.model_name if self.engine is not None else "phi4flash"

    def model_names(self) -> set[str]:
        names = {self.model_name}
        if self.engine is not None:
            names.add(self.engine.model_name)
        return names

    def load(self) -> None:
        assert self.loader is not None
        try:
            engine = self.loader()
        except Exception as exc:  # noqa: BLE001  (reported through /health and 503s, not a crash)
            logger.exception("loading the model failed")
            self.load_error = f"{type(exc).__name__}: {exc}"
            return
        self.engine = engine
        logger.info("model %s loaded (%s, %s)", engine.model_name, engine.device, engine.dtype)

    def ready_engine(self) -> Engine:
        if self.engine is not None:
            return self.engine
        if self.load_error is not None:
            raise APIError(503, f"The model failed to load: {self.load_error}", type="server_error",
                           code="model_load_failed")
        raise APIError(503, "The model is loading; try again shortly.", type="server_error", code="model_loading")

    def engine_stats(self) -> dict[str, Any] | None:
        stats = getattr(self.engine, "stats", None)
        if stats is None:
            return None
        try:
            value = stats()
        except Exception:  # noqa: BLE001  (a scrape must not fail because of the engine)
            logger.exception("engine.stats() failed")
            return None
        if not isinstance(value, dict):
            value = getattr(value, "__dict__", None)
        return value if isinstance(value, dict) else None

    def admit(self) -> _Slot:
        with self._lock:
            if self.in_flight >= self.max_queue:
                raise APIError(429, f"The server is at capacity ({self.max_queue} requests in flight); retry later.",
                               type="rate_limit_error", code="queue_full")
            self.in_flight += 1
        return _Slot(self)

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1


class _Slot:
    """One admitted request; ``release`` is idempotent and thread-safe."""

    def __init__(self, state: _State) -> None:
        self._state = state
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._state.release()


_END = object()


class _Job:
    """Runs ``engine.stream`` on a thread of its own and hands its events to the event loop."""

    def __init__(self, state: _State, engine: Engine, request: ChatRequest, slot: _Slot, started: float) -> None:
        self.state = state
        self.engine = engine
        self.request = request
        self.slot = slot
        self.started = started
        self.cancel = threading.Event()  # handed to the engine, which may also set it itself when a stream ends
        self.aborted = False  # the server gave up on this request (client gone, error, shutdown)
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._run, name="phi4flash-request", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down, nobody listens
            self.abort()

    def abort(self) -> None:
        """Stop generating for this request now (the engine frees its batch slot within one step)."""
        self.aborted = True
        self.cancel.set()

    def _run(self) -> None:
        m = self.state.metrics
        first_token = True
        final: StreamEvent | None = None
        error: BaseException | None = None
        try:
            iterator = self.engine.stream(self.request.messages, self.request.config, cancel=self.cancel)
            try:
                for event in iterator:
                    if first_token and (event.text or event.token_ids):
                        first_token = False
                        m.ttft.observe(time.perf_counter() - self.started)
                    if event.done:
                        final = event
                    self._put(event)
                    if self.aborted:
                        break
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()  # frees the engine slot at once when we stopped early
        except BaseException as exc:  # noqa: BLE001  (handed to the request's coroutine to report)
            error = exc
        finally:
            # Metrics first, then the slot, then the end marker: whoever sees _END sees them all.
            if final is not None:
                fm = final.metrics
                m.finished.labels(str(fm.finish_reason)).inc()
                m.prompt_tokens.inc(fm.prompt_tokens)
                m.completion_tokens.inc(fm.completion_tokens)
                m.reasoning_tokens.inc(fm.reasoning_tokens)
                if fm.decode_tokens_per_s:
                    m.decode_speed.observe(fm.decode_tokens_per_s)
            elif self.aborted:
                m.finished.labels("cancelled").inc()
            elif error is not None and not isinstance(error, ValueError):
                m.finished.labels("error").inc()
            m.duration.observe(time.perf_counter() - self.started)
            self.slot.release()
            if error is not None:
                self._put(error)
            self._put(_END)

    async def next(self, disconnected: asyncio.Future[Any] | None = None) -> Any:
        """The next event, exception or ``_END``; ``_END`` (after cancelling) if the client went away first."""
        if disconnected is None:
            return await self.queue.get()
        getter = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({getter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        self.abort()
        return _END


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _map_engine_error(exc: BaseException, engine: Engine, req: ChatRequest) -> APIError:
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


def _constrain(engine: Engine, req: ChatRequest, forced: list[dict[str, Any]] | None) -> None:
    """Make the generation follow a forced tool call or the response_format schema (constrained decoding)."""
    param = "tool_choice" if forced else "response_format"
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise APIError(400, f"This server's engine cannot constrain its output, so '{param}' must be left out.",
                       param=param, code="unsupported_parameter")
    from phi4flash.constrained import constraint_for  # noqa: PLC0415  (only requests that need it pay for it)

    try:
        req.config.constraint = constraint_for(tokenizer, tools=forced, schema=None if forced else req.response_schema,
                                               max_new_tokens=req.config.max_new_tokens)
    except ValueError as exc:
        raise APIError(400, str(exc), param=param, code="invalid_value") from None


def _sse(data: dict[str, Any] | str) -> str:
    # ASCII-only JSON: clients that split lines with str.splitlines() would break on a raw U+2028 or U+0085.
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return f"data: {payload}\n\n"


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
    state = _State(engine_or_loader, api_key=api_key, model_name=model_name, max_queue=max_queue,
                   default_max_tokens=default_max_tokens, max_body_bytes=max_body_bytes)

    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loader_thread = None
        if state.engine is None and state.loader is not None:
            loader_thread = threading.Thread(target=state.load, name="phi4flash-load", daemon=True)
            loader_thread.start()
        yield

    app = FastAPI(title="phi4flash", description="OpenAI-compatible API for Phi-4-mini-flash-reasoning",
                  lifespan=contextlib.asynccontextmanager(lifespan), docs_url=None, redoc_url=None)
    app.state.phi4flash = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if request.url.path.endswith("/chat/completions"):
            state.metrics.requests.labels(str(exc.status)).inc()
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
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

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > state.max_body_bytes:
            raise APIError(413, f"The request body is larger than {state.max_body_bytes} bytes.",
                           code="payload_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > state.max_body_bytes:
                raise APIError(413, f"The request body is larger than {state.max_body_bytes} bytes.",
                               code="payload_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None

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

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        check_key(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        check_key(request)
        check_model(model_id)
        return JSONResponse(model_card())

    async def tokenize(request: Request) -> JSONResponse:
        check_key(request)
        engine = state.ready_engine()
        body = await read_json(request)
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_type")
        check_model(_expect(body, "model", (str,), "a string"))
        messages = parse_messages(body.get("messages"))
        count = await anyio.to_thread.run_sync(engine.count_tokens, messages)
        return JSONResponse({"count": count, "max_model_len": engine.context_length})

    app.add_api_route("/v1/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"], include_in_schema=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        check_key(request)
        engine = state.ready_engine()
        req = parse_chat_request(await read_json(request))
        check_model(req.model)
        tools_mod = None
        forced: list[dict[str, Any]] | None = None  # the tools one of which must be called
        if req.tools:
            tools_mod = _tools_module()
            if tools_mod is None:
                raise APIError(400, "Tool calling is not available on this server.", param="tools",
                               code="unsupported_parameter")
            if req.tool_choice not in (None, "auto", "none", "required") and not isinstance(req.tool_choice, dict):
                raise APIError(400, "Invalid value for 'tool_choice'.", param="tool_choice", code="invalid_value")
            if req.tool_choice != "none":
                try:
                    req.messages = tools_mod.attach_tools(req.messages, req.tools)
                except ValueError as exc:
                    raise APIError(400, str(exc), param="tools", code="invalid_value") from None
                try:  # the tools are valid by now, so an error here is the choice's
                    forced = tools_mod.forced_tools(req.tools, req.tool_choice)
                except ValueError as exc:
                    raise APIError(400, str(exc), param="tool_choice", code="invalid_value") from None
            else:
                tools_mod = None
        req.messages = _history_tool_calls(_tools_module(), req.messages) if any(
            m.get("tool_calls") for m in req.messages) else req.messages
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
            if forced or req.response_schema is not None:
                _constrain(engine, req, forced)
            job = _Job(state, engine, req, slot, started)
        except BaseException:
            slot.release()
            raise
        job.start()
        disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
        handed_off = False  # True once the job ended on its own or belongs to a StreamingResponse
        try:
            # Wait for the first event before answering, so errors raised before generation starts
            # (prompt too long, bad sampling values) still get a proper status code.
            first = await job.next(disconnected)
            if first is _END:
                return Response(status_code=499)  # client gone; nothing is listening
            if isinstance(first, BaseException):
                raise _map_engine_error(first, engine, req)
            cid = f"chatcmpl-{uuid.uuid4().hex}"
            created = int(time.time())
            if req.stream:
                disconnected.cancel()  # from here StreamingResponse watches the connection
                state.metrics.requests.labels("200").inc()
                handed_off = True
                return StreamingResponse(_stream_body(job, first, cid, created, state.model_name, req, tools_mod,
                                                      engine), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            collected = _Collected()
            item = first
            while item is not _END:
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
            if tools_mod is not None:
                content, calls = _tool_calls(tools_mod, answer)
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


async def _stream_body(job: _Job, first: Any, cid: str, created: int, model: str, req: ChatRequest,
                       tools_mod: Any, engine: Engine) -> AsyncIterator[str]:
    """Server-sent events of one streamed completion; cancelling this generator cancels the job."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                "system_fingerprint": None,
                                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if req.include_usage:
            body["usage"] = None
        return body

    # With tools, text streams as it comes and each call as soon as its name is known, then its arguments.
    parser = tools_mod.ToolCallStreamParser() if tools_mod is not None else None
    completed = False
    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        collected = _Collected()
        item = first
        while item is not _END:
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
        if req.include_usage:
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
