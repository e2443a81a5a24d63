"""The official OpenAI client against the server: completions, streaming, models, metrics, tokenize."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from phi4flash import GenerationConfig

from .server_helpers import API_KEY, scrape

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 3?"}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def expected(engine: Any) -> Any:
    """The same request's greedy completion from the engine directly."""
    return engine.generate(MESSAGES, GenerationConfig(temperature=0.0, max_new_tokens=MAX_TOKENS))


def test_non_streaming_matches_engine(client: Any, model_id: str, engine: Any, expected: Any) -> None:
    r = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model_id
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.answer
    assert (getattr(choice.message, "reasoning_content", None) or "") == expected.reasoning
    assert choice.finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == engine.count_tokens(MESSAGES) == expected.usage.prompt_tokens
    assert r.usage.completion_tokens == expected.usage.completion_tokens
    assert r.usage.completion_tokens_details.reasoning_tokens == expected.usage.reasoning_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_completion_tokens_is_max_tokens(client: Any, model_id: str, engine: Any) -> None:
    r = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_completion_tokens=3)
    assert r.usage.completion_tokens <= 3
    alone = engine.generate(MESSAGES, GenerationConfig(temperature=0.0, max_new_tokens=3))
    assert r.choices[0].finish_reason == alone.finish_reason
    assert r.usage.completion_tokens == alone.usage.completion_tokens


def test_streaming_with_usage(client: Any, model_id: str, expected: Any) -> None:
    chunks = list(client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0,
                                                 max_tokens=MAX_TOKENS, stream=True,
                                                 stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last_choice, usage_chunk = chunks
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in body)
    answer = "".join(c.choices[0].delta.content or "" for c in body)
    assert reasoning == expected.reasoning
    assert answer == expected.answer
    assert all(c.choices[0].finish_reason is None for c in body)
    assert last_choice.choices[0].finish_reason == expected.finish_reason
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == expected.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == expected.usage.prompt_tokens
    assert usage_chunk.usage.completion_tokens_details.reasoning_tokens == expected.usage.reasoning_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_usage_ends_with_done(server: str, model_id: str) -> None:
    body = {"model": model_id, "messages": MESSAGES, "temperature": 0, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert '"usage"' not in "".join(data)


def test_seed_makes_sampling_reproducible(client: Any, model_id: str) -> None:
    def sample() -> str:
        r = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=1.0, top_p=1.0,
                                           max_tokens=8, seed=1234)
        return (getattr(r.choices[0].message, "reasoning_content", None) or "") + (r.choices[0].message.content or "")

    assert sample() == sample()


def test_models(client: Any, model_id: str, engine: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model_id]
    assert models.data[0].max_model_len == engine.context_length
    assert client.models.retrieve(model_id).id == model_id


def test_health(server: str) -> None:
    r = httpx.get(f"{server}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_tokenize_matches_engine(server: str, model_id: str, engine: Any) -> None:
    r = httpx.post(f"{server}/v1/tokenize", json={"model": model_id, "messages": MESSAGES},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200
    assert r.json() == {"count": engine.count_tokens(MESSAGES), "max_model_len": engine.context_length}


def test_metrics_parse_and_count(client: Any, server: str, model_id: str) -> None:
    before = scrape(server)
    client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_tokens=4)
    after = scrape(server)
    assert after["phi4flash_requests_total{status=200}"] == before.get("phi4flash_requests_total{status=200}", 0) + 1
    assert after["phi4flash_time_to_first_token_seconds_count"] >= 1
    assert after["phi4flash_completion_tokens_total"] > before.get("phi4flash_completion_tokens_total", 0)
    assert after["phi4flash_prompt_tokens_total"] > before.get("phi4flash_prompt_tokens_total", 0)
    assert "phi4flash_decode_tokens_per_second_count" in after
    assert "phi4flash_request_duration_seconds_count" in after
    assert after["phi4flash_requests_in_flight"] == 0
    # engine.stats(): nothing queued or running once the request has finished
    assert after["phi4flash_queue_depth"] == 0
    assert after["phi4flash_batch_size"] == 0


def test_openapi_lists_the_request_models(server: str) -> None:
    spec = httpx.get(f"{server}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("ChatCompletionRequest", "ChatMessage", "ToolDefinition", "ResponseFormat", "TokenizeRequest"):
        assert name in schemas, sorted(schemas)
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/ChatCompletionRequest")
    assert schemas["ChatMessage"]["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant", "tool"]
    assert httpx.get(f"{server}/docs").status_code == 200
