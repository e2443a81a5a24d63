"""The web chat driven through gradio_client against a launched app serving the embedded model."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from demo_helpers import answers, number, parse_stats, title

gradio_client = pytest.importorskip("gradio_client")

from phi4flash_demo.app import ERROR_TITLE, EXAMPLES, history_to_messages  # noqa: E402

# message, system prompt, temperature, top p, max new tokens, seed (the /chat API's order)
GREEDY_SHORT = ("", 0.0, 0.95, 96, 0)


def _stream(client: Any, message: str, settings: tuple = GREEDY_SHORT) -> list[tuple[list[dict], str]]:
    job = client.submit(message, *settings, api_name="/chat")
    updates = list(job)
    assert updates, "the chat yielded nothing"
    return updates


def _wait_idle(demo: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while demo.phi4flash_runtime.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert demo.phi4flash_runtime.active == 0, "a generation is still running"


def test_streamed_answer_with_reasoning_and_metrics(url: str, engine: Any, demo: Any) -> None:
    client = gradio_client.Client(url, verbose=False)
    try:
        updates = _stream(client, EXAMPLES[0])
    finally:
        client.close()
    messages, stats_html = updates[-1]
    stats = parse_stats(stats_html)

    # Streamed: more than the final update, and the live thought had a spinner.
    assert len(updates) >= 2
    assert any(m.get("metadata", {}).get("status") == "pending" for msgs, _ in updates[:-1] for m in msgs)

    # Every number comes from the engine: check they agree with each other and with the tokenizer.
    assert stats["finish"] in ("stop", "length"), stats
    assert stats["phase"] == f"done ({stats['finish']})"
    prompt = number(stats["prompt"])
    assert prompt == engine.count_tokens([{"role": "user", "content": EXAMPLES[0]}])
    reasoning, answer = number(stats["reasoning"]), number(stats["answer"])
    assert 0 < reasoning + answer <= 96
    used, _, total = stats["context"].partition(" / ")
    assert number(used) == prompt + reasoning + answer and total
    assert number(stats["ttft"]) > 0 and number(stats["decode"]) > 0 and number(stats["total"]) > 0
    assert number(stats["prefill"]) > 0
    assert stats["device"].startswith(engine.device) and engine.dtype in stats["device"]

    # The reasoning block: collapsed ("done") with its token count in the title.
    thought = messages[0]
    assert title(thought).startswith("Thought"), messages
    assert thought["metadata"]["status"] == "done"
    assert f"{int(reasoning):,} tokens" in title(thought)
    assert reasoning > 0
    if stats["finish"] == "stop":
        assert answers(messages) and answers(messages)[0].strip()


def test_stop_cancels_the_engine_and_the_next_message_works(long_url: str, engine: Any, long_demo: Any) -> None:
    runtime, demo = long_demo.phi4flash_runtime, long_demo
    client = gradio_client.Client(long_url, verbose=False)
    try:
        for seed in (1, 2, 3):  # a trained model may finish before we press Stop: try another sample
            _wait_idle(demo)
            done_before = len(runtime.finished)
            job = client.submit(EXAMPLES[1], "", 1.0, 1.0, 4096, seed, api_name="/chat")
            deadline = time.monotonic() + 30
            while not runtime.active and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)  # let it decode a little
            job.cancel()
            _wait_idle(demo, timeout=5.0)  # the engine ended the generation, it did not run to 4096 tokens
            final = runtime.finished[-1]
            assert len(runtime.finished) == done_before + 1
            if final.finish_reason == "cancelled":
                break
            client.reset_session()
        assert final.finish_reason == "cancelled", "every sample finished before Stop"
        assert final.completion_tokens < 4096

        client.reset_session()
        start = time.monotonic()
        messages, stats_html = client.predict("What is 2 + 3?", "", 0.0, 0.95, 32, 0, api_name="/chat")
        assert time.monotonic() - start < 60
        stats = parse_stats(stats_html)
        assert stats["finish"] in ("stop", "length")
        assert number(stats["prompt"]) == engine.count_tokens([{"role": "user", "content": "What is 2 + 3?"}])
        assert messages and not any(title(m) == ERROR_TITLE for m in messages)
    finally:
        client.close()


def test_two_clients_at_once_keep_their_own_conversations(url: str, engine: Any, demo: Any) -> None:
    questions = {"a": EXAMPLES[0], "b": EXAMPLES[1]}
    clients = {k: gradio_client.Client(url, verbose=False) for k in questions}
    results: dict[str, Any] = {}
    errors: list[BaseException] = []
    active_seen: list[int] = []

    def turn(key: str, message: str, history: list[dict]) -> None:
        try:
            updates = _stream(clients[key], message, ("", 0.0, 0.95, 256, 0))
            results[key] = (history + [{"role": "user", "content": message}] + updates[-1][0], updates[-1][1])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def both(messages: dict[str, str], histories: dict[str, list[dict]]) -> None:
        threads = [threading.Thread(target=turn, args=(k, messages[k], histories[k])) for k in messages]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            active_seen.append(demo.phi4flash_runtime.active)
            time.sleep(0.02)
        assert not errors, errors

    try:
        both(questions, {"a": [], "b": []})
        first = dict(results)
        for key, question in questions.items():
            stats = parse_stats(first[key][1])
            assert number(stats["prompt"]) == engine.count_tokens([{"role": "user", "content": question}])
        # The follow-up of each client is prompted with its own conversation only.
        follow = {"a": "Check the roots.", "b": "Check the total."}
        both(follow, {k: first[k][0] for k in questions})
        for key in questions:
            history, stats_html = results[key]
            expected = history_to_messages(first[key][0]) + [{"role": "user", "content": follow[key]}]
            assert number(parse_stats(stats_html)["prompt"]) == engine.count_tokens(expected), key
    finally:
        for c in clients.values():
            c.close()
    assert max(active_seen) == 2, "the two chats did not run at the same time"


def test_bad_input_gets_a_clear_message(url: str, engine: Any) -> None:
    client = gradio_client.Client(url, verbose=False)
    try:
        messages, _ = client.predict("   ", *GREEDY_SHORT, api_name="/chat")
        assert title(messages[0]) == ERROR_TITLE and "empty" in messages[0]["content"]

        client.reset_session()
        too_long = "hello " * (engine.context_length + 16)
        messages, _ = client.predict(too_long, *GREEDY_SHORT, api_name="/chat")
        assert title(messages[0]) == ERROR_TITLE
        text = messages[0]["content"]
        assert "too long" in text and "Traceback" not in text
        assert text.lower().count("shorten") == 1 and text.count("earlier turns") == 1, text  # the advice once
    finally:
        client.close()


def test_the_chat_api_needs_only_the_message(url: str, engine: Any) -> None:
    """Every setting has a default, the system prompt included."""
    client = gradio_client.Client(url, verbose=False)
    try:
        messages, stats_html = client.predict("What is 2 + 3?", api_name="/chat")
    finally:
        client.close()
    assert parse_stats(stats_html)["finish"] in ("stop", "length")
    assert number(parse_stats(stats_html)["prompt"]) == engine.count_tokens([{"role": "user",
                                                                              "content": "What is 2 + 3?"}])
    assert messages and not any(title(m) == ERROR_TITLE for m in messages)


def test_the_prefill_rate_of_a_continued_chat_names_the_tokens_it_counts(url: str) -> None:
    client = gradio_client.Client(url, verbose=False)
    try:
        client.predict("What is 25 + 17?", *GREEDY_SHORT, api_name="/chat")
        _, stats_html = client.predict("And 3 + 4?", *GREEDY_SHORT, api_name="/chat")  # the session's next turn
    finally:
        client.close()
    stats = parse_stats(stats_html)
    reused, prompt = number(stats["reused"]), number(stats["prompt"])
    assert reused > 0, stats  # the second turn continued from the kept state
    new = int(prompt - reused)
    assert f"Prefill ({new:,} new token{'s' if new != 1 else ''})" in stats_html


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_every_example_card_is_answered_right(url: str, index: int) -> None:
    """Each example card gets a worked, correct answer from the embedded model through the running app: every
    value boxed (the quadratic's two roots, each department), and rendered for KaTeX by display_math."""
    from phi4flash.training.solver import solve

    expected = solve(EXAMPLES[index])  # the independent solver reads the card's text
    assert expected, EXAMPLES[index]
    client = gradio_client.Client(url, verbose=False)
    try:
        updates = _stream(client, EXAMPLES[index], ("", 0.0, 0.95, 1024, 0))
    finally:
        client.close()
    messages, stats_html = updates[-1]
    assert parse_stats(stats_html)["finish"] == "stop"
    assert title(messages[0]).startswith("Thought")
    answer = answers(messages)[-1]
    for item in expected:
        label, _, value = item.rpartition("=")
        shown = f"$\\boxed{{{value}}}$"  # display_math wraps each box for KaTeX
        assert (f"{label} = {shown}" if label else shown) in answer, (item, answer)
    assert answer.count("\\boxed") == len(expected), answer
