"""The server's moving parts: its state (engine, loading, admission), Prometheus metrics, and the per-request
job that runs ``engine.stream`` on a thread of its own and hands its events to the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from phi4flash import Engine, GenerationConfig, StreamEvent

from .api_models import APIError

logger = logging.getLogger(__name__)

# Names of engine.stats() entries that mean "waiting for a batch slot" and "in the running batch".
_QUEUE_KEYS = ("queue_depth", "waiting", "queued", "pending")
_BATCH_KEYS = ("batch_size", "running", "active")

# ----------------------------------------------------------------------------------------------------------
# Metrics


class _EngineStatsCollector:
    """Exposes ``engine.stats()`` (when the engine has it) as gauges at scrape time."""

    def __init__(self, state: ServerState) -> None:
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
    def __init__(self, state: ServerState) -> None:
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


class ServerState:
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

    def admit(self) -> Slot:
        with self._lock:
            if self.in_flight >= self.max_queue:
                raise APIError(429, f"The server is at capacity ({self.max_queue} requests in flight); retry later.",
                               type="rate_limit_error", code="queue_full")
            self.in_flight += 1
        return Slot(self)

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1


class Slot:
    """One admitted request; ``release`` is idempotent and thread-safe."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._state.release()


END = object()


class Job:
    """Runs ``engine.stream`` on a thread of its own and hands its events to the event loop."""

    def __init__(self, state: ServerState, engine: Engine, messages: list[dict[str, Any]], config: GenerationConfig,
                 slot: Slot, started: float) -> None:
        self.state = state
        self.engine = engine
        self.messages = messages
        self.config = config
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
            iterator = self.engine.stream(self.messages, self.config, cancel=self.cancel)
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
            # Metrics first, then the slot, then the end marker: whoever sees END sees them all.
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
            self._put(END)

    async def next(self, disconnected: asyncio.Future[Any] | None = None) -> Any:
        """The next event, exception or ``END``; ``END`` (after cancelling) if the client went away first."""
        if disconnected is None:
            return await self.queue.get()
        getter = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({getter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        self.abort()
        return END


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
