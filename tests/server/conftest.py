"""Fixtures: the embedded model's engine and a real uvicorn server on 127.0.0.1 serving it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra")

import httpx  # noqa: E402

import phi4flash  # noqa: E402
from phi4flash.server.app import create_app, serve_in_background  # noqa: E402

from .server_helpers import API_KEY, MODEL_SOURCE  # noqa: E402

MAX_BATCH = 16


@pytest.fixture(scope="session")
def engine() -> Any:
    """The embedded model, batching up to 16 requests."""
    return phi4flash.load(MODEL_SOURCE, max_batch=MAX_BATCH)


@pytest.fixture(scope="session")
def server(engine: Any) -> Iterator[str]:
    """Base URL (no /v1) of a uvicorn server on a free loopback port, requiring API_KEY."""
    app = create_app(engine, api_key=API_KEY, max_queue=48)
    with serve_in_background(app) as url:
        yield url


@pytest.fixture(scope="session")
def model_id(server: str) -> str:
    """The id the server lists in /v1/models."""
    r = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    r.raise_for_status()
    return r.json()["data"][0]["id"]


@pytest.fixture
def client(server: str) -> Any:
    """The official OpenAI client pointed at the server."""
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


