"""The engine: greedy parity, batching, concurrency, stop strings, reasoning channel, cancel, errors, metrics."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from _tiny_tokenizer import tiny_chat_tokenizer
from model_helpers import tiny_model

from phi4flash import GenerationConfig, LocalEngine, PromptTooLongError

GREEDY = GenerationConfig(temperature=0, max_new_tokens=24)
HELLO = [{"role": "user", "content": "Hello there, tell me a story"}]
OTHER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3.14?"}]


@pytest.fixture(scope="module")
def engine():
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model(vocab_size=tokenizer.vocab_size, context_length=160)
    eng = LocalEngine(model, tokenizer, max_batch=4)
    yield eng
    eng.close()


def _greedy_reference(engine: LocalEngine, messages, n: int) -> list[int]:
    seq = engine.tokenizer.encode_chat(messages)
    start = len(seq)
    with torch.no_grad():
        for _ in range(n):
            logits = engine.model(torch.tensor([seq]))[0, -1, : engine.vocab_limit]
            logits[engine._suppress] = float("-inf")
            seq.append(int(logits.argmax()))
    return seq[start:]


def test_greedy_equals_full_forward_argmax(engine: LocalEngine) -> None:
    completion = engine.generate(HELLO, GREEDY)
    assert completion.finish_reason in ("length", "stop")
    assert completion.token_ids == _greedy_reference(engine, HELLO, len(completion.token_ids))
    text = engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert completion.reasoning + completion.answer == text.strip() or completion.answer.strip() == text.strip()


def test_batch_and_threads_equal_one_at_a_time(engine: LocalEngine) -> None:
    alone = [engine.generate(m, GREEDY).token_ids for m in (HELLO, OTHER, HELLO)]
    batch = [c.token_ids for c in engine.generate_batch([HELLO, OTHER, HELLO], GREEDY)]
    assert batch == alone
    results: dict[int, list[int]] = {}

    def worker(i: int, messages) -> None:
        ids: list[int] = []
        for event in engine.stream(messages, GREEDY):
            if event.done:
                ids = event.token_ids
        results[i] = ids

    threads = [threading.Thread(target=worker, args=(i, m)) for i, m in enumerate((HELLO, OTHER, OTHER, HELLO))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(4)] == [alone[0], alone[1], alone[1], alone[0]]


def test_greedy_rows_of_a_batch_are_picked_together_as_their_samplers_would(engine: LocalEngine,
                                                                           monkeypatch) -> None:
    from types import SimpleNamespace

    from phi4flash.sampling import Sampler

    vocab = engine.model.config.vocab_size
    monkeypatch.setattr(engine, "vocab_limit", vocab - 2)  # as when the embedding has padding rows
    monkeypatch.setattr(engine, "_suppress", [5, 7])  # as for ids without a token
    logits = torch.randn(4, vocab)
    logits[0, 7] = 100.0  # the best logit is a suppressed id
    logits[1, vocab - 1] = 100.0  # or a padding id
    greedy, sampled = GenerationConfig(temperature=0.0), GenerationConfig(temperature=0.7, seed=1)
    requests = [SimpleNamespace(config=c, generated=[], sampler=Sampler(c, "cpu", engine.vocab_limit, engine._suppress))
                for c in (greedy, greedy, sampled, greedy)]
    tokens = engine._greedy_tokens(requests, logits)
    assert tokens[2] is None  # a sampled row keeps its own sampler
    sampler = Sampler(greedy, "cpu", engine.vocab_limit, engine._suppress)
    assert [tokens[i] for i in (0, 1, 3)] == [int(sampler(logits[i:i + 1])[0]) for i in (0, 1, 3)]
    assert all(t < vocab - 2 and t not in (5, 7) for t in tokens if t is not None)


def test_requests_that_end_early_leave_the_others_on_the_first_rows(engine: LocalEngine, monkeypatch) -> None:
    """When a request ends, the ones still running move down to rows [0, n): every step reads a slice of the
    cache (no copies) and can take the compiled graph; their tokens are those they get alone."""
    lengths = (3, 24, 9, 16)
    configs = [GenerationConfig(temperature=0, max_new_tokens=n) for n in lengths]
    conversations = [HELLO, OTHER, HELLO, OTHER]
    alone = [engine.generate(m, c).token_ids for m, c in zip(conversations, configs, strict=True)]
    seen = []
    original = engine.model.step
    monkeypatch.setattr(engine.model, "step", lambda ids, cache, rows=None, **kw: seen.append(rows) or
                        original(ids, cache, rows=rows, **kw))
    batch = [c.token_ids for c in engine.generate_batch(conversations, configs)]
    assert batch == alone
    assert len({len(r) for r in seen if r is not None}) > 1  # the batch shrank on the way
    assert all(rows is None or rows == list(range(len(rows))) for rows in seen)


def test_prompt_chunks_run_the_self_decoder_only_and_the_reply_is_unchanged(engine: LocalEngine) -> None:
    chunked = LocalEngine(engine.model, engine.tokenizer, max_batch=1, prefill_chunk=5, kept_state_bytes=0)
    calls = []
    cross = engine.model.model.layers[engine.model.config.kv_layer + 1]
    handle = cross.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    try:
        done = chunked.generate(HELLO, GenerationConfig(temperature=0, max_new_tokens=4))
    finally:
        handle.remove()
        chunked.close()
    assert done.token_ids == _greedy_reference(engine, HELLO, 4)
    assert calls == [1] * 4  # the last prompt token, then the steps: never a prompt chunk


def test_stop_string_across_tokens_is_trimmed(engine: LocalEngine) -> None:
    ids = engine.generate(HELLO, GREEDY).token_ids
    pieces = [engine.tokenizer.decode([t]) for t in ids]
    k = next(i for i in range(3, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    stop = pieces[k][-1] + pieces[k + 1][:1]  # spans the boundary of two tokens
    text = "".join(pieces)
    expected = text[: text.find(stop)]
    completion = engine.generate(HELLO, GenerationConfig(temperature=0, max_new_tokens=24, stop=[stop]))
    assert completion.finish_reason == "stop"
    assert (completion.reasoning + completion.answer).strip() == expected.strip()


def _forcing(tokenizer, text: str):
    """A logits processor that makes the model write ``text`` and then <|end|>."""
    target = tokenizer.encode(text) + [tokenizer.token_to_id("<|end|>")]

    def process(generated, logits):
        forced = torch.full_like(logits, float("-inf"))
        forced[target[len(generated)]] = 0.0
        return forced

    return process


def test_reasoning_and_answer_channels_and_counts(engine: LocalEngine) -> None:
    text = "<think>Let me think about this step by step.</think>The answer is 42."
    config = GenerationConfig(temperature=0, max_new_tokens=64, logits_processor=_forcing(engine.tokenizer, text))
    events = list(engine.stream(HELLO, config))
    reasoning = "".join(e.text for e in events if e.channel == "reasoning")
    answer = "".join(e.text for e in events if e.channel == "answer")
    assert reasoning == "Let me think about this step by step."
    assert answer == "The answer is 42."
    final = events[-1]
    assert final.done and final.metrics.finish_reason == "stop"
    n_tokens = len(engine.tokenizer.encode(text)) + 1  # + the stop token
    assert final.metrics.reasoning_tokens + final.metrics.answer_tokens == n_tokens
    thinking = "<think>Let me think about this step by step."
    assert final.metrics.reasoning_tokens >= len(engine.tokenizer.encode(thinking))
    assert final.token_ids == engine.tokenizer.encode(text)


def test_metrics_are_filled_and_a_next_turn_reuses_state(engine: LocalEngine) -> None:
    first = engine.generate(OTHER, GREEDY)
    m = first.metrics
    assert m.prompt_tokens == engine.count_tokens(OTHER)
    assert m.time_to_first_token_s > 0 and m.prefill_tokens_per_s > 0 and m.decode_tokens_per_s > 0
    assert m.inter_token_latency_p50_s <= m.inter_token_latency_p95_s
    assert m.total_time_s >= m.time_to_first_token_s and m.cache_bytes > 0
    assert m.device == "cpu" and m.dtype == "float32" and m.context_length == 160
    turn = [*OTHER, {"role": "assistant", "content": first.answer}, {"role": "user", "content": "And 2.71?"}]
    second = engine.generate(turn, GREEDY)
    assert second.metrics.reused_prompt_tokens >= engine.count_tokens(OTHER) - 1
    fresh = LocalEngine(engine.model, engine.tokenizer, max_batch=1, kept_state_bytes=0)
    try:
        alone = fresh.generate(turn, GREEDY)
    finally:
        fresh.close()
    assert alone.metrics.reused_prompt_tokens == 0
    assert alone.token_ids == second.token_ids


def test_kept_states_stay_within_budget(engine: LocalEngine) -> None:
    small = LocalEngine(engine.model, engine.tokenizer, max_batch=1, kept_state_bytes=60_000)
    try:
        for i in range(5):
            small.generate([{"role": "user", "content": f"question number {i}"}], GREEDY)
            assert small.stats()["kept_state_bytes"] <= 60_000
    finally:
        small.close()


def test_invalid_sampling_and_overlong_prompt(engine: LocalEngine) -> None:
    for field, value in (("temperature", -1.0), ("top_p", 0.0), ("top_k", -3), ("min_p", 1.5),
                         ("repetition_penalty", 0.0), ("max_new_tokens", 0)):
        with pytest.raises(ValueError, match=field):
            engine.stream(HELLO, GenerationConfig(**{field: value}))
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(PromptTooLongError, match="context holds 160"):
        engine.stream(long, GREEDY)
    assert engine.generate(HELLO, GREEDY).finish_reason in ("length", "stop")


def test_an_empty_or_malformed_conversation_is_a_value_error(engine: LocalEngine) -> None:
    with pytest.raises(ValueError, match="empty conversation"):
        engine.generate([], GREEDY)
    with pytest.raises(ValueError, match="not str"):
        engine.stream("Hello there", GREEDY)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        engine.stream([HELLO[0], "and more"], GREEDY)  # type: ignore[list-item]
    assert engine.generate(HELLO, GREEDY).finish_reason in ("length", "stop")


def test_generation_stops_at_the_context_length(engine: LocalEngine) -> None:
    completion = engine.generate(HELLO, GenerationConfig(temperature=0, max_new_tokens=1000))
    if completion.finish_reason == "length":
        assert completion.metrics.prompt_tokens + len(completion.token_ids) <= 160


def test_cancel_by_close_and_by_event_then_next_request_works(engine: LocalEngine) -> None:
    config = GenerationConfig(temperature=1.0, max_new_tokens=100, seed=3)
    never_stop = _never_stop(engine)
    stream = engine.stream(HELLO, GenerationConfig(temperature=1.0, max_new_tokens=100, logits_processor=never_stop))
    for i, _ in enumerate(stream):
        if i == 2:
            stream.close()
            break
    cancel = threading.Event()
    events = []
    for event in engine.stream(HELLO, GenerationConfig(temperature=1.0, max_new_tokens=100,
                                                        logits_processor=never_stop), cancel=cancel):
        events.append(event)
        if len(events) == 3:
            cancel.set()
    assert events[-1].done and events[-1].metrics.finish_reason == "cancelled"
    assert len(events) <= 3 + 4  # stopped within one step (a step may emit a few pieces)
    assert engine.generate(HELLO, config).finish_reason in ("length", "stop")
    assert engine.stats()["running"] == 0


def _never_stop(engine: LocalEngine):
    stops = list(engine.stop_token_ids)

    def process(generated, logits):
        logits = logits.clone()
        logits[stops] = float("-inf")
        return logits

    return process


def test_a_failing_request_does_not_poison_the_next(engine: LocalEngine) -> None:
    def broken(generated, logits):
        raise RuntimeError("processor exploded")

    with pytest.raises(RuntimeError, match="processor exploded"):
        engine.generate(HELLO, GenerationConfig(temperature=0, logits_processor=broken))
    assert engine.generate(HELLO, GREEDY).token_ids == engine.generate(HELLO, GREEDY).token_ids


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_engine_works_in_a_forked_child(engine: LocalEngine) -> None:
    # ZeroGPU runs each @spaces.GPU call in a forked process: the engine must restart its scheduler there.
    expected = engine.generate(HELLO, GREEDY).token_ids
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        try:
            same = engine.generate(HELLO, GREEDY).token_ids == expected
        finally:
            os._exit(0 if same else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_min_new_tokens_keeps_the_stop_tokens_away(engine: LocalEngine) -> None:
    end = engine.tokenizer.token_to_id("<|end|>")

    def stop_at_once(generated, logits):
        forced = torch.full_like(logits, float("-inf"))
        forced[end] = 0.0
        forced[7] = -1.0  # a fallback once <|end|> is forbidden
        return forced

    assert engine.generate(HELLO, GenerationConfig(temperature=0, logits_processor=stop_at_once)).token_ids == []
    done = engine.generate(HELLO, GenerationConfig(temperature=0, min_new_tokens=5, logits_processor=stop_at_once))
    assert done.token_ids == [7] * 5 and done.finish_reason == "stop"
    with pytest.raises(ValueError, match="min_new_tokens"):
        GenerationConfig(min_new_tokens=-1).validate()


def test_metrics_snapshots_do_not_change_as_recording_goes_on() -> None:
    """Each streamed event carries a snapshot: later tokens change neither its counts nor its rate history."""
    from phi4flash.metrics import RECENT_WINDOW, MetricsRecorder

    ticks = iter(range(1000))
    recorder = MetricsRecorder(prompt_tokens=5, clock=lambda: float(next(ticks)))
    recorder.prefill_done()
    for _ in range(RECENT_WINDOW + 1):
        recorder.token("reasoning")
    early = recorder.snapshot()
    history = list(early.decode_tokens_per_s_history)
    assert history and early.reasoning_tokens == RECENT_WINDOW + 1
    for _ in range(2 * RECENT_WINDOW):
        recorder.token("answer")
    assert early.answer_tokens == 0 and early.decode_tokens_per_s_history == history
    assert recorder.snapshot().answer_tokens == 2 * RECENT_WINDOW
    assert len(recorder.snapshot().decode_tokens_per_s_history) > len(history)
