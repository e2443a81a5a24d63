"""Fixtures: the embedded model's engine and the web chat launched on 127.0.0.1 around it."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def demo(engine: Any) -> Iterator[Any]:
    """The web chat, launched in this process on a free loopback port; two generations at once."""
    app = build_demo(engine, concurrency_limit=2, max_queue=8)
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, css=CSS)
    yield app
    app.close()


@pytest.fixture(scope="session")
def url(demo: Any) -> str:
    """The chat's local URL."""
    return demo.local_url
