"""Many concurrent streams through the batching engine, and cancellation when a client goes away."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest

from phi4flash import GenerationConfig

from .server_helpers import API_KEY, endless_server, scrape, wait_until

N_STREAMS = 16
MAX_TOKENS = 10


def conversation(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Request {i}: what is {i} times {i + 3}?"}]


def test_16_concurrent_streams_match_sequential_greedy(server: str, model_id: str, engine: Any) -> None:
    openai = pytest.importorskip("openai")
    config = GenerationConfig(temperature=0.0, max_new_tokens=MAX_TOKENS)
    alone = [engine.generate(conversation(i), config) for i in range(N_STREAMS)]

    peak = {"running": 0}
    stop = threading.Event()

    def watch() -> None:  # did the engine really batch them?
        while not stop.is_set():
            peak["running"] = max(peak["running"], engine.stats()["running"])
            stop.wait(0.005)

    async def one(client: Any, i: int) -> tuple[str, str, str | None, Any]:
        reasoning, answer, finish, usage = [], [], None, None
        stream = await client.chat.completions.create(model=model_id, messages=conversation(i), temperature=0,
                                                      max_tokens=MAX_TOKENS, stream=True,
                                                      stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
                answer.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        return "".join(reasoning), "".join(answer), finish, usage

    async def main() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=300) as c:
            return await asyncio.gather(*(one(c, i) for i in range(N_STREAMS)))

    before = scrape(server).get("phi4flash_requests_total{status=200}", 0)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        results = asyncio.run(main())
    finally:
        stop.set()
        watcher.join()
    assert len(results) == N_STREAMS
    for i, (reasoning, answer, finish, usage) in enumerate(results):
        assert (reasoning, answer) == (alone[i].reasoning, alone[i].answer), f"stream {i} differs from alone"
        assert finish == alone[i].finish_reason
        assert usage.completion_tokens == alone[i].usage.completion_tokens
    metrics = scrape(server)
    assert metrics["phi4flash_requests_total{status=200}"] == before + N_STREAMS
    assert metrics["phi4flash_requests_in_flight"] == 0
    assert peak["running"] > 1, "the requests never shared a decode batch"


LONG = 2000  # never reached: the client goes away first


def test_client_disconnect_frees_the_slot(engine: Any) -> None:
    with endless_server(engine) as url:
        body = {"messages": conversation(99), "temperature": 0, "stream": True,
                "max_tokens": min(LONG, engine.context_length // 2)}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept referenced: dropping a broken-off httpx line iterator closes the response
            received = 0
            for line in lines:
                if line.startswith("data: ") and ('"content"' in line or "reasoning_content" in line):
                    received += 1
                    if received == 3:
                        break
            assert engine.stats()["running"] == 1
            assert scrape(url)["phi4flash_batch_size"] == 1
        # Leaving the block closed the connection: the server must cancel the request and free its slot at once.
        assert wait_until(lambda: scrape(url)["phi4flash_requests_in_flight"] == 0, timeout=5)
        assert wait_until(lambda: engine.stats()["running"] == 0, timeout=5)
        metrics = scrape(url)
        assert metrics["phi4flash_completions_total{finish_reason=cancelled}"] == 1
        assert metrics["phi4flash_completion_tokens_total"] < LONG / 2
        assert metrics["phi4flash_batch_size"] == 0


def test_non_streaming_client_disconnect_cancels(engine: Any) -> None:
    with endless_server(engine) as url:
        body = {"messages": conversation(98), "temperature": 0, "max_tokens": min(LONG, engine.context_length // 2)}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(5.0, read=1.0))
        assert wait_until(lambda: scrape(url)["phi4flash_requests_in_flight"] == 0, timeout=5)
        assert wait_until(lambda: engine.stats()["running"] == 0, timeout=5)
        metrics = scrape(url)
        assert metrics["phi4flash_completions_total{finish_reason=cancelled}"] == 1
        assert metrics["phi4flash_completion_tokens_total"] < LONG / 2
