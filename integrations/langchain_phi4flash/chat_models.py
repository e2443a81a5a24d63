"""``ChatPhi4Flash``: a LangChain chat model over a phi4flash engine (in-process or OpenAI-compatible server).

The answer goes to ``content`` and the chain of thought to ``additional_kwargs["reasoning_content"]``, so
langchain-core builds the standard reasoning blocks. Tool calls are prompted through the chat template's
``<|tool|>`` slot and parsed from ``<|tool_call|>`` output; forced calls (``tool_choice``) and structured
output are produced under constrained decoding (after a free, capped ``<think>`` phase), so they are valid
for their schema by construction.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel, generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, SecretStr

from phi4flash import GenerationConfig
from phi4flash import tools as phi_tools

_ENGINES: dict[tuple, Any] = {}
_ENGINES_LOCK = threading.Lock()
_DONE = object()


def get_engine(model: str = "embedded", *, device: str = "auto", dtype: str = "auto", base_url: str | None = None,
               api_key: str | None = None, quantize: str | None = None) -> Any:
    """The process-wide engine for a model, loaded on first use and then shared.

    Args:
        model: "embedded", a hub id or a checkpoint folder (or the model id on a server).
        device: for local engines: "auto", "cpu", "cuda", ...
        dtype: for local engines: "auto" or a dtype name.
        base_url: an OpenAI-compatible server's API root; then a ``phi4flash.RemoteEngine`` is used.
        api_key: for the server.
        quantize: for local engines: "int8", "int4", "int4-g<group size>" or None (weight-only quantization).

    Returns:
        An object implementing ``phi4flash.Engine``.
    """
    key = ("remote", base_url, model, api_key) if base_url else ("local", model, device, dtype, quantize)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            if base_url:
                from phi4flash.remote import RemoteEngine

                engine = RemoteEngine(base_url, model, api_key)
            else:
                import phi4flash

                engine = phi4flash.load(model, device=device, dtype=dtype, quantize=quantize)
            _ENGINES[key] = engine
        return engine


# --------------------------------------------------------------------------------------- messages


def _text_of(content: Any) -> str:
    """The text of a message's content (a string, or a list of blocks: text kept, others skipped)."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, Mapping) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)


def to_engine_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """Convert LangChain messages into phi4flash's message dicts.

    Assistant tool calls are written back in the model's ``<|tool_call|>`` format; reasoning is not sent
    back; tool results become ``{"role": "tool"}`` messages.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        if isinstance(message, SystemMessage):
            out.append({"role": "system", "content": _text_of(message.content)})
        elif isinstance(message, HumanMessage):
            out.append({"role": "user", "content": _text_of(message.content)})
        elif isinstance(message, AIMessage):
            calls = [(c["name"], c.get("args") or {}) for c in message.tool_calls]
            out.append(phi_tools.assistant_message(_text_of(message.content), calls))
        elif isinstance(message, ToolMessage):
            text = _text_of(message.content)
            if getattr(message, "status", "success") == "error":
                text = f"Error: {text}"
            out.append(phi_tools.tool_result_message(text))
        elif isinstance(message, ChatMessage):
            out.append({"role": message.role, "content": _text_of(message.content)})
        else:
            raise ValueError(f"unsupported message type {type(message).__name__}")
    return out


def _response_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema the answer must follow, from an OpenAI-style ``response_format``."""
    if not response_format:
        return None
    if isinstance(response_format, Mapping):
        kind = response_format.get("type")
        if kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            return dict(spec.get("schema") or {"type": "object"})
        if kind == "json_object":
            return dict(response_format.get("schema") or {"type": "object"})
        if "properties" in response_format or "type" in response_format:
            return dict(response_format)
    return convert_to_json_schema(response_format)


# ------------------------------------------------------------------------------------------- model


