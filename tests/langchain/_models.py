"""Model parameters for the LangChain tests: the embedded checkpoint when it is present, else an in-process
tiny random-weight engine with a trained byte-level tokenizer (same engine code, smaller model)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

EMBEDDED = TESTS.parent / "phi4flash" / "embedded"


def embedded_available() -> bool:
    """Whether the embedded checkpoint ships weights and a tokenizer."""
    return (EMBEDDED / "config.json").is_file() and any(EMBEDDED.glob("*.safetensors"))


@functools.lru_cache(maxsize=1)
def tiny_engine() -> Any:
    """A LocalEngine over a tiny random model and the in-test tokenizer (built once per process)."""
    from _tiny_tokenizer import tiny_chat_tokenizer
    from model_helpers import tiny_model

    from phi4flash import LocalEngine

    tokenizer = tiny_chat_tokenizer()
    eos = tokenizer.token_to_id("<|end|>")
    model = tiny_model(vocab_size=tokenizer.vocab_size, eos_token_id=eos, bos_token_id=eos, pad_token_id=eos,
                       context_length=4096)
    return LocalEngine(model, tokenizer, model_name="tiny-random")


def model_params() -> dict[str, Any]:
    """Constructor arguments of ChatPhi4Flash for the CPU tests (small budgets keep the suites fast)."""
    # max_tokens is a hard cap (as in the OpenAI API): room for a forced call of the standard tools (~50 tokens).
    base: dict[str, Any] = {"temperature": 0, "max_tokens": 96, "reasoning_budget": 16}
    if embedded_available():
        return {"model": "embedded", **base}
    return {"engine": tiny_engine(), **base}


def engine_of(params: dict[str, Any]) -> Any:
    """The engine a ChatPhi4Flash built from ``params`` uses."""
    from langchain_phi4flash import ChatPhi4Flash

    return ChatPhi4Flash(**params).get_engine()


class ScriptedEngine:
    """The real engine, with the first tokens of every completion forced to ``script`` (then the caller's
    own logits processor applies): deterministic reasoning/answer text through the real decode path."""

    def __init__(self, engine: Any, script: str) -> None:
        self._engine = engine
        self.script = engine.tokenizer.encode(script)
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.device, self.dtype, self.context_length = engine.device, engine.dtype, engine.context_length

    def _config(self, config: Any) -> Any:
        import dataclasses

        import torch

        inner = config.logits_processor
        script = self.script
        stops = sorted(self.tokenizer.stop_token_ids)

        def force(ids: Any, logits: Any) -> Any:
            n = len(ids)
            if n <= len(script):
                out = torch.full_like(logits, float("-inf"))
                out[script[n] if n < len(script) else stops[0]] = 0.0
                return out
            return inner(ids, logits) if inner is not None else logits

        return dataclasses.replace(config, logits_processor=force)

    def stream(self, messages: Any, config: Any = None, *, cancel: Any = None) -> Any:
        return self._engine.stream(messages, self._config(config), cancel=cancel)

    def generate(self, messages: Any, config: Any = None, *, cancel: Any = None) -> Any:
        return self._engine.generate(messages, self._config(config), cancel=cancel)

    def count_tokens(self, messages: Any) -> int:
        return self._engine.count_tokens(messages)


def assert_streams_one_call(chunks: list[Any], name: str, args: set[str]) -> None:
    """A streamed forced call: announced by name in a tool_call_chunk, and whole once the chunks are added up."""
    with_calls = [c for c in chunks if c.tool_call_chunks]
    assert with_calls and with_calls[0].tool_call_chunks[0]["name"] == name
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.tool_calls[0]["name"] == name and set(full.tool_calls[0]["args"]) == args
