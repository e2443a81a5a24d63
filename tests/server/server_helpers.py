"""Helpers shared by the server tests (a unique module name, so it never collides with other conftests)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "test-key-123"
# The checkpoint the server tests serve: the embedded model unless PHI4FLASH_TEST_SOURCE names another
# (a folder or hub id), e.g. to run the same tests against a real checkpoint.
MODEL_SOURCE = os.environ.get("PHI4FLASH_TEST_SOURCE", "embedded")


def scrape(server: str) -> dict[str, float]:
    """/metrics parsed with prometheus_client's parser: {sample name{labels}: value}."""
    text = httpx.get(f"{server}/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return bool(value)
        time.sleep(interval)


class GatedEngine:
    """The real engine, but each stream waits for ``gate`` before its first event.

    Lets a test hold requests in flight deterministically (to fill the admission queue) without
    depending on how long the model happens to generate.
    """

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.gate = threading.Event()
        self.model_name = engine.model_name
        self.device = engine.device
        self.dtype = engine.dtype
        self.context_length = engine.context_length

    def count_tokens(self, messages: Any) -> int:
        return self._engine.count_tokens(messages)

    def stream(self, messages: Any, config: Any = None, *, cancel: threading.Event | None = None) -> Iterator[Any]:
        self.gate.wait(60)
        return self._engine.stream(messages, config, cancel=cancel)

    def generate(self, messages: Any, config: Any = None, *, cancel: threading.Event | None = None) -> Any:
        return self._engine.generate(messages, config, cancel=cancel)


class EndlessEngine:
    """The real engine with its stop tokens forbidden (through ``GenerationConfig.logits_processor``).

    Every request then runs until ``max_tokens`` whatever the model would say, so a test can disconnect
    mid-generation knowing the request is still running in the engine's batch.
    """

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.model_name = engine.model_name
        self.device = engine.device
        self.dtype = engine.dtype
        self.context_length = engine.context_length
        self._banned = sorted(engine.stop_token_ids)

    def stats(self) -> dict[str, Any]:
        return self._engine.stats()

    def count_tokens(self, messages: Any) -> int:
        return self._engine.count_tokens(messages)

    def _ban(self, generated: Any, logits: Any) -> Any:
        logits = logits.clone()
        logits[self._banned] = float("-inf")
        return logits

    def stream(self, messages: Any, config: Any = None, *, cancel: threading.Event | None = None) -> Iterator[Any]:
        import dataclasses

        config = dataclasses.replace(config, logits_processor=self._ban)
        return self._engine.stream(messages, config, cancel=cancel)

    def generate(self, messages: Any, config: Any = None, *, cancel: threading.Event | None = None) -> Any:
        raise NotImplementedError("only stream() is used by the server")


@contextlib.contextmanager
def endless_server(engine: Any) -> Iterator[str]:
    """A server (no API key) over :class:`EndlessEngine`; yields its base URL."""
    from phi4flash.server.app import create_app, serve_in_background

    with serve_in_background(create_app(EndlessEngine(engine))) as url:
        yield url
