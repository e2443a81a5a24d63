"""The types every face of phi4flash builds on: generation settings, stream events, completions, and
the ``Engine`` protocol implemented in-process (``LocalEngine``) and over HTTP (``RemoteEngine``).

This module imports only the standard library, so adapters and remote clients can use it cheaply.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from .metrics import LatencyMetrics

if TYPE_CHECKING:
    from .constrained import Constraint

Channel = Literal["reasoning", "answer"]
Message = dict[str, Any]  # {"role": "system"|"user"|"assistant"|"tool", "content": str, ...}

# Called before sampling with the ids generated so far in this completion and the float32 logits
# of shape [vocab]; returns the logits to sample from (set forbidden tokens to -inf).
LogitsProcessor = Callable[[Sequence[int], Any], Any]


@dataclass
class GenerationConfig:
    """How to sample one completion. Defaults follow the model card (temperature 0.6, top_p 0.95).

    ``temperature == 0`` means greedy decoding. ``stop`` strings may span tokens and are trimmed from
    the output. ``min_new_tokens`` keeps the stop tokens away until that many tokens are generated (like
    vLLM's ``min_tokens``). ``constraint`` (a :class:`phi4flash.constrained.Constraint`) keeps the output inside a
    grammar (a JSON schema, a forced tool call); the engine masks every constrained row of a step in one pass.
    ``logits_processor`` runs after it, per row, for anything else.
    """

    max_new_tokens: int = 4096
    min_new_tokens: int = 0
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logits_processor: LogitsProcessor | None = None
    constraint: Constraint | None = None

    @property
    def greedy(self) -> bool:
        """Whether this config decodes greedily."""
        return self.temperature == 0.0

    def validate(self) -> GenerationConfig:
        """Raise ``ValueError`` naming the bad field and its valid range; return self when valid."""

        def bad(name: str, value: Any, rule: str) -> ValueError:
            return ValueError(f"invalid {name}={value!r}: {rule}")

        def finite(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        if not isinstance(self.min_new_tokens, int) or isinstance(self.min_new_tokens, bool) or self.min_new_tokens < 0:
            raise bad("min_new_tokens", self.min_new_tokens, "must be an integer >= 0")
        if not finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "must be a finite number >= 0 (0 means greedy)")
        if not finite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise bad("top_k", self.top_k, "must be an integer >= 0 (0 disables it)")
        if not finite(self.min_p) or not 0 <= self.min_p < 1:
            raise bad("min_p", self.min_p, "must be in [0, 1) (0 disables it)")
        if not finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "must be a finite number > 0 (1 disables it)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise bad("seed", self.seed, "must be a non-negative integer or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", self.stop, "must be a list of non-empty strings")
        return self


@dataclass
class StreamEvent:
    """One piece of a streamed completion.

    Every stream ends with exactly one event whose ``done`` is True, ``text`` empty,
    ``metrics.finish_reason`` set and ``token_ids`` holding every generated token id (stop token
    excluded); other events carry the ids of the step that produced them.
    """

    channel: Channel
    text: str
    metrics: LatencyMetrics
    token_ids: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class Usage:
    """Token counts in the OpenAI / LangChain sense."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    total_tokens: int


@dataclass
class Completion:
    """A whole completion: the reasoning and the answer, separated."""

    reasoning: str
    answer: str
    finish_reason: str
    usage: Usage
    metrics: LatencyMetrics
    token_ids: list[int] = field(default_factory=list)


class PromptTooLongError(ValueError):
    """The prompt (plus at least one new token) does not fit in the model's context."""


def check_messages(messages: Any) -> None:
    """Raise ``ValueError`` unless ``messages`` is a non-empty list of message dicts with a ``role``.

    Engines call it before tokenising, so a mistake gets a message naming it instead of a prompt made of
    nothing (an empty list renders to a bare generation prompt) or of the characters of a string.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, not "
                         f"{type(messages).__name__}; e.g. [{{'role': 'user', 'content': 'Hi'}}]")
    if not messages:
        raise ValueError("empty conversation: give at least one message, e.g. [{'role': 'user', 'content': 'Hi'}]")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', not {message!r:.80}")


@runtime_checkable
class Engine(Protocol):
    """What the web chat, the LangChain model and the server need from an engine."""

    model_name: str
    device: str
    dtype: str
    context_length: int

    def stream(self, messages: Sequence[Message], config: GenerationConfig | None = None, *,
               cancel: threading.Event | None = None) -> Iterator[StreamEvent]:
        """Yield events as tokens arrive; closing the iterator or setting ``cancel`` stops within one step."""
        ...

    def generate(self, messages: Sequence[Message], config: GenerationConfig | None = None, *,
                 cancel: threading.Event | None = None) -> Completion:
        """Run :meth:`stream` to the end and return the whole completion."""
        ...

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Number of prompt tokens these messages render to (with the generation prompt)."""
        ...