class ChatPhi4Flash(BaseChatModel):
    """Phi-4-mini-flash-reasoning as a LangChain chat model.

    Example:
        ```python
        from langchain_phi4flash import ChatPhi4Flash

        llm = ChatPhi4Flash(model="embedded", temperature=0, max_tokens=256)
        msg = llm.invoke("Solve 3x + 5 = 20")
        msg.content, msg.additional_kwargs.get("reasoning_content"), msg.usage_metadata
        ```

    Construction is cheap: the engine loads on first use, once per process and model (shared by all
    instances). Pass ``engine=`` to use an existing engine, or ``base_url=`` for an OpenAI-compatible server.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=())

    model_name: str = Field(default="embedded", alias="model")
    """"embedded", a hub id (``microsoft/Phi-4-mini-flash-reasoning``), a checkpoint folder, or a server's model id."""
    engine: Any = Field(default=None, exclude=True)
    """An existing engine (``phi4flash.Engine``); overrides ``model``/``base_url`` loading."""
    base_url: str | None = None
    """An OpenAI-compatible server's API root (then ``phi4flash.RemoteEngine`` is used)."""
    api_key: SecretStr | None = None
    """The server's API key."""
    device: str = "auto"
    """Local engines: "auto" (cuda > mps > cpu), "cpu", "cuda", ..."""
    dtype: str = "auto"
    """Local engines: "auto" (bf16 on CUDA and for quantized weights, fp32 elsewhere) or a dtype name."""
    quantize: str | None = None
    """Local engines: weight-only quantization, "int8", "int4" or "int4-g<group size>" (None: as stored)."""
    temperature: float = 0.6
    """Sampling temperature; 0 means greedy."""
    max_tokens: int = Field(default=4096, alias="max_new_tokens")
    """Most new tokens per call (reasoning included)."""
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Stop strings (trimmed from the output); merged with those given per call."""
    streaming: bool = False
    """Whether ``invoke`` streams internally (callbacks then see every token)."""
    reasoning_format: Literal["parsed", "raw", "hidden"] = "parsed"
    """"parsed": reasoning in ``additional_kwargs["reasoning_content"]``; "raw": inline in ``<think>`` tags;
    "hidden": dropped."""
    reasoning_budget: int | None = None
    """Force ``</think>`` after this many reasoning tokens (constrained calls default to half of max_tokens)."""
    require_answer: bool = True
    """Never stop before the answer has some text (a stop token is masked until then)."""

    @property
    def _llm_type(self) -> str:
        return "phi4flash"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "base_url": self.base_url,
            "device": self.device,
            "dtype": self.dtype,
            "quantize": self.quantize,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "reasoning_format": self.reasoning_format,
            "reasoning_budget": self.reasoning_budget,
        }

    def _resolve_model_profile(self) -> dict[str, Any] | None:
        return {
            "open_weights": True,
            "max_input_tokens": 65536,
            "max_output_tokens": 32768,
            "reasoning_output": True,
            "text_inputs": True,
            "image_inputs": False,
            "text_outputs": True,
            "temperature": True,
            "tool_calling": True,
            "tool_choice": True,
            "tool_call_streaming": True,
            # False on purpose: agents then use a forced tool call for their response format, which works
            # together with other tools (a JSON-schema response format would exclude tool calls).
            "structured_output": False,
        }

    # -- engine --------------------------------------------------------------------------------------

    def get_engine(self) -> Any:
        """The engine this model generates with (loaded and cached on first use)."""
        if self.engine is not None:
            return self.engine
        key = self.api_key.get_secret_value() if self.api_key is not None else None
        return get_engine(self.model_name, device=self.device, dtype=self.dtype, base_url=self.base_url, api_key=key,
                          quantize=self.quantize)

    def _tokenizer(self) -> Any:
        return getattr(self.get_engine(), "tokenizer", None)

    # -- token counting ------------------------------------------------------------------------------

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's own tokenizer."""
        tokenizer = self._tokenizer()
        if tokenizer is None:
            # A remote engine has no local tokenizer: count a bare user turn without its template tokens.
            engine = self.get_engine()
            n = engine.count_tokens([{"role": "user", "content": text}]) - engine.count_tokens(
                [{"role": "user", "content": ""}])
            return list(range(max(0, n)))
        return list(tokenizer.encode(text))

    def get_num_tokens_from_messages(self, messages: list[BaseMessage],
                                     tools: Sequence[dict[str, Any] | type | Callable | BaseTool] | None = None) -> int:
        """Prompt tokens of ``messages`` (and ``tools``) after the chat template, generation prompt included."""
        formatted = [convert_to_openai_tool(t) for t in tools] if tools else None
        rendered = phi_tools.attach_tools(to_engine_messages(messages), formatted)
        return int(self.get_engine().count_tokens(rendered))

    # -- tools and structured output -------------------------------------------------------------------

    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: dict | str | bool | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; ``tool_choice`` "auto"/None (model decides), "none", "any"/"required"/True (force a
        call), a tool name or ``{"type": "function", "function": {"name": ...}}`` (force that tool).

        Forced calls are generated under constrained decoding, so their arguments follow the tool's schema.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None:
            phi_tools.forced_tools(formatted, tool_choice)  # validate the name now rather than at call time
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(self, schema: dict | type, *,
                               method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
                               include_raw: bool = False, strict: bool | None = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, dict | Any]:
        """Structured output for a pydantic class (v1 or v2), a TypedDict or a JSON schema.

        Every method constrains decoding (after the reasoning) so the output is valid for the schema:
        "json_schema" (default) and "json_mode" make the answer the JSON document; "function_calling"
        forces a call of a tool built from the schema.
        """
        del strict  # output is always schema-valid
        if kwargs:
            raise ValueError(f"unsupported arguments {sorted(kwargs)}")
        if schema is None:
            raise ValueError("with_structured_output needs a schema")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        trace = {"kwargs": {"method": method}, "schema": schema}
        parser: Runnable
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format=trace)
            parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                      else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method in ("json_schema", "json_mode"):
            json_schema = _json_schema_of(schema)
            if method == "json_schema":
                response_format = {"type": "json_schema", "json_schema": {"name": json_schema.get("title", "output"),
                                                                          "schema": json_schema}}
            else:
                response_format = {"type": "json_object", "schema": json_schema}
            llm = self.bind(response_format=response_format, ls_structured_output_format=trace)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"invalid method {method!r}: use 'json_schema', 'function_calling' or 'json_mode'")
        if include_raw:
            parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
            fallback = RunnablePassthrough.assign(parsed=lambda _: None)
            return RunnableMap(raw=llm) | parse.with_fallbacks([fallback], exception_key="parsing_error")
        return llm | parser

    # -- generation ------------------------------------------------------------------------------------

    def _config(self, stop: list[str] | None, max_tokens: int, processor: Any, constraint: Any) -> GenerationConfig:
        stops = list(dict.fromkeys([*(self.stop or []), *(stop or [])]))
        return GenerationConfig(max_new_tokens=max_tokens, temperature=float(self.temperature), top_p=self.top_p,
                                top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                                seed=self.seed, stop=stops, logits_processor=processor, constraint=constraint)

    def _plan(self, messages: list[BaseMessage], stop: list[str] | None,
              kwargs: dict[str, Any]) -> tuple[list[dict[str, Any]], GenerationConfig, bool, bool, dict[str, Any]]:
        """Prompt, generation config, whether tool calls are parsed, whether a call is forced, and the request
        fields a server gets (tools, tool_choice, response_format: a remote engine constrains on the server)."""
        from phi4flash import RemoteEngine
        from phi4flash.constrained import constraint_for, optional_calls
        from phi4flash.reasoning import AnswerGuard

        tools = list(kwargs.get("tools") or [])
        tool_choice = kwargs.get("tool_choice")
        if tool_choice == "none":
            tools_for_prompt: list[dict[str, Any]] = []
        else:
            tools_for_prompt = tools
        forced = phi_tools.forced_tools(tools, tool_choice)
        schema = _response_schema(kwargs.get("response_format")) if not forced else None
        max_tokens = int(kwargs.get("max_tokens") or self.max_tokens)
        processor: Any = None
        constraint: Any = None
        engine = self.get_engine()
        if isinstance(engine, RemoteEngine):
            request = {"tools": tools_for_prompt or None,
                       "tool_choice": _openai_tool_choice(tools, tool_choice) if tools_for_prompt else None,
                       "response_format": _openai_response_format(schema)}
            return (to_engine_messages(messages), self._config(stop, max_tokens, None, None), bool(tools_for_prompt),
                    bool(forced), request)
        prompt = phi_tools.attach_tools(to_engine_messages(messages), tools_for_prompt)
        tokenizer = getattr(engine, "tokenizer", None)
        if (forced or schema is not None) and tokenizer is not None:
            constraint = constraint_for(tokenizer, tools=forced, schema=schema, max_new_tokens=max_tokens,
                                        max_reasoning_tokens=self.reasoning_budget)
        elif tokenizer is not None:
            # tool_choice "auto": any call the model opens is a valid one (None without tools)
            constraint = optional_calls(tokenizer, tools_for_prompt, max_new_tokens=max_tokens)
            if self.require_answer or self.reasoning_budget is not None:
                processor = AnswerGuard(tokenizer, max_new_tokens=max_tokens,
                                        max_reasoning_tokens=self.reasoning_budget, require_answer=self.require_answer)
        config = self._config(stop, max_tokens, processor, constraint)
        return prompt, config, bool(tools_for_prompt), bool(forced), {}

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        prompt, config, parse_tools, forced, request = self._plan(messages, stop, kwargs)
        engine = self.get_engine()
        cancel = threading.Event()
        parser = phi_tools.ToolCallStreamParser(allow_bare_json=not forced) if parse_tools else None
        model_name = getattr(engine, "model_name", None) or self.model_name
        reasoning_open = False
        blocks = _BlockPositions()
        last = None
        events = engine.stream(prompt, config, cancel=cancel, **request)
        try:
            for event in events:
                if event.done:
                    last = event
                    break
                if not event.text:
                    continue
                chunks: list[AIMessageChunk] = []
                if event.channel == "reasoning":
                    if self.reasoning_format == "parsed":
                        blocks.see("reasoning")
                        chunks.append(AIMessageChunk(content="", additional_kwargs={"reasoning_content": event.text}))
                    elif self.reasoning_format == "raw":
                        blocks.see("text")
                        chunks.append(AIMessageChunk(content=("" if reasoning_open else "<think>") + event.text))
                        reasoning_open = True
                else:
                    text = event.text
                    if reasoning_open:
                        text, reasoning_open = "</think>" + text, False
                    chunks.extend(_answer_chunks(parser, text, blocks))
                for chunk in chunks:
                    gen = ChatGenerationChunk(message=chunk)
                    if run_manager is not None:
                        run_manager.on_llm_new_token(chunk.text, chunk=gen)
                    yield gen
        finally:
            cancel.set()
            close = getattr(events, "close", None)
            if close is not None:
                close()
        tail: list[AIMessageChunk] = []
        if reasoning_open:
            tail.append(AIMessageChunk(content="</think>"))
        if parser is not None:
            tail.extend(_items_to_chunks(parser.finish(), blocks))
        for chunk in tail:
            gen = ChatGenerationChunk(message=chunk)
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=gen)
            yield gen
        metrics = last.metrics if last is not None else None
        called = parser is not None and bool(parser.calls or parser.invalid)
        finish = "tool_calls" if called else (metrics.finish_reason if metrics is not None else "stop")
        info: dict[str, Any] = {"model_name": model_name, "finish_reason": finish, "model_provider": "phi4flash"}
        usage = None
        if metrics is not None:
            info["latency"] = metrics.to_dict()
            info["time_to_first_token_s"] = metrics.time_to_first_token_s
            info["decode_tokens_per_s"] = metrics.decode_tokens_per_s
            usage = UsageMetadata(input_tokens=metrics.prompt_tokens, output_tokens=metrics.completion_tokens,
                                  total_tokens=metrics.prompt_tokens + metrics.completion_tokens,
                                  output_token_details={"reasoning": metrics.reasoning_tokens})
        final = AIMessageChunk(content="", usage_metadata=usage, chunk_position="last")
        gen = ChatGenerationChunk(message=final, generation_info=info)
        if run_manager is not None:
            run_manager.on_llm_new_token("", chunk=gen)
        yield gen

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop=stop, run_manager=run_manager, **kwargs))

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        # The engine's iterator blocks: drive it from a worker thread and hand chunks over through an
        # asyncio queue, so the event loop keeps serving other coroutines while tokens are generated.
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stopped = threading.Event()

        def produce() -> None:
            iterator = self._stream(messages, stop=stop, **kwargs)
            try:
                for item in iterator:
                    if stopped.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                iterator.close()
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        worker = threading.Thread(target=produce, name="phi4flash-langchain-astream", daemon=True)
        worker.start()
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                if run_manager is not None:
                    await run_manager.on_llm_new_token(item.message.text, chunk=item)
                yield item
        finally:
            stopped.set()

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        chunks = [c async for c in self._astream(messages, stop=stop, run_manager=run_manager, **kwargs)]
        return generate_from_stream(iter(chunks))


