"""RemoteEngine over HTTP: against our own server (same greedy text as the local engine) and a bare
OpenAI-style server (raw <think> text, no usage, no /tokenize, no max_model_len)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server side of this test needs the 'serve' extra")

import httpx  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402
from server.server_helpers import endless_server  # noqa: E402  (tests/server)

import phi4flash  # noqa: E402
from phi4flash import Engine, GenerationConfig, PromptTooLongError  # noqa: E402
from phi4flash.remote import DEFAULT_CONTEXT_LENGTH, RemoteEngine, RemoteEngineError  # noqa: E402
from phi4flash.server.app import create_app, serve_in_background  # noqa: E402

KEY = "remote-key"
MESSAGES = [{"role": "user", "content": "Name a prime number."}]


@pytest.fixture(scope="module")
def engine() -> Any:
    return phi4flash.load(os.environ.get("PHI4FLASH_TEST_SOURCE", "embedded"), max_batch=4)


@pytest.fixture(scope="module")
def server(engine: Any) -> Iterator[str]:
    with serve_in_background(create_app(engine, api_key=KEY)) as url:
        yield url


@pytest.fixture
def remote(server: str, engine: Any) -> RemoteEngine:
    return RemoteEngine(f"{server}/v1", engine.model_name, api_key=KEY, timeout=60)


def test_same_greedy_completion_as_local(remote: RemoteEngine, engine: Any) -> None:
    config = GenerationConfig(temperature=0.0, max_new_tokens=12)
    local = engine.generate(MESSAGES, config)
    got = remote.generate(MESSAGES, config)
    assert (got.reasoning, got.answer) == (local.reasoning, local.answer)
    assert got.finish_reason == local.finish_reason
    assert got.usage == local.usage
    assert got.metrics.time_to_first_token_s is not None and got.metrics.time_to_first_token_s > 0
    assert got.metrics.finish_reason == local.finish_reason


def test_stream_events_follow_the_protocol(remote: RemoteEngine, engine: Any) -> None:
    config = GenerationConfig(temperature=0.0, max_new_tokens=8)
    local = [e for e in engine.stream(MESSAGES, config) if not e.done]
    events = list(remote.stream(MESSAGES, config))
    *body, last = events
    assert last.done and last.text == "" and not any(e.done for e in body)
    assert "".join(e.text for e in body if e.channel == "reasoning") == "".join(
        e.text for e in local if e.channel == "reasoning")
    assert "".join(e.text for e in body if e.channel == "answer") == "".join(
        e.text for e in local if e.channel == "answer")
    m = last.metrics
    assert m.prompt_tokens == engine.count_tokens(MESSAGES)
    assert m.device == "remote" and m.context_length == engine.context_length
    assert m.total_time_s >= (m.time_to_first_token_s or 0) > 0


def test_protocol_attributes_and_count_tokens(remote: RemoteEngine, engine: Any) -> None:
    assert isinstance(remote, Engine)
    assert remote.model_name == engine.model_name
    assert remote.device == "remote"
    assert remote.dtype == engine.dtype
    assert remote.context_length == engine.context_length
    assert remote.count_tokens(MESSAGES) == engine.count_tokens(MESSAGES)


def test_prompt_too_long_and_bad_config(remote: RemoteEngine, engine: Any) -> None:
    with pytest.raises(PromptTooLongError):
        remote.generate(MESSAGES, GenerationConfig(max_new_tokens=engine.context_length))
    with pytest.raises(ValueError, match="top_p"):
        remote.generate(MESSAGES, GenerationConfig(top_p=2.0))
    with pytest.raises(ValueError, match="empty conversation"):
        remote.generate([])


def test_without_a_model_id_the_servers_model_is_used_and_check_names_problems(server: str, engine: Any) -> None:
    remote = RemoteEngine(f"{server}/v1", api_key=KEY)
    assert remote.model_name == engine.model_name
    assert remote.check()["dtype"] == engine.dtype and remote.dtype == engine.dtype
    with pytest.raises(RemoteEngineError) as e:
        RemoteEngine(f"{server}/v1", engine.model_name).check()  # no key
    assert e.value.status == 401
    with pytest.raises(RemoteEngineError, match=f"does not serve the model 'other'.*'{engine.model_name}'"):
        RemoteEngine(f"{server}/v1", "other", api_key=KEY).check()
    with pytest.raises(RemoteEngineError) as e:
        RemoteEngine(f"{server}/v1", api_key="wrong")
    assert e.value.status == 401


ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


def test_tools_and_response_format_pass_through(remote: RemoteEngine) -> None:
    from phi4flash.tools import parse_tool_calls

    config = GenerationConfig(temperature=0.0, max_new_tokens=64)
    question = [{"role": "user", "content": "What is 25 + 17?"}]
    done = remote.generate(question, config, tools=[ADD], tool_choice="required")
    text, calls, invalid = parse_tool_calls(done.answer)
    assert [c.name for c in calls] == ["add"] and not invalid, done.answer
    assert set(calls[0].arguments) == {"a", "b"} and all(isinstance(v, int) for v in calls[0].arguments.values())
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    done = remote.generate(question, config, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema}})
    assert isinstance(json.loads(done.answer)["x"], int)


def test_server_errors_are_raised(server: str, engine: Any) -> None:
    with pytest.raises(RemoteEngineError) as e:
        RemoteEngine(f"{server}/v1", engine.model_name, api_key="wrong").generate(MESSAGES)
    assert e.value.status == 401 and e.value.error["code"] == "invalid_api_key"
    with pytest.raises(RemoteEngineError) as e:
        RemoteEngine(f"{server}/v1", "other-model", api_key=KEY).generate(MESSAGES)
    assert e.value.status == 404
    with pytest.raises(RemoteEngineError, match="cannot reach"):
        RemoteEngine("http://127.0.0.1:9/v1", "m", timeout=5).generate(MESSAGES)


def test_closing_the_stream_cancels_on_the_server(engine: Any) -> None:
    def metric(url: str, name: str) -> float:
        text = httpx.get(f"{url}/metrics").text
        return float(next((line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")), "0"))

    with endless_server(engine) as url:  # stop tokens forbidden: the request runs until cancelled
        remote = RemoteEngine(f"{url}/v1", engine.model_name, timeout=60)
        stream = remote.stream(MESSAGES, GenerationConfig(temperature=0.0, max_new_tokens=2000))
        first = next(stream)
        assert not first.done
        assert engine.stats()["running"] == 1
        stream.close()
        deadline = time.monotonic() + 5
        while metric(url, "phi4flash_requests_in_flight") != 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metric(url, "phi4flash_requests_in_flight") == 0
        assert metric(url, 'phi4flash_completions_total{finish_reason="cancelled"}') == 1
        assert metric(url, "phi4flash_completion_tokens_total") < 1000
    assert engine.stats()["running"] == 0


def test_cancel_event_stops_the_stream(engine: Any) -> None:
    cancel = threading.Event()
    with endless_server(engine) as url:
        remote = RemoteEngine(f"{url}/v1", engine.model_name, timeout=60)
        events = []
        for event in remote.stream(MESSAGES, GenerationConfig(temperature=0.0, max_new_tokens=2000), cancel=cancel):
            events.append(event)
            cancel.set()
    assert events[-1].done and events[-1].metrics.finish_reason == "cancelled"
    assert len(events) == 2


# A bare OpenAI-style server: sends the raw "<think>...</think>" text in content, no usage, no /tokenize,
# and no max_model_len (what a plain vLLM build without a reasoning parser looks like).

PIECES = ["<think>", "Let me", " think.", "</", "think>", "\n\nThe answer", " is 7."]


def _bare_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "bare", "object": "model", "owned_by": "x"}]}

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        async def body() -> Any:
            for piece in PIECES:
                chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            end = {"id": "c", "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {}, "finish_reason": "length"}]}
            yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    return app


def test_bare_openai_server_fallbacks() -> None:
    with serve_in_background(_bare_app()) as url:
        remote = RemoteEngine(f"{url}/v1", "bare")
        assert remote.context_length == DEFAULT_CONTEXT_LENGTH
        assert remote.dtype == "unknown"
        approx = remote.count_tokens(MESSAGES)
        assert 0 < approx < 40
        done = remote.generate(MESSAGES, GenerationConfig(max_new_tokens=16))
    assert done.reasoning == "Let me think."
    assert done.answer == "The answer is 7."
    assert done.finish_reason == "length"
    assert done.usage.completion_tokens > 0  # counted from the chunks, as the server sent no usage
