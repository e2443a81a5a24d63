"""Constrained decoding (phi4flash.constrained over llguidance) on a real byte-level BPE tokenizer: random
logits, many seeds; every output must be a schema-valid document (or tool call) ending with a stop token
within the token budget."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from _tiny_tokenizer import tiny_chat_tokenizer

from phi4flash.constrained import Constraint, constraint_for, json_grammar, mask_logits
from phi4flash.reasoning import LINE_GRACE, AnswerGuard
from phi4flash.tokenizer import ChatTokenizer
from phi4flash.weights import EMBEDDED_DIR

JOKE = {"type": "object", "properties": {"setup": {"type": "string"}, "punchline": {"type": "string"}},
        "required": ["setup", "punchline"]}
NESTED = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": -5, "maximum": 500},
        "x": {"type": "number"},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "sub": {"$ref": "#/$defs/Sub"},
        "maybe": {"anyOf": [{"type": "string", "pattern": "^[a-c]{2}$"}, {"type": "null"}]},
    },
    "required": ["n", "ok", "color", "sub"],
    "additionalProperties": False,
    "$defs": {"Sub": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}},
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "no_args", "parameters": {"type": "object", "properties": {}}}},
]


def _sample(constraint: Constraint, seed: int, budget: int, greedy: bool = False, scale: float = 3.0):
    tok = tiny_chat_tokenizer()
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(budget):
        logits = mask_logits(torch.randn(1, tok.vocab_size, generator=g) * scale, [constraint], [ids])[0]
        token = int(torch.argmax(logits)) if greedy else int(torch.multinomial(torch.softmax(logits, -1), 1,
                                                                               generator=g))
        ids.append(token)
        if token in tok.stop_token_ids:
            break
    return ids, tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("schema", [JOKE, NESTED], ids=["joke", "nested"])
@pytest.mark.parametrize("seed", range(12))
def test_schema_output_always_valid(schema, seed):
    budget = [64, 96, 160][seed % 3]
    constraint = constraint_for(tiny_chat_tokenizer(), schema=schema, max_new_tokens=budget, max_reasoning_tokens=8)
    ids, text = _sample(constraint, seed, budget, greedy=seed % 4 == 0)
    assert ids[-1] in tiny_chat_tokenizer().stop_token_ids, text
    assert len(ids) <= budget
    jsonschema.validate(json.loads(text.split("</think>")[-1]), schema)


@pytest.mark.parametrize("seed", range(12))
def test_forced_tool_call_always_valid(seed):
    budget = [64, 96, 160][seed % 3]
    constraint = constraint_for(tiny_chat_tokenizer(), tools=TOOLS, max_new_tokens=budget, max_reasoning_tokens=8)
    ids, text = _sample(constraint, seed, budget)
    assert ids[-1] in tiny_chat_tokenizer().stop_token_ids and len(ids) <= budget
    answer = text.split("</think>")[-1].strip()
    assert answer.startswith("<|tool_call|>[") and answer.endswith("]<|/tool_call|>"), answer
    (call,) = json.loads(answer[len("<|tool_call|>"):-len("<|/tool_call|>")])
    assert set(call) == {"name", "arguments"}
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(call["arguments"], {**params[call["name"]], "additionalProperties": False})


def _allowed(constraint: Constraint, ids: list[int]) -> set[str]:
    tok = tiny_chat_tokenizer()
    row = mask_logits(torch.zeros(1, tok.vocab_size), [constraint], [ids])[0]
    return {tok.decode([i]) for i in torch.nonzero(row == 0).flatten().tolist()}


def test_stop_only_when_complete_and_only_stop_when_nothing_can_follow():
    tok = tiny_chat_tokenizer()
    stops = {tok.decode([i]) for i in tok.stop_token_ids}
    integer = Constraint(tok, json_grammar({"type": "integer"}, reasoning=False))
    assert not _allowed(integer, []) & stops  # nothing written yet
    after = _allowed(integer, tok.encode("7"))
    assert stops <= after and "1" in after and "a" not in after  # "7" is complete, and may go on
    obj = Constraint(tok, json_grammar(JOKE, reasoning=False))
    done = tok.encode(json.dumps({"setup": "a", "punchline": "b"}))
    assert not _allowed(obj, done[:-1]) & stops
    assert _allowed(obj, done) == stops


def test_objects_hold_their_declared_keys_only_unless_the_schema_allows_more():
    tok = tiny_chat_tokenizer()
    nested = {"type": "object", "properties": {"sub": {"$ref": "#/$defs/Sub"}}, "required": ["sub"],
              "$defs": {"Sub": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
    cases = [(JOKE, '{"setup": "a", "punchline": "b"', False),
             ({**JOKE, "additionalProperties": True}, '{"setup": "a", "punchline": "b"', True),
             ({**JOKE, "additionalProperties": {"type": "integer"}}, '{"setup": "a", "punchline": "b"', True),
             (nested, '{"sub": {"a": 1', False)]
    for schema, head, more in cases:
        allowed = _allowed(Constraint(tok, json_grammar(schema, reasoning=False)), tok.encode(head))
        assert "}" in allowed and ("," in allowed) == more, (schema, allowed)


def test_reasoning_is_free_then_capped():
    tok = tiny_chat_tokenizer()
    constraint = constraint_for(tok, schema=JOKE, max_new_tokens=200, max_reasoning_tokens=3)
    think = tok.encode("<think>")
    assert len(_allowed(constraint, think)) > tok.vocab_size // 2  # reasoning text is unconstrained
    capped = _allowed(constraint, think + tok.encode(" a b c"))
    assert len(capped) == 1 and "</think>".startswith(capped.pop())
    assert not constraint.matcher.is_error()


def test_low_budget_forces_the_shortest_completion():
    tok = tiny_chat_tokenizer()
    constraint = constraint_for(tok, schema=JOKE, max_new_tokens=40, max_reasoning_tokens=0)
    rambling = torch.zeros(1, tok.vocab_size)
    rambling[0, tok.encode("a")[0]] = 10.0  # a model that would never close a string
    ids: list[int] = []
    while not ids or ids[-1] not in tok.stop_token_ids:
        assert len(ids) < 40, tok.decode(ids)
        ids.append(int(torch.argmax(mask_logits(rambling, [constraint], [ids])[0])))
    assert tok.decode(ids, skip_special_tokens=True).startswith('{"setup": "aaa')
    jsonschema.validate(json.loads(tok.decode(ids, skip_special_tokens=True)), JOKE)


def test_a_budget_too_small_for_the_document_stops_at_length_incomplete():
    tok = tiny_chat_tokenizer()
    constraint = constraint_for(tok, tools=TOOLS[:1], max_new_tokens=6, max_reasoning_tokens=0)
    ids, text = _sample(constraint, 0, 6)
    assert len(ids) == 6 and ids[-1] not in tok.stop_token_ids and text.lstrip().startswith("<|tool_call|>[")


def test_a_row_batch_masks_each_row_by_its_own_grammar():
    tok = tiny_chat_tokenizer()
    rows = [constraint_for(tok, schema={"type": "boolean"}, max_new_tokens=50, max_reasoning_tokens=0),
            constraint_for(tok, tools=TOOLS, max_new_tokens=50, max_reasoning_tokens=0), None]
    logits = mask_logits(torch.zeros(2, tok.vocab_size), rows[:2], [[], []])
    first = [{tok.decode([i]) for i in torch.nonzero(row == 0).flatten().tolist()} for row in logits]
    assert first[0] and all("true".startswith(t.strip()) or "false".startswith(t.strip()) for t in first[0])
    assert {t for t in first[1] if t.strip()} == {"<|tool_call|>"}


@pytest.mark.parametrize(("schema", "needle"), [({"type": "frobnicate"}, "frobnicate"),
                                                ({"type": "string", "format": "no-such-format"}, "format"),
                                                ({"$ref": "#/$defs/Missing"}, "Missing")])
def test_a_schema_the_engine_cannot_compile_is_a_clear_value_error(schema, needle):
    with pytest.raises(ValueError, match=needle):
        constraint_for(tiny_chat_tokenizer(), schema=schema, max_new_tokens=32)


def test_answer_guard_masks_stop_until_answer_and_caps_reasoning():
    tok = tiny_chat_tokenizer()
    guard = AnswerGuard(tok, max_reasoning_tokens=2, max_new_tokens=100)
    zeros = torch.zeros(tok.vocab_size)
    assert all(guard([], zeros)[i] == float("-inf") for i in tok.stop_token_ids)
    ids = tok.encode("<think>") + tok.encode(" x y")
    forced = guard(ids, zeros)
    allowed = {tok.decode([i]) for i in torch.nonzero(forced == 0).flatten().tolist()}
    # the tag's own first token, or any other token that goes on with it
    assert tok.decode(tok.encode("</think>")[:1]) in allowed
    assert all("</think>".startswith(text) or text.startswith("</think>") for text in allowed), allowed
    ids += tok.encode("</think>Hi")
    assert all(guard(ids, zeros)[i] == 0 for i in tok.stop_token_ids)


def test_answer_guard_can_close_a_capped_reasoning_at_the_end_of_its_line():
    tok = tiny_chat_tokenizer()
    zeros = torch.zeros(tok.vocab_size)

    def closes(guard, text):  # whether an ordinary token is masked: only "</think>" may come next
        return bool(guard(tok.encode(text), zeros)[tok.encode(" q")[0]] == float("-inf"))

    guard = AnswerGuard(tok, max_reasoning_tokens=2, max_new_tokens=200, close_at="line")
    assert not closes(guard, "<think> x y z")  # over the cap, but in the middle of a line
    assert closes(guard, "<think> x y z\n")  # the line is finished: now </think>
    assert closes(AnswerGuard(tok, max_reasoning_tokens=2, max_new_tokens=200), "<think> x y z")  # at the cap
    long_line = "<think>" + " x" * (LINE_GRACE + 4)
    assert closes(AnswerGuard(tok, max_reasoning_tokens=2, max_new_tokens=200, close_at="line"), long_line)
    with pytest.raises(ValueError, match="close_at"):
        AnswerGuard(tok, close_at="word")


def test_a_capped_reasoning_is_closed_with_the_tokens_the_model_writes_the_tag_with():
    # The embedded tokenizer merges the tag with its newlines ("</think>\n", "\n</think>\n"): the model never saw
    # the tag's own encoding ("<", "/", "thin", "k", ">"), and after it wrote a second "</think>" into the answer.
    tok = ChatTokenizer.from_pretrained(EMBEDDED_DIR)
    merged, merged_line = tok.encode("</think>\n\\boxed")[0], tok.encode("x\n</think>\nx")[1]
    assert tok.decode([merged]) == "</think>\n" and tok.decode([merged_line]) == "\n</think>\n"
    newline = tok.encode("\n")[0]
    head = tok.encode("<think>\n12+7=19") + tok.encode(", so far 19, left 0")  # over a cap of 2, mid-line

    def prefers(token: int) -> torch.Tensor:
        logits = torch.zeros(tok.vocab_size)
        logits[token] = 5.0
        return logits

    capped = AnswerGuard(tok, max_reasoning_tokens=2, max_new_tokens=200)
    out = capped(head, prefers(merged))
    assert int(out.argmax()) == merged and out[tok.encode(" q")[0]] == float("-inf")
    by_line = AnswerGuard(tok, max_reasoning_tokens=2, max_new_tokens=200, close_at="line")
    assert by_line(head, prefers(tok.encode(" q")[0]))[tok.encode(" q")[0]] == 5.0  # the line goes on
    out = by_line(head, prefers(newline))  # the model ends the line: the newline and the tag in one token
    assert out[newline] == float("-inf") and out[merged_line] > float("-inf")
    assert all(tok.decode([i]).startswith("\n") for i in torch.nonzero(out > float("-inf")).flatten().tolist())


def _optional_calls(text: str) -> tuple[str, list[dict]]:
    """The free text before an auto output's call block, and the calls in it."""
    answer = text.split("</think>")[-1]
    head, _, block = answer.partition("<|tool_call|>")
    if not block:
        return head, []
    assert block.endswith("<|/tool_call|>"), answer
    return head, json.loads(block[:-len("<|/tool_call|>")])