def _json_schema_of(schema: dict | type) -> dict[str, Any]:
    """A JSON schema for a pydantic class (v1 or v2), a TypedDict, an OpenAI tool or a JSON schema dict."""
    if isinstance(schema, type) and is_basemodel_subclass(schema):
        if hasattr(schema, "model_json_schema"):
            return schema.model_json_schema()
        return schema.schema()  # pydantic.v1
    if isinstance(schema, Mapping) and "function" in schema:
        return dict(schema["function"].get("parameters") or {})
    return convert_to_json_schema(schema)


def _openai_tool_choice(tools: Sequence[Mapping[str, Any]], tool_choice: Any) -> str | dict[str, Any]:
    """LangChain's ``tool_choice`` in OpenAI's request form ("auto", "required" or a named function)."""
    forced = phi_tools.forced_tools(tools, tool_choice)
    if forced is None:
        return "auto"
    if len(forced) == len(tools) and (tool_choice is True or tool_choice in ("required", "any")):
        return "required"
    return {"type": "function", "function": {"name": phi_tools.tool_definitions(forced)[0]["name"]}}


def _openai_response_format(schema: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """An OpenAI ``response_format`` asking for a document of ``schema`` (None: free text)."""
    if schema is None:
        return None
    name = str(schema.get("title") or "output")
    return {"type": "json_schema", "json_schema": {"name": name, "schema": dict(schema)}}


class _BlockPositions:
    """Where each content block of a stream sits, for the ``index`` of its tool-call chunks.

    LangChain's v1 stream numbers the blocks that carry no index (reasoning, text) by counting changes of block
    type, and joins blocks of equal index when chunks are added: a call indexed by its ordinal (0) after the
    reasoning (block 0) was merged into the reasoning block. A call's index is its block's position instead.
    """

    def __init__(self) -> None:
        self.kind: str | None = None
        self.position = -1
        self.calls: dict[int, int] = {}

    def see(self, kind: str) -> None:
        """A chunk of a reasoning or text block is emitted."""
        if kind != self.kind:
            self.kind, self.position = kind, self.position + 1

    def call(self, ordinal: int) -> int:
        """The index of the tool call numbered ``ordinal`` (a new block for each call)."""
        if ordinal not in self.calls:
            self.kind, self.position = "tool_call_chunk", self.position + 1
            self.calls[ordinal] = self.position
        return self.calls[ordinal]


def _answer_chunks(parser: phi_tools.ToolCallStreamParser | None, text: str,
                   blocks: _BlockPositions) -> list[AIMessageChunk]:
    if parser is None:
        blocks.see("text")
        return [AIMessageChunk(content=text)]
    return _items_to_chunks(parser.feed(text), blocks)


def _items_to_chunks(items: list[phi_tools.StreamItem], blocks: _BlockPositions) -> list[AIMessageChunk]:
    chunks = []
    for item in items:
        if item.kind == "text":
            if item.text:
                blocks.see("text")
                chunks.append(AIMessageChunk(content=item.text))
        elif item.kind == "call":
            chunks.append(AIMessageChunk(content="", tool_call_chunks=[
                {"name": item.name, "args": item.args, "id": item.id, "index": blocks.call(item.index),
                 "type": "tool_call_chunk"}]))
        elif item.kind == "invalid" and item.name is None:
            # A tag whose payload never named a tool: keep what the model wrote as text.
            blocks.see("text")
            chunks.append(AIMessageChunk(content=phi_tools.TOOL_CALL_OPEN + item.text))
    return chunks
