"""``RemoteEngine``: the :class:`~phi4flash.Engine` protocol over any OpenAI-compatible chat-completions server.

Works against ``phi4flash serve`` and other OpenAI-compatible servers (vLLM, ...). Standard library only
(urllib and a small server-sent-events reader), so importing it costs nothing.

- Reasoning arrives in ``delta.reasoning_content`` (phi4flash, vLLM with a reasoning parser) or
  ``delta.reasoning``; if a server sends the raw ``<think>...</think>`` text in ``content`` instead (its first
  content starts with ``<think>``), it is split here.
- Latency is measured on the client: time to first token is from sending the request to the first
  generated text arriving; decode tokens/s counts the chunks (one token each on phi4flash and vLLM) until the
  final usage (``stream_options.include_usage``) gives the exact counts.
- ``count_tokens`` asks the server's non-standard ``/tokenize`` endpoint (phi4flash serves
  ``/v1/tokenize``; vLLM serves ``/tokenize``); when the server has none, it approximates with one token per 4
  characters plus 4 per message, which can be off by tens of percent.
- Cancel: closing the iterator or setting ``cancel`` closes the HTTP response, which the server sees as a
  disconnect and stops generating.
- Tools and structured output: ``stream(..., tools=, tool_choice=, response_format=)`` sends them as the
  OpenAI request fields (phi4flash serve forces calls and JSON by constrained decoding); the calls that
  come back as ``delta.tool_calls`` are written into the answer text in the model's own
  ``<|tool_call|>{"name": ..., "arguments": ...}<|/tool_call|>`` format, so callers parse local and remote
  output alike.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

from .metrics import MetricsRecorder
from .protocol import Completion, GenerationConfig, Message, PromptTooLongError, StreamEvent, Usage, check_messages
from .reasoning import ReasoningSplitter
from .tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LENGTH = 65536


class RemoteEngineError(RuntimeError):
    """The server answered with an error (``status`` and the OpenAI ``error`` object), or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error or {}