@pytest.mark.parametrize("seed", range(12))
def test_auto_tool_choice_is_free_text_or_valid_calls(seed):
    """tool_choice "auto": whatever comes, any call block names listed tools with their declared arguments."""
    tok = tiny_chat_tokenizer()
    (open_id,) = tok.encode("<|tool_call|>")
    budget = 96
    constraint = constraint_for(tok, tools=TOOLS, max_new_tokens=budget, max_reasoning_tokens=8, required=False)
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for step in range(budget):
        logits = torch.randn(1, tok.vocab_size, generator=g) * 3.0
        if seed % 2 and open_id not in ids and step >= 4:  # half of the runs open a block (once allowed)
            logits[0, open_id] = 100.0
        logits = mask_logits(logits, [constraint], [ids])[0]
        ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g)))
        if ids[-1] in tok.stop_token_ids:
            break
    text = tok.decode(ids, skip_special_tokens=True)
    head, calls = _optional_calls(text)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert ids[-1] in tok.stop_token_ids and len(ids) <= budget, text
    assert bool(calls) == (seed % 2 == 1) and "<|tool_call|>" not in head, text
    for call in calls:
        assert set(call) == {"name", "arguments"} and call["name"] in params, call
        jsonschema.validate(call["arguments"], {**params[call["name"]], "additionalProperties": False})


