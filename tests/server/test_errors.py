"""Bad input gets an OpenAI error object with the right status, never a stack trace; the server keeps serving."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from phi4flash.server.app import create_app, serve_in_background

from .server_helpers import API_KEY, GatedEngine, scrape, wait_until

AUTH = {"Authorization": f"Bearer {API_KEY}"}
USER = [{"role": "user", "content": "Hi"}]


def assert_error(r: httpx.Response, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def assert_still_serving(server: str, model_id: str) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", headers=AUTH, timeout=60,
                   json={"model": model_id, "messages": USER, "temperature": 0, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 1


def good(model_id: str, **fields: Any) -> dict[str, Any]:
    return {"model": model_id, "messages": USER, "max_tokens": 2, **fields}


BAD_REQUESTS: list[tuple[str, Callable[[str, int], Any], int, str | None]] = [
    # (name, body(model_id, context_length) -> JSON value or raw bytes, status, param)
    ("malformed json", lambda m, c: b'{"model": "x", "messages": [', 400, None),
    ("not utf-8", lambda m, c: b"\xff\xfe{}", 400, None),
    ("body not an object", lambda m, c: [1, 2], 400, None),
    ("no messages", lambda m, c: {"model": m}, 400, "messages"),
    ("empty messages", lambda m, c: {"model": m, "messages": []}, 400, "messages"),
    ("messages not a list", lambda m, c: {"model": m, "messages": "Hi"}, 400, "messages"),
    ("message not an object", lambda m, c: {"model": m, "messages": ["Hi"]}, 400, "messages[0]"),
    ("unknown role", lambda m, c: {"model": m, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("content wrong type", lambda m, c: {"model": m, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("image content part", lambda m, c: {"model": m, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content"),
    ("model wrong type", lambda m, c: {**good(m), "model": 7}, 400, "model"),
    ("temperature string", lambda m, c: good(m, temperature="hot"), 400, "temperature"),
    ("temperature negative", lambda m, c: good(m, temperature=-1), 400, "temperature"),
    ("top_p zero", lambda m, c: good(m, top_p=0), 400, "top_p"),
    ("top_p above one", lambda m, c: good(m, top_p=1.5), 400, "top_p"),
    ("top_k negative", lambda m, c: good(m, top_k=-3), 400, "top_k"),
    ("max_tokens zero", lambda m, c: good(m, max_tokens=0), 400, "max_tokens"),
    ("max_tokens string", lambda m, c: good(m, max_tokens="ten"), 400, "max_tokens"),
    ("max_tokens float", lambda m, c: good(m, max_tokens=2.5), 400, "max_tokens"),
    ("max_completion_tokens zero", lambda m, c: {**good(m), "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("max_tokens beyond context", lambda m, c: good(m, max_tokens=c), 400, "max_tokens"),
    ("n=2", lambda m, c: good(m, n=2), 400, "n"),
    ("stream not bool", lambda m, c: good(m, stream="yes"), 400, "stream"),
    ("stream_options without stream", lambda m, c: good(m, stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("stop wrong type", lambda m, c: good(m, stop=[1]), 400, "stop"),
    ("stop empty string", lambda m, c: good(m, stop=[""]), 400, "stop"),
    ("seed negative", lambda m, c: good(m, seed=-1), 400, "seed"),
    ("seed string", lambda m, c: good(m, seed="1"), 400, "seed"),
    ("logprobs", lambda m, c: good(m, logprobs=True), 400, "logprobs"),
    ("presence_penalty", lambda m, c: good(m, presence_penalty=0.5), 400, "presence_penalty"),
    ("unknown response_format", lambda m, c: good(m, response_format={"type": "yaml"}), 400,
     "response_format.type"),
    ("json_schema without a schema", lambda m, c: good(m, response_format={"type": "json_schema", "json_schema": 3}),
     400, "response_format.json_schema"),
    ("tool_choice naming no tool", lambda m, c: good(m, tools=[{"type": "function", "function": {"name": "f"}}],
                                                       tool_choice={"type": "function", "function": {"name": "g"}}),
     400, "tool_choice"),
    ("unknown model", lambda m, c: good("no-such-model"), 404, "model"),
    ("prompt beyond context", lambda m, c: {"model": m, "messages": [{"role": "user", "content": "hi " * (2 * c)}]},
     413, "messages"),
    ("body too large", lambda m, c: {"model": m, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}, 413,
     None),
]


@pytest.mark.parametrize(("name", "make", "status", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request(server: str, model_id: str, engine: Any, name: str, make: Callable[[str, int], Any],
                     status: int, param: str | None) -> None:
    body = make(model_id, engine.context_length)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server}/v1/chat/completions", content=content, timeout=60,
                   headers={**AUTH, "Content-Type": "application/json"})
    error = assert_error(r, status, param=param)
    if "context" in name:
        assert error["code"] == "context_length_exceeded"
    assert_still_serving(server, model_id)


@pytest.mark.parametrize("stream", [False, True])
def test_errors_come_before_the_stream_starts(server: str, model_id: str, engine: Any, stream: bool) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", headers=AUTH, timeout=60,
                   json=good(model_id, stream=stream, max_tokens=engine.context_length))
    assert_error(r, 400, param="max_tokens", code="context_length_exceeded")


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic dGVzdA==", f"Bearer {API_KEY}x"])
def test_wrong_api_key(server: str, model_id: str, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    for method, path, body in [("POST", "/v1/chat/completions", good(model_id)), ("GET", "/v1/models", None)]:
        r = httpx.request(method, f"{server}{path}", json=body, headers=headers)
        assert_error(r, 401, code="invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
    assert_still_serving(server, model_id)


def test_openai_client_raises_typed_errors(client: Any, model_id: str) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[], max_tokens=2)
    assert e.value.status_code == 400 and e.value.param == "messages"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=USER, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=USER, max_tokens=2, temperature=-0.5)
    assert e.value.param == "temperature"


def test_unknown_route_and_method(server: str) -> None:
    assert_error(httpx.get(f"{server}/v1/nothing-here"), 404)
    assert_error(httpx.get(f"{server}/v1/chat/completions", headers=AUTH), 405)


def test_queue_full_gets_429_then_recovers(engine: Any) -> None:
    gated = GatedEngine(engine)
    app = create_app(gated, max_queue=2)
    body = {"messages": USER, "temperature": 0, "max_tokens": 2}
    with serve_in_background(app) as url:
        results: list[int] = []

        def send() -> None:
            results.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code)

        held = [threading.Thread(target=send) for _ in range(2)]
        for t in held:
            t.start()
        assert wait_until(lambda: scrape(url)["phi4flash_requests_in_flight"] == 2)
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert_error(r, 429, code="queue_full")
        gated.gate.set()
        for t in held:
            t.join(60)
        assert results == [200, 200]
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        metrics = scrape(url)
        assert metrics["phi4flash_requests_total{status=429}"] == 1
        assert metrics["phi4flash_requests_in_flight"] == 0


def test_503_while_loading_then_serves(engine: Any) -> None:
    release = threading.Event()

    def loader() -> Any:
        release.wait(60)
        return engine

    app = create_app(loader, model_name="late-model")
    with serve_in_background(app) as url:
        assert httpx.get(f"{url}/health").status_code == 503
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": USER, "max_tokens": 1})
        assert_error(r, 503, code="model_loading")
        release.set()
        assert wait_until(lambda: httpx.get(f"{url}/health").status_code == 200)
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "late-model", "messages": USER, "max_tokens": 1})
        assert r.status_code == 200, r.text


def test_failed_load_is_503_not_a_crash() -> None:
    def loader() -> Any:
        raise FileNotFoundError("no checkpoint at /nowhere")

    with serve_in_background(create_app(loader)) as url:
        assert wait_until(lambda: httpx.get(f"{url}/health").json()["status"] == "failed")
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": USER})
        error = assert_error(r, 503, code="model_load_failed")
        assert "no checkpoint" in error["message"]
