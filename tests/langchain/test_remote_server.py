"""ChatPhi4Flash(base_url=...) against a real phi4flash server in this process: tools, forced calls and
structured output go to the server as OpenAI request fields and come back as they do from a local model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server side of this test needs the 'serve' extra")

from _models import assert_streams_one_call, engine_of, model_params  # noqa: E402
from langchain_core.messages import HumanMessage  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from langchain_phi4flash import ChatPhi4Flash  # noqa: E402
from phi4flash.server.app import create_app, serve_in_background  # noqa: E402

KEY = "langchain-remote-key"


class Weather(BaseModel):
    """Get the weather for a city."""

    city: str
    days: int = Field(ge=0)


def lookup(query: str, limit: int) -> str:
    """Look something up."""
    return query


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, str]]:
    """(API root, model id) of a server over the same engine the local tests use."""
    engine = engine_of(model_params())
    with serve_in_background(create_app(engine, api_key=KEY)) as url:
        yield f"{url}/v1", engine.model_name


def _remote(served: tuple[str, str], **kw: Any) -> ChatPhi4Flash:
    base_url, model = served
    params = {k: v for k, v in model_params().items() if k not in ("engine", "model")}
    return ChatPhi4Flash(**{**params, "model": model, "base_url": base_url, "api_key": KEY, **kw})


@pytest.mark.parametrize("choice", ["any", "Weather", "lookup"])
def test_forced_tool_calls_over_the_server(served: tuple[str, str], choice: str) -> None:
    llm = _remote(served, temperature=1.0, seed=1)
    msg = llm.bind_tools([Weather, lookup], tool_choice=choice).invoke("Weather in Paris for 3 days?")
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0]["id"]
    call = msg.tool_calls[0]
    assert choice == "any" or call["name"] == choice
    if call["name"] == "Weather":
        assert isinstance(call["args"]["city"], str) and isinstance(call["args"]["days"], int)
    else:
        assert set(call["args"]) == {"query", "limit"} and isinstance(call["args"]["limit"], int)
    assert msg.response_metadata["finish_reason"] == "tool_calls"


def test_a_forced_call_streams_as_tool_call_chunks(served: tuple[str, str]) -> None:
    chunks = list(_remote(served).bind_tools([lookup], tool_choice="lookup").stream("find cats"))
    assert_streams_one_call(chunks, "lookup", {"query", "limit"})


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_structured_output_over_the_server(served: tuple[str, str], method: str) -> None:
    llm = _remote(served, temperature=1.0, seed=2, max_tokens=96)
    weather = llm.with_structured_output(Weather, method=method).invoke("Weather in Oslo tomorrow")
    assert isinstance(weather, Weather)
    schema = {"title": "pick", "type": "object", "properties": {"c": {"enum": ["a", "b"]}}, "required": ["c"]}
    assert llm.with_structured_output(schema, method=method).invoke("pick")["c"] in ("a", "b")


def test_tools_reach_the_server_prompt_and_none_leaves_them_out(served: tuple[str, str]) -> None:
    llm = _remote(served, max_tokens=8)
    local = ChatPhi4Flash(**model_params())
    question = [HumanMessage("hi")]
    with_tools = llm.bind_tools([lookup]).invoke(question).usage_metadata["input_tokens"]
    assert with_tools == local.get_num_tokens_from_messages(question, tools=[lookup])  # the definitions included
    without = llm.bind_tools([lookup], tool_choice="none").invoke(question).usage_metadata["input_tokens"]
    assert without == llm.invoke(question).usage_metadata["input_tokens"] == local.get_num_tokens_from_messages(
        question)