def test_auto_tool_choice_allows_text_and_stops_but_only_listed_names_after_the_tag():
    tok = tiny_chat_tokenizer()
    stops = {tok.decode([i]) for i in tok.stop_token_ids}

    def auto() -> Constraint:
        return constraint_for(tok, tools=TOOLS, max_new_tokens=200, required=False)

    text = tok.encode("<think>ok</think>It is sunny.")
    assert stops <= _allowed(auto(), text)  # a plain answer may end
    head = tok.encode('<think>ok</think><|tool_call|>[{"name": "')
    assert not _allowed(auto(), head) & stops
    constraint = auto()
    for token in tok.encode('<think>ok</think><|tool_call|>[{"name": "get_w'):
        assert constraint.matcher.consume_token(token)
    bad = auto()
    assert not all(bad.matcher.consume_token(t) for t in tok.encode('<think>ok</think><|tool_call|>[{"name": "sum"'))
    call = '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}]<|/tool_call|>'
    assert _allowed(auto(), tok.encode("<think>ok</think>" + call)) == stops
    extra_key = auto()
    assert not all(extra_key.matcher.consume_token(t) for t in tok.encode(
        '<think>ok</think><|tool_call|>[{"name": "get_weather", "arguments": {"town"'))


def test_auto_tool_choice_needs_tools():
    with pytest.raises(ValueError, match="at least one tool"):
        constraint_for(tiny_chat_tokenizer(), tools=[], max_new_tokens=64, required=False)


