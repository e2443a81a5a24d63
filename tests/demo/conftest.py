"""Fixtures: the embedded model's engine and the web chat launched on 127.0.0.1 around it."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

gr = pytest.importorskip("gradio", reason="the web chat needs the 'demo' extra")

import phi4flash  # noqa: E402
from phi4flash_demo import CSS, build_demo  # noqa: E402


@pytest.fixture(scope="session")
def engine() -> Any:
    """The embedded model (the same one `phi4flash demo` serves by default)."""
    return phi4flash.load("embedded")


class Paced:
    """The real engine as a larger model would feel in the browser.

    The trained embedded model answers in a fraction of a second, too fast to see a spinner or to press
    Stop. ``delay`` hands each event on that much later (the engine's own metrics are untouched);
    ``no_early_stop`` makes every generation run to its max_new_tokens (``min_new_tokens``), so that Stop
    always meets a running generation.
    """

    def __init__(self, engine: Any, *, delay: float = 0.0, no_early_stop: bool = False) -> None:
        self._engine, self._delay, self._no_early_stop = engine, delay, no_early_stop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def stream(self, messages: Any, config: Any = None, *, cancel: Any = None) -> Iterator[Any]:
        config = config or self._engine.default_config()
        if self._no_early_stop:
            config = dataclasses.replace(config, min_new_tokens=config.max_new_tokens)
        events = self._engine.stream(messages, config, cancel=cancel)

        def paced() -> Iterator[Any]:
            try:
                for event in events:
                    if self._delay and not event.done:
                        time.sleep(self._delay)
                    yield event
            finally:
                events.close()

        return paced()


def _launch(engine: Any) -> Any:
    app = build_demo(engine, concurrency_limit=2, max_queue=8)
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, css=CSS)
    return app


@pytest.fixture(scope="session")
def demo(engine: Any) -> Iterator[Any]:
    """The web chat, launched in this process on a free loopback port; two generations at once."""
    app = _launch(Paced(engine, delay=0.02))
    yield app
    app.close()


@pytest.fixture(scope="session")
def long_demo(engine: Any) -> Iterator[Any]:
    """The web chat over generations that only end at max_new_tokens (or Stop)."""
    app = _launch(Paced(engine, no_early_stop=True))
    yield app
    app.close()


@pytest.fixture(scope="session")
def long_url(long_demo: Any) -> str:
    """The long-generation chat's local URL."""
    return long_demo.local_url


@pytest.fixture(scope="session")
def url(demo: Any) -> str:
    """The chat's local URL."""
    return demo.local_url
