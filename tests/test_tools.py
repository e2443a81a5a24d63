"""Tool prompt rendering and tool-call parsing (whole and streamed)."""

from __future__ import annotations

import json

import pytest
from _tiny_tokenizer import tiny_chat_tokenizer

from phi4flash import tools as T

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"type": "function",
           "function": {"name": "get_weather", "description": "Weather of a city", "parameters": CITY}}


def test_tools_render_in_the_system_turn_like_the_template():
    messages = T.attach_tools([{"role": "user", "content": "hi"}], [WEATHER])
    prompt = tiny_chat_tokenizer().apply_chat_template(messages)
    defs = json.dumps(T.tool_definitions([WEATHER]), ensure_ascii=False)
    system = f"<|system|>{T.DEFAULT_TOOL_SYSTEM_PROMPT}<|tool|>{defs}<|/tool|><|end|>"
    assert prompt == system + "<|user|>hi<|end|><|assistant|>"
    own = T.attach_tools([{"role": "system", "content": "S"}, {"role": "user", "content": "u"}], [WEATHER])
    assert own[0] == {"role": "system", "content": "S", "tools": defs} and len(own) == 2


def test_history_calls_and_results_render():
    msg = T.assistant_message("ok", [("get_weather", {"city": "Paris"}), ("f", '{"a": 1}')])
    assert msg["content"] == ('ok<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>'
                              '<|tool_call|>[{"name": "f", "arguments": {"a": 1}}]<|/tool_call|>')
    assert T.tool_result_message({"t": 20}) == {"role": "tool", "content": '{"t": 20}'}
    prompt = tiny_chat_tokenizer().apply_chat_template([msg, T.tool_result_message("20C")])
    assert "<|tool|>20C<|end|>" in prompt


@pytest.mark.parametrize("text,expected", [
    ('<|tool_call|>{"name": "f", "arguments": {"a": 1}}<|/tool_call|>', [("f", {"a": 1})]),
    ('pre <|tool_call|>[{"name": "f", "arguments": {}}, {"name": "g", "parameters": "{\\"b\\": 2}"}]<|/tool_call|>',
     [("f", {}), ("g", {"b": 2})]),
    ('{"name": "f", "arguments": {"a": [1, 2]}}', [("f", {"a": [1, 2]})]),
    ("<|tool_call|>{'name': 'f', 'arguments': {'a': True}}", [("f", {"a": True})]),
    ('just text {"a": 1}', []),
])
def test_parse_tool_calls(text, expected):
    content, calls, invalid = T.parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == expected
    assert not invalid
    assert all(c.id.startswith("call_") for c in calls)
    assert "<|tool_call|>" not in content


def test_parse_invalid_call_is_reported_not_raised():
    content, calls, invalid = T.parse_tool_calls('<|tool_call|>{"name": "f", "arguments": {"a": <|/tool_call|>')
    assert not calls and len(invalid) == 1 and invalid[0].name == "f"


@pytest.mark.parametrize("step", [1, 2, 5, 13, 1000])
def test_stream_parser_matches_whole_parse(step):
    text = ('Sure. <|tool_call|>[{"name": "f", "arguments": {"a": "x}\\"", "b": [1, {"c": 2}]}}, '
            '{"name": "g", "arguments": {}}]<|/tool_call|> done')
    parser = T.ToolCallStreamParser()
    items = []
    for i in range(0, len(text), step):
        items += parser.feed(text[i:i + step])
    items += parser.finish()
    assert "".join(x.text for x in items if x.kind == "text") == "Sure.  done"
    args: dict[int, str] = {}
    names = {}
    for x in items:
        if x.kind == "call":
            args[x.index] = args.get(x.index, "") + x.args
            if x.name:
                assert x.index not in names  # name and id come once, first
                names[x.index] = (x.name, x.id)
    assert {i: json.loads(a) for i, a in args.items()} == {0: {"a": 'x}"', "b": [1, {"c": 2}]}, 1: {}}
    assert [n for n, _ in names.values()] == ["f", "g"]
    assert [(c.name, c.arguments, c.id) for c in parser.calls] == [
        ("f", {"a": 'x}"', "b": [1, {"c": 2}]}, names[0][1]), ("g", {}, names[1][1])]


def test_stream_parser_streams_arguments_before_the_call_closes():
    parser = T.ToolCallStreamParser()
    items = parser.feed('<|tool_call|>{"name": "f", "arguments": {"query": "long')
    assert items[0].name == "f" and items[-1].args.startswith('{"query": "lo')


def test_stream_parser_bare_json_and_plain_text():
    parser = T.ToolCallStreamParser()
    items = parser.feed(' {"name": "f", "argu') + parser.feed('ments": {"q": 1}}') + parser.finish()
    assert [(x.kind, x.name, json.loads(x.args)) for x in items] == [("call", "f", {"q": 1})]
    parser = T.ToolCallStreamParser()
    items = parser.feed("{not json") + parser.finish()
    assert "".join(x.text for x in items) == "{not json" and not parser.calls
    parser = T.ToolCallStreamParser()
    items = parser.feed("Hello <|tool") + parser.feed("_ca")
    assert "".join(x.text for x in items) == "Hello "  # a possible tag is held back
    items = parser.feed("t") + parser.finish()
    assert "".join(x.text for x in items) == "<|tool_cat"