def test_auto_tool_choice_leaves_uncompilable_tools_free_and_says_so(caplog):
    """An "auto" request must not fail over a grammar its caller did not ask for: tools whose schema the grammar
    compiler cannot take are called freely, with a warning naming the reason (a forced call is still an error)."""
    from phi4flash.constrained import optional_calls

    tok = tiny_chat_tokenizer()
    odd = [{"type": "function", "function": {"name": "odd", "parameters": {"type": "frobnicate"}}}]
    with caplog.at_level("WARNING", logger="phi4flash.constrained"):
        assert optional_calls(tok, odd, max_new_tokens=64) is None
    assert "frobnicate" in caplog.text
    assert optional_calls(tok, [], max_new_tokens=64) is None
    assert isinstance(optional_calls(tok, TOOLS, max_new_tokens=64), Constraint)
    with pytest.raises(ValueError, match="frobnicate"):
        constraint_for(tok, tools=odd, max_new_tokens=64)


@pytest.mark.parametrize("schema", [
    {"$ref": "#/$defs/Node", "$defs": {"Node": {
        "type": "object", "properties": {"value": {"type": "integer"},
                                         "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
        "required": ["value", "children"], "additionalProperties": False}}},
    {"type": "array", "items": {"type": "number"}, "minItems": 3},
], ids=["recursive node", "three numbers"])
def test_low_budget_ends_a_number_that_would_never_end(schema):
    tok = tiny_chat_tokenizer()
    constraint = constraint_for(tok, schema=schema, max_new_tokens=48, max_reasoning_tokens=0)
    digits = torch.zeros(1, tok.vocab_size)
    digits[0, tok.encode("7")[0]] = 10.0  # a model that, once in a number, writes digits forever
    ids: list[int] = []
    while not ids or ids[-1] not in tok.stop_token_ids:
        assert len(ids) < 48, tok.decode(ids)
        ids.append(int(torch.argmax(mask_logits(digits, [constraint], [ids])[0])))
    text = tok.decode(ids, skip_special_tokens=True)
    assert "7777" in text  # the digits ran until the budget made them stop
    jsonschema.validate(json.loads(text), schema)


REGISTER = [{"type": "function", "function": {"name": "register", "parameters": {
    "type": "object", "properties": {"name": {"type": "string"}, "description": {"type": "string"}},
    "required": ["name", "description"]}}}]
CALL_HEAD = '<think>ok</think><|tool_call|>[{"name": "register", "arguments": {"name": "Zed'


def _merged_key_tokens(tok: ChatTokenizer) -> tuple[int, int]:
    """The embedded tokenizer's token for '", "' and its one token for '", "description": "' (what training saw)."""
    (short,) = tok.encode('", "')
    (merged,) = tok.encode('", "description": "')
    return short, merged


def test_a_token_followed_by_forced_text_becomes_the_token_the_tokenizer_writes_for_both():
    """After the name's value the grammar forces `description": "` (the only key left): the model's '", "' is
    emitted as the tokenizer's one token for '", "description": "', the same text in the tokens it was trained on;
    a token that nothing forced text follows stays as the model picked it."""
    tok = ChatTokenizer.from_pretrained(EMBEDDED_DIR)
    short, merged = _merged_key_tokens(tok)
    for required in (True, False):
        constraint = constraint_for(tok, tools=REGISTER, max_new_tokens=200, required=required)
        head = tok.encode(CALL_HEAD)
        assert constraint.canonical(head, short) == merged
        assert tok.decode([*head, merged]) == tok.decode([*head, short]) + 'description": "'  # the same text
        (letter,) = tok.encode("e")
        assert constraint.canonical(head, letter) == letter  # the value goes on: nothing forced after it
        (close,) = tok.encode('"}}]')
        done = tok.encode(CALL_HEAD + '", "description": "a bank')
        # '"}}]' is followed by the added token <|/tool_call|>, which is never merged
        ending = constraint_for(tok, tools=REGISTER, max_new_tokens=200, required=required)
        assert ending.canonical(done, close) == close
        # the closing quote takes the forced text up to the added token: '"}}]' when this call must be the only
        # one, '"}}' when another may follow (", {" could still come)
        (quote,) = tok.encode('"')
        (closing,) = tok.encode('"}}]' if required else '"}}')
        assert constraint_for(tok, tools=REGISTER, max_new_tokens=200, required=required).canonical(
            done, quote) == closing
    # a key that the tokenizer does not merge with '", "' is forced in its own tokens, as before
    other = [{"type": "function", "function": {"name": "register", "parameters": {
        "type": "object", "properties": {"name": {"type": "string"}, "zqx": {"type": "string"}},
        "required": ["name", "zqx"]}}}]
    assert constraint_for(tok, tools=other, max_new_tokens=200).canonical(tok.encode(CALL_HEAD), short) == short


def test_the_engine_emits_the_merged_token_where_the_model_picks_the_short_one():
    """Through LocalEngine: a model that prefers '", "' wherever the grammar allows it writes the call with the
    merged key token, never '", "' and then the forced key in its own tokens."""
    from model_helpers import tiny_model

    from phi4flash import GenerationConfig, LocalEngine

    tok = ChatTokenizer.from_pretrained(EMBEDDED_DIR)
    short, merged = _merged_key_tokens(tok)
    (open_id,) = tok.encode("<|tool_call|>")
    head = tok.encode('[{"name": "register", "arguments": {"name": "')

    def prefer_the_call_then_the_short_token(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        wanted = [short, open_id, *head]
        for token in wanted:  # the first of these that the grammar allows now
            if logits[token] > float("-inf"):
                logits[token] = logits.max() + 50.0
                break
        return logits

    engine = LocalEngine(tiny_model(vocab_size=tok.vocab_size, context_length=400), tok, max_batch=1)
    try:
        constraint = constraint_for(tok, tools=REGISTER, max_new_tokens=60, max_reasoning_tokens=0)
        config = GenerationConfig(temperature=0, max_new_tokens=60, constraint=constraint,
                                  logits_processor=prefer_the_call_then_the_short_token)
        done = engine.generate([{"role": "user", "content": "Register Zed, a bank."}], config)
    finally:
        engine.close()
    ids = done.token_ids
    assert merged in ids, tok.decode(ids)
    assert not any(a == short and tok.decode([b]).startswith("description") for a, b in zip(ids, ids[1:], strict=False))
    call = json.loads(done.answer.split("<|tool_call|>")[-1].split("<|/tool_call|>")[0])
    assert call[0]["name"] == "register" and set(call[0]["arguments"]) == {"name", "description"}