def _sse_data(lines: Iterator[bytes]) -> Iterator[str]:
    """The ``data`` payloads of a server-sent-events byte stream."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        # "event:", "id:", "retry:" and ":" comments carry nothing we need
    if data:
        yield "\n".join(data)


class RemoteEngine:
    """An :class:`~phi4flash.Engine` that generates on an OpenAI-compatible server.

    Args:
        base_url: The API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: The model id to request; None asks the server (``/v1/models``) and takes the first it lists.
        api_key: Sent as ``Authorization: Bearer``.
        timeout: Seconds to wait for the connection and for each read.
        context_length: Override; by default taken from ``/v1/models`` (``max_model_len``), else 65536.
    """

    device = "remote"

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 600.0,
                 *, context_length: int | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._context_length = context_length
        self._card: dict[str, Any] | None = None
        self._tokenize_url: str | None | bool = None  # None: not probed yet; False: the server has none
        self._lock = threading.Lock()
        if model is None:
            cards = self._model_cards()
            if not cards:
                raise RemoteEngineError(f"{self.base_url}/models lists no model; pass the model id")
            model = str(cards[0]["id"])
        self.model_name = model

    def __repr__(self) -> str:
        return f"RemoteEngine({self.base_url!r}, model={self.model_name!r})"

    # -- server metadata -----------------------------------------------------------------------------------

    def _model_cards(self) -> list[dict[str, Any]]:
        """The server's ``/v1/models`` entries; raises :class:`RemoteEngineError` (unreachable, 401, ...)."""
        try:
            listing = self._request_json("GET", f"{self.base_url}/models")
        except ValueError as exc:
            raise RemoteEngineError(f"{self.base_url}/models did not answer JSON: {exc}") from None
        return [c for c in listing.get("data", []) if isinstance(c, dict) and c.get("id")]

    def _model_card(self) -> dict[str, Any]:
        with self._lock:
            if self._card is None:
                try:
                    self._card = next((c for c in self._model_cards() if c.get("id") == self.model_name), {})
                except RemoteEngineError as exc:
                    logger.warning("could not read %s/models: %s", self.base_url, exc)
                    self._card = {}
            return self._card

    def check(self) -> dict[str, Any]:
        """Ask the server for its models now and return this model's card.

        Raises:
            RemoteEngineError: The server cannot be reached, refuses the API key (``status`` 401), or does not
                list this model (the message names the ones it serves).
        """
        cards = self._model_cards()
        card = next((c for c in cards if c.get("id") == self.model_name), None)
        if card is None:
            served = ", ".join(repr(c["id"]) for c in cards) or "none"
            raise RemoteEngineError(f"{self.base_url} does not serve the model {self.model_name!r} (it serves "
                                    f"{served})", status=404)
        with self._lock:
            self._card = card
        return card

    @property
    def context_length(self) -> int:
        """The server's context length (``max_model_len`` in ``/v1/models``), else 65536."""
        if self._context_length is None:
            value = self._model_card().get("max_model_len") or self._model_card().get("context_length")
            self._context_length = int(value) if isinstance(value, int) and value > 0 else DEFAULT_CONTEXT_LENGTH
        return self._context_length

    @property
    def dtype(self) -> str:
        """The server's dtype when ``/v1/models`` says it (phi4flash does), else "unknown"."""
        return str(self._model_card().get("dtype") or "unknown")

    # -- HTTP ----------------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _open(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers=self._headers())
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)  # noqa: S310  (the user's own base_url)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            exc.close()
            try:
                error = json.loads(raw).get("error") or {}
            except (ValueError, AttributeError):
                error = {}
            if not isinstance(error, dict):
                error = {"message": str(error)}
            message = error.get("message") or raw.decode("utf-8", "replace")[:500] or exc.reason
            if exc.code in (400, 413) and (error.get("code") == "context_length_exceeded"
                                           or "context length" in str(message)):
                raise PromptTooLongError(message) from None
            raise RemoteEngineError(f"{exc.code} from {url}: {message}", status=exc.code, error=error) from None
        except (urllib.error.URLError, OSError) as exc:
            raise RemoteEngineError(f"cannot reach {url}: {exc}") from exc

    def _request_json(self, method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._open(method, url, body) as resp:
            return json.loads(resp.read())

    # -- Engine protocol -----------------------------------------------------------------------------------

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Prompt tokens of ``messages``: exact from the server's ``/tokenize``, else approximated (see module)."""
        body = {"model": self.model_name, "messages": [dict(m) for m in messages]}
        if self._tokenize_url is None:
            root = urllib.parse.urlsplit(self.base_url)
            candidates = [f"{self.base_url}/tokenize", f"{root.scheme}://{root.netloc}/tokenize"]
            for url in dict.fromkeys(candidates):
                try:
                    count = int(self._request_json("POST", url, body)["count"])
                except (RemoteEngineError, PromptTooLongError, ValueError, KeyError, TypeError):
                    continue
                self._tokenize_url = url
                return count
            logger.info("%s has no /tokenize endpoint; count_tokens approximates", self.base_url)
            self._tokenize_url = False
        if self._tokenize_url:
            return int(self._request_json("POST", str(self._tokenize_url), body)["count"])
        return sum(4 + len(str(m.get("content") or "")) // 4 for m in messages) + 2

    def _payload(self, messages: Sequence[Message], config: GenerationConfig,
                 options: dict[str, Any]) -> dict[str, Any]:
        if config.logits_processor is not None:
            raise ValueError("logits_processor cannot run on a remote server; use a LocalEngine")
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": [dict(m) for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "top_p": config.top_p,
        }
        if config.seed is not None:
            body["seed"] = config.seed
        if config.stop:
            body["stop"] = list(config.stop)
        # Extensions understood by phi4flash and vLLM; sent only when used, as OpenAI itself rejects them.
        if config.top_k:
            body["top_k"] = config.top_k
        if config.min_p:
            body["min_p"] = config.min_p
        if config.repetition_penalty != 1.0:
            body["repetition_penalty"] = config.repetition_penalty
        body.update({k: v for k, v in options.items() if v is not None})
        return body

    def stream(self, messages: Sequence[Message], config: GenerationConfig | None = None, *,
               cancel: threading.Event | None = None, tools: Sequence[dict[str, Any]] | None = None,
               tool_choice: str | dict[str, Any] | None = None,
               response_format: dict[str, Any] | None = None) -> Iterator[StreamEvent]:
        """Stream a completion from the server (see :meth:`phi4flash.Engine.stream`).

        ``tools`` (OpenAI function tools), ``tool_choice`` ("auto", "none", "required" or
        ``{"type": "function", "function": {"name": ...}}``) and ``response_format`` go into the request as
        they are; calls come back in the answer text as ``<|tool_call|>...<|/tool_call|>``.

        Raises:
            PromptTooLongError: The server reports the prompt plus ``max_new_tokens`` does not fit.
            RemoteEngineError: Any other error status, or the server cannot be reached.
            ValueError: An empty conversation or an invalid ``config`` (checked locally before sending).
        """
        check_messages(messages)
        config = (config or GenerationConfig()).validate()
        payload = self._payload(messages, config, {"tools": list(tools) if tools else None,
                                                   "tool_choice": tool_choice if tools else None,
                                                   "response_format": response_format})
        recorder = MetricsRecorder(prompt_tokens=0, context_length=self.context_length, device=self.device,
                                   dtype=self.dtype)
        # Opening here (not lazily in the generator) raises errors before the first event, as LocalEngine does.
        response = self._open("POST", f"{self.base_url}/chat/completions", payload)
        return self._events(response, recorder, cancel)

    def _events(self, response: Any, recorder: MetricsRecorder,
                cancel: threading.Event | None) -> Iterator[StreamEvent]:
        splitter: ReasoningSplitter | None = None
        calls = _ToolCallWriter()
        raw_think: bool | None = None
        usage: dict[str, Any] | None = None
        finish: str | None = None
        ended = False  # saw "data: [DONE]": the server finished the stream properly
        try:
            for data in _sse_data(iter(response.readline, b"")):
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                if data.strip() == "[DONE]":
                    ended = True
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    logger.warning("skipping a malformed event from the server: %.200s", data)
                    continue
                if "error" in chunk and not chunk.get("choices"):
                    err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
                    raise RemoteEngineError(f"error from the server mid-stream: {err.get('message')}", error=err)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    pieces: list[tuple[str, str]] = []
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                    if reasoning:
                        pieces.append(("reasoning", reasoning))
                    content = delta.get("content")
                    if content:
                        if raw_think is None:
                            # Decided once, on the first answer text: only a server without a reasoning parser
                            # starts its content with "<think>"; otherwise the text passes through untouched.
                            raw_think = not reasoning and content.lstrip().startswith("<think>")
                            splitter = ReasoningSplitter(assume_reasoning_first=False) if raw_think else None
                        pieces.extend(splitter.push(content) if splitter else [("answer", content)])
                    if delta.get("tool_calls") and (written := calls.write(delta["tool_calls"])):
                        pieces.append(("answer", written))
                    if choice.get("finish_reason") and calls.open:
                        pieces.append(("answer", calls.close()))
                    for channel, text in pieces:
                        recorder.token(channel)
                        yield StreamEvent(channel=channel, text=text, metrics=recorder.snapshot())  # type: ignore[arg-type]
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
            if splitter is not None:
                for channel, text in splitter.flush():
                    yield StreamEvent(channel=channel, text=text, metrics=recorder.snapshot())  # type: ignore[arg-type]
            if calls.open:
                yield StreamEvent(channel="answer", text=calls.close(), metrics=recorder.snapshot())
        except GeneratorExit:
            finish = "cancelled"
            raise
        finally:
            response.close()  # the server sees the disconnect and frees the request's slot
        metrics = recorder.metrics
        if usage:
            completion = int(usage.get("completion_tokens") or 0)
            details = usage.get("completion_tokens_details") or {}
            reasoning_tokens = int(details.get("reasoning_tokens") or 0) if isinstance(details, dict) else 0
            metrics.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            if completion:
                metrics.reasoning_tokens = min(reasoning_tokens, completion)
                metrics.answer_tokens = completion - metrics.reasoning_tokens
        final = recorder.finish(_finish_reason(finish, ended))
        if usage and final.completion_tokens > 1 and final.time_to_first_token_s is not None:
            decode_s = final.total_time_s - final.time_to_first_token_s
            if decode_s > 0:
                final.decode_tokens_per_s = (final.completion_tokens - 1) / decode_s
        yield StreamEvent(channel="answer", text="", metrics=final, done=True)

    def generate(self, messages: Sequence[Message], config: GenerationConfig | None = None, *,
                 cancel: threading.Event | None = None, **request_fields: Any) -> Completion:
        """Run :meth:`stream` (with its ``tools``, ``tool_choice``, ``response_format``) and return the completion."""
        reasoning: list[str] = []
        answer: list[str] = []
        final: StreamEvent | None = None
        for event in self.stream(messages, config, cancel=cancel, **request_fields):
            if event.done:
                final = event
            else:
                (reasoning if event.channel == "reasoning" else answer).append(event.text)
        assert final is not None
        m = final.metrics
        usage = Usage(prompt_tokens=m.prompt_tokens, completion_tokens=m.completion_tokens,
                      reasoning_tokens=m.reasoning_tokens, total_tokens=m.prompt_tokens + m.completion_tokens)
        return Completion(reasoning="".join(reasoning), answer="".join(answer), finish_reason=str(m.finish_reason),
                          usage=usage, metrics=m)


class _ToolCallWriter:
    """Writes OpenAI ``delta.tool_calls`` chunks as the model's own call text, as they arrive.

    A call's first chunk (with its name) opens ``<|tool_call|>{"name": ..., "arguments": ``; argument pieces
    follow as they come; the next call, the finish reason or the end of the stream closes it with ``}<|/tool_call|>``.
    """

    def __init__(self) -> None:
        self.open = False
        self._index: int | None = None
        self._arguments = ""

    def write(self, chunks: Sequence[dict[str, Any]]) -> str:
        """The text for one delta's ``tool_calls`` list."""
        out = []
        for chunk in chunks:
            function = chunk.get("function") or {}
            index = chunk.get("index", self._index)
            if function.get("name") or index != self._index:
                if self.open:
                    out.append(self.close())
                out.append(f'{TOOL_CALL_OPEN}{{"name": {json.dumps(function.get("name") or "")}, "arguments": ')
                self.open, self._index, self._arguments = True, index, ""
            self._arguments += function.get("arguments") or ""
            out.append(function.get("arguments") or "")
        return "".join(out)

    def close(self) -> str:
        """Close the open call (no argument text at all counts as ``{}``)."""
        self.open = False
        return ("{}" if not self._arguments.strip() else "") + f"}}{TOOL_CALL_CLOSE}"


def _finish_reason(reason: str | None, ended: bool) -> str:
    """Map an OpenAI finish reason to LatencyMetrics' stop | length | cancelled | error."""
    if reason in ("stop", "length", "cancelled", "error"):
        return reason
    if reason in ("tool_calls", "function_call", "content_filter"):
        return "stop"
    # No reason: a clean end of stream counts as a stop, a connection that just ended as an error.
    return "stop" if reason is None and ended else "error"
