"""Constrained decoding on a real byte-level BPE tokenizer: random logits, many seeds, every output must be
a schema-valid document (or tool call) ending with a stop token, within the token budget."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_tokenizer import tiny_chat_tokenizer

from phi4flash import constrained as C

JOKE = {"type": "object", "properties": {"setup": {"type": "string"}, "punchline": {"type": "string"}},
        "required": ["setup", "punchline"]}
NESTED = {
    "type": "object",
    "properties": {
        "n": {"type": "integer"},
        "x": {"type": "number"},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "sub": {"$ref": "#/$defs/Sub"},
        "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["n", "ok", "color", "sub"],
    "$defs": {"Sub": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}},
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "no_args", "parameters": {"type": "object", "properties": {}}}},
]


def _validate(value, schema, defs):  # a small validator for the keywords the tests use
    if "$ref" in schema:
        return _validate(value, defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in schema:
        return any(_validate(value, s, defs) for s in schema["anyOf"])
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict) and all(k in value for k in schema.get("required", []))
                and all(k in props and _validate(v, props[k], defs) for k, v in value.items()))
    if kind == "array":
        return isinstance(value, list) and len(value) <= schema.get("maxItems", 99) and all(
            _validate(v, schema["items"], defs) for v in value)
    types = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "null": type(None)}[kind]
    return isinstance(value, types) and (kind in ("boolean", "null") or not isinstance(value, bool))


def _sample(processor, seed, budget, greedy=False, scale=3.0):
    tok = tiny_chat_tokenizer()
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(budget):
        logits = processor(ids, torch.randn(tok.vocab_size, generator=g) * scale)
        if greedy:
            token = int(torch.argmax(logits))
        else:
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        ids.append(token)
        if token in tok.stop_token_ids:
            break
    return ids, tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("schema", [JOKE, NESTED], ids=["joke", "nested"])
@pytest.mark.parametrize("seed", range(12))
def test_schema_output_always_valid(schema, seed):
    budget = [48, 80, 160][seed % 3]
    processor = C.json_schema_processor(tiny_chat_tokenizer(), schema, max_new_tokens=budget, max_reasoning_tokens=8)
    ids, text = _sample(processor, seed, budget, greedy=seed % 4 == 0)
    assert ids[-1] in tiny_chat_tokenizer().stop_token_ids, text
    assert len(ids) <= budget
    answer = text.split("</think>")[-1].strip()
    assert _validate(json.loads(answer), schema, schema.get("$defs", {})), answer


@pytest.mark.parametrize("seed", range(12))
def test_forced_tool_call_always_valid(seed):
    budget = [48, 80, 160][seed % 3]
    processor = C.tool_call_processor(tiny_chat_tokenizer(), TOOLS, max_new_tokens=budget, max_reasoning_tokens=8)
    ids, text = _sample(processor, seed, budget)
    answer = text.split("</think>")[-1].strip()
    assert answer.startswith("<|tool_call|>") and answer.endswith("<|/tool_call|>"), answer
    call = json.loads(answer[len("<|tool_call|>"):-len("<|/tool_call|>")])
    assert set(call) == {"name", "arguments"}
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert _validate(call["arguments"], params[call["name"]], {}), call


def test_stop_only_when_complete_and_only_stop_after():
    tok = tiny_chat_tokenizer()
    proc = C.json_schema_processor(tok, {"type": "integer"}, allow_reasoning=False)
    logits = torch.zeros(tok.vocab_size)
    first = proc([], logits)
    assert all(first[i] == float("-inf") for i in tok.stop_token_ids)  # nothing written yet
    seven = tok.encode("7")
    after = proc(seven, logits)
    assert any(after[i] == 0 for i in tok.stop_token_ids)  # "7" is a complete integer
    assert after[tok.encode("1")[0]] == 0  # ... that may go on
    assert after[tok.encode("a")[0]] == float("-inf")


def test_reasoning_is_free_then_capped():
    tok = tiny_chat_tokenizer()
    proc = C.json_schema_processor(tok, JOKE, max_reasoning_tokens=3)
    think = tok.encode("<think>")
    free = proc(think, torch.zeros(tok.vocab_size))
    assert int((free == 0).sum()) > tok.vocab_size // 2  # reasoning text is unconstrained
    words = think + tok.encode(" a b c")
    capped = proc(words, torch.zeros(tok.vocab_size))
    allowed = {tok.decode([i]) for i in torch.nonzero(capped == 0).flatten().tolist()}
    assert allowed and all("</think>".startswith(a) for a in allowed)


def test_enum_and_literal_keys_are_exact():
    node = C.compile_schema({"type": "object", "properties": {"c": {"enum": ["red", "blue"]}}, "required": ["c"]})
    states = C.Grammar(node, allow_reasoning=False).initial_states()
    assert C.advance(states, b'{"c":"red"}')
    assert C.is_complete(C.advance(states, b'{"c": "blue"}'))
    assert not C.advance(states, b'{"c":"green"')
    assert not C.advance(states, b'{"d"')
    assert not C.advance(states, b'{}')  # "c" is required
    assert C.close_bytes(C.advance(states, b'{"c":"bl')) == b'ue"}'


def test_numbers_and_strings_grammar():
    g = C.Grammar(C.compile_schema({"type": "array", "items": {"type": "number"}}), allow_reasoning=False)
    s = g.initial_states()
    assert C.is_complete(C.advance(s, b"[-0.5e+3, 12, 0]"))
    assert not C.advance(s, b"[01")
    assert not C.advance(s, b"[1.]")
    gs = C.Grammar(C.compile_schema({"type": "string", "maxLength": 3}), allow_reasoning=False).initial_states()
    assert C.is_complete(C.advance(gs, '"é\\n\\u00e9"'.encode()))
    assert not C.advance(gs, b'"abcd')
    assert not C.advance(gs, b'"\x01')


def test_token_table_bytes_roundtrip():
    tok = tiny_chat_tokenizer()
    table = C.token_table(tok)
    assert C.token_table(tok) is table  # built once per tokenizer
    text = '{"city": "Paris 中文"}'
    ids = tok.encode(text)
    assert b"".join(table.token_bytes[i] for i in ids).decode() == text
    assert tok.token_to_id("<|tool_call|>") in table.control
    assert all(table.token_bytes[i] is None for i in tok.stop_token_ids)


def test_answer_guard_masks_stop_until_answer_and_caps_reasoning():
    tok = tiny_chat_tokenizer()
    guard = C.AnswerGuard(tok, max_reasoning_tokens=2, max_new_tokens=100)
    zeros = torch.zeros(tok.vocab_size)
    assert all(guard([], zeros)[i] == float("-inf") for i in tok.stop_token_ids)
    ids = tok.encode("<think>") + tok.encode(" x y")
    forced = guard(ids, zeros)
    allowed = {tok.decode([i]) for i in torch.nonzero(forced == 0).flatten().tolist()}
    assert allowed and all("</think>".startswith(a) for a in allowed)
    ids += tok.encode("</think>Hi")
    assert all(guard(ids, zeros)[i] == 0 for i in tok.stop_token_ids)


def test_answer_guard_can_close_a_capped_reasoning_at_the_end_of_its_line():
    tok = tiny_chat_tokenizer()
    zeros = torch.zeros(tok.vocab_size)

    def closes(guard, text):  # whether an ordinary token is masked: only "</think>" may come next
        return bool(guard(tok.encode(text), zeros)[tok.encode(" q")[0]] == float("-inf"))

    guard = C.AnswerGuard(tok, max_reasoning_tokens=2, max_new_tokens=200, close_at="line")
    assert not closes(guard, "<think> x y z")  # over the cap, but in the middle of a line
    assert closes(guard, "<think> x y z\n")  # the line is finished: now </think>
    assert closes(C.AnswerGuard(tok, max_reasoning_tokens=2, max_new_tokens=200), "<think> x y z")  # at the cap
    long_line = "<think>" + " x" * (C.LINE_GRACE + 4)
    assert closes(C.AnswerGuard(tok, max_reasoning_tokens=2, max_new_tokens=200, close_at="line"), long_line)
    with pytest.raises(ValueError, match="close_at"):
        C.AnswerGuard(tok, close_at="word")
