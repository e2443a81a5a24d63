"""Tool definitions in, OpenAI tool_calls out (through phi4flash.tools)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from phi4flash import LatencyMetrics, StreamEvent
from phi4flash.server.app import _tools_module, create_app, serve_in_background

from .server_helpers import API_KEY

pytestmark = pytest.mark.skipif(_tools_module() is None, reason="phi4flash.tools is not available")

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]


def test_tools_reach_the_prompt(server: str, model_id: str, engine: Any) -> None:
    plain = httpx.post(f"{server}/v1/chat/completions", headers=AUTH, timeout=60,
                       json={"model": model_id, "messages": USER, "max_tokens": 1, "temperature": 0})
    with_tools = httpx.post(f"{server}/v1/chat/completions", headers=AUTH, timeout=60,
                            json={"model": model_id, "messages": USER, "max_tokens": 1, "temperature": 0,
                                  "tools": TOOLS})
    assert plain.status_code == with_tools.status_code == 200, with_tools.text
    assert with_tools.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"]
    none = httpx.post(f"{server}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"model": model_id, "messages": USER, "max_tokens": 1, "temperature": 0,
                            "tools": TOOLS, "tool_choice": "none"})
    assert none.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]


def test_tool_call_history_is_accepted(server: str, model_id: str) -> None:
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    r = httpx.post(f"{server}/v1/chat/completions", headers=AUTH, timeout=60,
                   json={"model": model_id, "messages": messages, "tools": TOOLS, "max_tokens": 1})
    assert r.status_code == 200, r.text


def test_invalid_tool_definition_is_400(server: str, model_id: str) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", headers=AUTH, timeout=60,
                   json={"model": model_id, "messages": USER, "tools": [{"type": "function", "function": {}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


class ScriptedEngine:
    """Replays a fixed completion: the random-weight model cannot be relied on to write a tool call, and
    what is under test here is only how the server turns a call in the answer into ``tool_calls``."""

    model_name = "scripted"
    device = "cpu"
    dtype = "float32"
    context_length = 4096

    def __init__(self, pieces: list[tuple[str, str]]) -> None:
        self.pieces = pieces
        self.seen: list[Any] = []

    def count_tokens(self, messages: Any) -> int:
        return 10

    def stream(self, messages: Any, config: Any = None, *, cancel: Any = None) -> Iterator[StreamEvent]:
        self.seen.append(messages)
        m = LatencyMetrics(prompt_tokens=10)
        for channel, text in self.pieces:
            if channel == "reasoning":
                m.reasoning_tokens += 1
            else:
                m.answer_tokens += 1
            yield StreamEvent(channel=channel, text=text, metrics=m)  # type: ignore[arg-type]
        m.finish_reason = "stop"
        yield StreamEvent(channel="answer", text="", metrics=m, done=True)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


CALL = '<|tool_call|>{"name": "get_weather", "arguments": {"city": "Paris"}}<|/tool_call|>'


def _join_tool_call_deltas(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join streamed tool-call deltas by index, as OpenAI clients do: id, type and name come first, then
    argument pieces."""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for piece in delta.get("tool_calls") or []:
            call = calls.setdefault(piece["index"], {"index": piece["index"], "function": {"arguments": ""}})
            for key in ("id", "type"):
                if piece.get(key):
                    assert key not in call, f"{key} sent twice"
                    call[key] = piece[key]
            function = piece.get("function") or {}
            if function.get("name"):
                call["function"]["name"] = function["name"]
            call["function"]["arguments"] += function.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_in_the_answer_becomes_tool_calls(stream: bool) -> None:
    engine = ScriptedEngine([("reasoning", "Need the weather."), ("answer", CALL[:20]), ("answer", CALL[20:])])
    with serve_in_background(create_app(engine)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                       json={"messages": USER, "tools": TOOLS, "stream": stream})
    assert r.status_code == 200, r.text
    assert engine.seen[0][0]["role"] == "system" and "get_weather" in engine.seen[0][0]["tools"]
    if stream:
        chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        deltas = [c["choices"][0]["delta"] for c in chunks]
        (call,) = _join_tool_call_deltas(deltas)
        assert call["index"] == 0
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Need the weather."
        assert not any(d.get("content") for d in deltas)
        finish = chunks[-1]["choices"][0]["finish_reason"]
    else:
        choice = r.json()["choices"][0]
        (call,) = choice["message"]["tool_calls"]
        assert choice["message"]["content"] is None
        assert choice["message"]["reasoning_content"] == "Need the weather."
        finish = choice["finish_reason"]
    assert finish == "tool_calls"
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_openai_client_reads_tool_calls() -> None:
    openai = pytest.importorskip("openai")
    engine = ScriptedEngine([("answer", "Let me check. "), ("answer", CALL)])
    with serve_in_background(create_app(engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check."
    assert message.tool_calls[0].function.name == "get_weather"
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}


# -- constrained output: the real embedded model behind the real server, the official client in front

CALC_TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                      "parameters": {"type": "object",
                                                     "properties": {"a": {"type": "integer"},
                                                                    "b": {"type": "integer"}},
                                                     "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
]
ASK = [{"role": "user", "content": "What is 25 + 17?"}]


def _validate(instance: Any, schema: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(instance, schema)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
@pytest.mark.parametrize("seed", [0, 1])
def test_forced_tool_choice_always_returns_a_valid_call(client: Any, model_id: str, choice: Any, seed: int) -> None:
    """tool_choice "required" or a named function: the tiny model would rather answer, so only constrained
    decoding can make it call; the call must name an allowed tool and fit that tool's schema."""
    r = client.chat.completions.create(model=model_id, messages=ASK, tools=CALC_TOOLS, tool_choice=choice,
                                       temperature=1.0, seed=seed, max_tokens=64)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    allowed = {t["function"]["name"]: t["function"]["parameters"] for t in CALC_TOOLS}
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    _validate(json.loads(call.function.arguments), allowed[call.function.name])


# Names the embedded model never saw in training: left free, it writes the one it learned (`subtract`).
UNSEEN_TOOLS = [
    {"type": "function", "function": {"name": "zorvak_minus", "description": "Return the difference of two numbers.",
                                      "parameters": {"type": "object",
                                                     "properties": {"lhs": {"type": "integer"},
                                                                    "rhs": {"type": "integer"}},
                                                     "required": ["lhs", "rhs"]}}},
    {"type": "function", "function": {"name": "quilbo_times", "description": "Multiply two integers.",
                                      "parameters": {"type": "object",
                                                     "properties": {"p": {"type": "integer"},
                                                                    "q": {"type": "integer"}},
                                                     "required": ["p", "q"]}}},
]


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_calls_only_listed_tools_with_their_arguments(client: Any, model_id: str,
                                                                       stream: bool) -> None:
    """tool_choice "auto" (the default with tools): the model decides whether to call, and every call it makes
    names a listed tool with the arguments that tool declares, whatever it was trained on."""
    allowed = {t["function"]["name"]: t["function"]["parameters"] for t in UNSEEN_TOOLS}
    calls = []
    for seed in range(4):
        kwargs = {"model": model_id, "messages": [{"role": "user", "content": "What is 64 - 44?"}],
                  "tools": UNSEEN_TOOLS, "temperature": 1.0, "seed": seed, "max_tokens": 256}
        if stream:
            deltas = [chunk.choices[0].delta.model_dump(exclude_none=True)
                      for chunk in client.chat.completions.create(**kwargs, stream=True) if chunk.choices]
            made = [(c["function"]["name"], c["function"]["arguments"]) for c in _join_tool_call_deltas(deltas)]
        else:
            message = client.chat.completions.create(**kwargs).choices[0].message
            made = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        for name, arguments in made:
            assert name in allowed, made
            _validate(json.loads(arguments), {**allowed[name], "additionalProperties": False})
        calls += made
    assert calls  # the model does call here (so the check above ran)


def test_forced_tool_choice_streams_the_call(client: Any, model_id: str) -> None:
    stream = client.chat.completions.create(model=model_id, messages=ASK, tools=CALC_TOOLS, tool_choice="required",
                                            temperature=0, max_tokens=64, stream=True)
    chunks = list(stream)
    deltas = [chunk.choices[0].delta.model_dump(exclude_none=True) for chunk in chunks if chunk.choices]
    (call,) = _join_tool_call_deltas(deltas)
    assert call["function"]["name"] in ("add", "get_weather") and call["id"].startswith("call_")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    allowed = {t["function"]["name"]: t["function"]["parameters"] for t in CALC_TOOLS}
    _validate(json.loads(call["function"]["arguments"]), allowed[call["function"]["name"]])
    assert sum(bool(d.get("tool_calls")) for d in deltas) > 1  # the call streamed in pieces


@pytest.mark.parametrize("with_call", [False, True])
def test_text_streams_as_it_comes_when_tools_are_given(with_call: bool) -> None:
    """With tools, the answer text still arrives delta by delta (not held back to the end); a call that
    follows it arrives after that text."""
    pieces = [("answer", "The weather "), ("answer", "is worth "), ("answer", "checking. ")]
    if with_call:
        pieces += [("answer", CALL[:30]), ("answer", CALL[30:])]
    engine = ScriptedEngine(pieces)
    with serve_in_background(create_app(engine)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={"messages": USER, "tools": TOOLS,
                                                                       "stream": True})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    texts = [d["content"] for d in deltas if d.get("content")]
    assert len(texts) >= 3 and "".join(texts).strip() == "The weather is worth checking."
    calls = _join_tool_call_deltas(deltas)
    assert [c["function"]["name"] for c in calls] == (["get_weather"] if with_call else [])
    assert chunks[-1]["choices"][0]["finish_reason"] == ("tool_calls" if with_call else "stop")
    if with_call:
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
        first_call = next(i for i, d in enumerate(deltas) if d.get("tool_calls"))
        assert all(not d.get("content") for d in deltas[first_call:])


def test_unknown_tool_choice_name_is_400(client: Any, model_id: str) -> None:
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_id, messages=ASK, tools=CALC_TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "subtract"}})
    assert err.value.body["param"] == "tool_choice" and "subtract" in err.value.body["message"]


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_is_followed(client: Any, model_id: str, stream: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    messages = [{"role": "user", "content": "Make up a person with a name and an age."}]
    if stream:
        chunks = list(client.chat.completions.create(model=model_id, messages=messages, response_format=fmt,
                                                      temperature=1.0, seed=3, max_tokens=64, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        r = client.chat.completions.create(model=model_id, messages=messages, response_format=fmt,
                                           temperature=1.0, seed=3, max_tokens=64)
        content = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
    _validate(json.loads(content), PERSON)


def test_response_format_json_object_and_bad_formats(client: Any, model_id: str) -> None:
    openai = pytest.importorskip("openai")
    r = client.chat.completions.create(model=model_id, messages=ASK, response_format={"type": "json_object"},
                                       temperature=0, max_tokens=48)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_id, messages=ASK, response_format={"type": "yaml"})
    assert err.value.body["param"] == "response_format.type"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_id, messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}})
    assert err.value.body["param"] == "response_format"


def test_constrained_request_on_an_engine_without_a_tokenizer_is_400() -> None:
    engine = ScriptedEngine([("answer", "{}")])
    with serve_in_background(create_app(engine)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                       json={"messages": USER, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
