"""Constrained decoding on llguidance: the answer is one JSON document valid for a schema, or one forced tool
call in the Phi-4-mini syntax (``<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>``), after a free
``<think>...</think>`` phase capped by a reasoning budget.

llguidance (the engine behind the structured outputs of OpenAI, llama.cpp and vLLM) compiles the grammar and
computes each step's allowed tokens; this module writes the grammar (Lark with inline ``%json`` schemas),
bridges the tokenizer and applies the masks. The engine masks every constrained row of a decode step with
:func:`mask_logits` in one pass (llguidance fills the masks on its own threads, without the GIL).

Guarantees: every token keeps the output a valid prefix of the grammar; stop tokens are allowed only when the
document is complete (and are the only choice once nothing can follow); the reasoning gets at most
``max_reasoning_tokens`` tokens, then the rest of ``</think>`` is forced. The token budget: when only the
document's shortest completion still fits in ``max_new_tokens``, that completion is forced, so the document
ends complete; only when even that does not fit does the output stop at the budget with ``finish_reason ==
"length"`` and an incomplete document, which is what the OpenAI API does whenever the budget runs out.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance
import numpy as np
import torch

from .reasoning import ReasoningBudget
from .tokenizer import ChatTokenizer

__all__ = ["Constraint", "constraint_for", "json_grammar", "mask_logits", "optional_calls", "tool_call_grammar"]

logger = logging.getLogger(__name__)

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<|tool_call|>", "<|/tool_call|>"
# Compact JSON as json.dumps writes it (and the model saw in training): no free whitespace to ramble in.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Bytes that end a JSON document soonest, best first: close an object, an array; end the value (before a digit,
# which would only lengthen a number); the shortest scalars; open a string, an array, an object. The shortest
# completion is found greedily over single-byte tokens in this order.
_CLOSING_BYTES = b'}],0"nft[{'
_FREE_TEXT = 32  # at least this many bytes allowed: inside free text (a string), where only '"' ends anything
# Within this many tokens of the budget's end, each sampled token must leave the document completable in time.
_BUDGET_MARGIN = 24

_LOCK = threading.Lock()
_VOCABS: weakref.WeakKeyDictionary[ChatTokenizer, _Vocabulary] = weakref.WeakKeyDictionary()
_EXECUTOR: llguidance.LLExecutor | None = None


class _Vocabulary:
    """A tokenizer as llguidance reads it (its TokenizerWrapper protocol), plus the single-byte tokens.

    Added tokens are special to llguidance: grammars name them (``<|tool_call|>``) and they never match text.
    """

    is_tokenizer_wrapper = True

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        names = tokenizer.added_tokens
        data = tokenizer.token_bytes()
        self.tokens = [d if d is not None else names.get(i, "").encode() for i, d in enumerate(data)]
        self.special_token_ids = sorted(names)
        self.eos_token_id = min(tokenizer.stop_token_ids)
        self.bos_token_id = None
        self._encode = tokenizer.backend.encode
        self.single = {d[0]: i for i, d in enumerate(data) if d is not None and len(d) == 1}
        # The single-byte tokens in the order a shortest completion tries them: whitespace last, "<" never.
        ranked = sorted((chr(b).isspace(), b) for b in self.single if b != ord("<"))
        self.ranked_bytes = np.array([b for _, b in ranked], dtype=np.uint8)
        self.ranked_ids = np.array([self.single[b] for _, b in ranked], dtype=np.int64)
        self.ll = llguidance.LLTokenizer(self, eos_token=sorted(tokenizer.stop_token_ids))

    def __call__(self, text: str) -> list[int]:
        return self._encode(text, add_special_tokens=False).ids


def _vocabulary(tokenizer: ChatTokenizer) -> _Vocabulary:
    """Built once per tokenizer (about two seconds for the real 200k-token vocabulary)."""
    with _LOCK:
        vocab = _VOCABS.get(tokenizer)
        if vocab is None:
            vocab = _VOCABS[tokenizer] = _Vocabulary(tokenizer)
        return vocab


# ----------------------------------------------------------------------------------------------- grammars


def _lark(answer: str, reasoning: bool) -> str:
    """A whole-output grammar: optional reasoning, a little whitespace, then ``answer``."""
    lines = ["%llguidance {}", f"start: {'think? ' if reasoning else ''}WS answer", f"answer: {answer}",
             r"WS: /[ \t\r\n]{0,2}/"]
    if reasoning:  # lazy: the block ends at its first </think>
        lines += ["think[lazy]: THINK", r'THINK: "<think>" /(?s:.*)/ "</think>"']
    return "\n".join(lines) + "\n"


def _inline_json(schema: Mapping[str, Any] | bool) -> str:
    """``schema`` as an inline llguidance JSON rule, its objects closed (:func:`closed_objects`)."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, Mapping):
        raise ValueError(f"invalid JSON schema {schema!r}: must be an object or a boolean")
    return "%json " + json.dumps({**closed_objects(schema), "x-guidance": JSON_LAYOUT}, ensure_ascii=False)


# keywords whose value maps names to subschemas (the names are not keywords)
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LITERALS = ("const", "enum", "default", "examples")  # values, not subschemas
_OPENING_KEYS = frozenset({"additionalProperties", "patternProperties", "unevaluatedProperties", "allOf"})


def closed_objects(schema: Any, *, close: bool = True) -> Any:
    """``schema`` with ``"additionalProperties": false`` on every object schema that declares properties and
    says nothing about others, at any depth: the declared keys only, as OpenAI's strict mode and xgrammar's
    default do (JSON Schema itself would let a model add any key). An explicit ``additionalProperties``,
    ``patternProperties`` or ``unevaluatedProperties`` is kept as it is, and the members of an ``allOf`` stay
    open (each would forbid the others' keys)."""
    if isinstance(schema, list):
        return [closed_objects(item, close=close) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, Mapping):
            out[key] = {name: closed_objects(sub) for name, sub in value.items()}
        else:
            out[key] = value if key in _LITERALS else closed_objects(value, close=key != "allOf")
    if close and "properties" in out and not _OPENING_KEYS & out.keys():
        out["additionalProperties"] = False
    return out


def json_grammar(schema: Mapping[str, Any] | bool, *, reasoning: bool = True) -> str:
    """The grammar of an output that is one JSON document valid for ``schema`` (after optional reasoning).
    Objects hold their declared properties only unless the schema allows others (:func:`closed_objects`)."""
    return _lark(_inline_json(schema), reasoning)


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], *, reasoning: bool = True, required: bool = True) -> str:
    """The grammar of an output that holds a call of one of ``tools`` (OpenAI-style dicts or ``{name,
    parameters}``) in the Phi-4-mini syntax, after optional reasoning.

    ``required``: the output is exactly one call. Otherwise (``tool_choice="auto"``) the answer is free text,
    which may end in one call block of one or more calls: the model decides whether to call, and a call, once
    opened with ``<|tool_call|>``, names a listed tool and gives the arguments its schema declares (what
    llama.cpp's lazy tool-call grammars do)."""
    from .tools import tool_definitions

    calls = []
    for tool in tool_definitions(tools):
        head = '{"name": ' + json.dumps(tool["name"], ensure_ascii=False) + ', "arguments": '
        # the declared arguments only, unless told otherwise (_inline_json closes the objects)
        calls.append(f'{json.dumps(head, ensure_ascii=False)} {_inline_json(tool["parameters"])} "}}"')
    if not calls:
        raise ValueError("a tool call grammar needs at least one tool")
    call = f'({" | ".join(calls)})'
    if required:
        return _lark(f'{TOOL_CALL_OPEN} "[" {call} "]" {TOOL_CALL_CLOSE}', reasoning)
    # Free text cannot hold an added token (they never match text), so <|tool_call|> is where a call must begin.
    block = f'{TOOL_CALL_OPEN} "[" {call} (", " {call})* "]" {TOOL_CALL_CLOSE}'
    return _lark(f"TEXT ({block})?", reasoning) + "TEXT: /(?s:.*)/\n"


# ----------------------------------------------------------------------------------------------- following


class Constraint:
    """Keeps one generation inside a grammar (from :func:`json_grammar` or :func:`tool_call_grammar`).

    Set it as ``GenerationConfig.constraint``; the engine calls :func:`mask_logits` before each sampling step.
    It is stateful: build a new one per generation.
    """

    def __init__(self, tokenizer: ChatTokenizer, grammar: str, *, max_new_tokens: int | None = None,
                 max_reasoning_tokens: int | None = None, free_text: bool = False) -> None:
        """Compile ``grammar`` for ``tokenizer``.

        Args:
            tokenizer: the engine's tokenizer.
            grammar: an llguidance (Lark) grammar of the whole output.
            max_new_tokens: the generation's budget (the shortest completion is forced when only it fits).
            max_reasoning_tokens: ``</think>`` is forced after this many reasoning tokens (None: no cap).
            free_text: the grammar lets the answer be free text (``tool_choice="auto"``): the reasoning is then
                closed by its cap only, not to make room for a document that may never come.

        Raises:
            ValueError: the grammar (or a JSON schema in it) cannot be compiled; the message says why.
        """
        self.vocab = _vocabulary(tokenizer)
        self.matcher = llguidance.LLMatcher(self.vocab.ll, grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"cannot constrain to this schema: {self.matcher.get_error()}")
        self.reasoning = ReasoningBudget(tokenizer, max_reasoning_tokens)
        self.max_new_tokens = max_new_tokens
        self.free_text = free_text
        self.stop_ids = sorted(tokenizer.stop_token_ids)
        self.vocab_size = tokenizer.vocab_size
        self._seen = 0
        plan = self._shortest_completion(self.matcher, limit=1024)
        self._closing_cost = len(plan) if plan is not None else 0  # tokens the shortest document needs

    def follow(self, generated_ids: Sequence[int]) -> None:
        """Consume the tokens generated since the last call."""
        for token_id in generated_ids[self._seen:]:
            self.reasoning.feed(int(token_id))
            if not self.matcher.is_error() and not self.matcher.consume_token(int(token_id)):
                logger.warning("a token outside the grammar was sampled (%s); ending the generation",
                               self.matcher.get_error().splitlines()[0])
        self._seen = len(generated_ids)

    def canonical(self, generated_ids: Sequence[int], token: int) -> int:
        """The token to emit for ``token``, sampled after ``generated_ids``: where the grammar forces the text
        that follows ``token``, the longer token that the tokenizer writes for the start of the two together,
        else ``token``. The text is the same either way.

        The model picks ``", "`` and the grammar then forces ``description": "`` (the only key left); the
        tokenizer writes ``", "description": "`` as one token, and that is all the model saw in training, so
        without this the forced text would come in tokens it never saw there, and the copy that follows them
        (the description itself) goes wrong more often.
        """
        self.follow(generated_ids)
        if self.matcher.is_error() or token in self.vocab.special_token_ids:
            return token
        after = self.matcher.deep_copy()
        if not after.consume_token(token):
            return token
        forced = after.compute_ff_bytes().split(b"\xff", 1)[0]  # (an added token, such as <|/tool_call|>, ends it)
        if not forced:
            return token
        head = self.vocab.tokens[token]
        try:
            ids = self.vocab((head + forced).decode())
        except UnicodeDecodeError:  # a token that ends inside a character: the tokenizer cannot take its text
            return token
        if not ids or ids[0] == token:
            return token
        longer = self.vocab.tokens[ids[0]]
        if len(longer) <= len(head) or not longer.startswith(head) or not self.matcher.deep_copy().consume_token(
                ids[0]):
            return token
        return ids[0]

    def narrowed(self, logits: torch.Tensor, allowed: np.ndarray) -> list[int] | None:
        """The only tokens allowed next when more than the grammar decides, else None (the grammar's mask).

        The reasoning cap forces ``</think>``; text the grammar forces comes in its canonical tokens; near the
        end of the budget only the likeliest tokens after which the document can still be completed in time
        are kept (and failing those, the shortest completion is forced).

        Args:
            logits: the row's logits ([vocab]).
            allowed: the grammar's mask of the row ([vocab] bool).
        """
        left = None if self.max_new_tokens is None else self.max_new_tokens - self._seen
        closing = self.reasoning.closing(None if self.free_text else left, reserve=self._closing_cost + 1)
        if closing is not None:  # the tag as the model writes it, where the grammar takes that
            return [t for t in closing if t < len(allowed) and allowed[t]] or closing
        if self.reasoning.thinking or (self.reasoning.thinking is None and self._seen):
            return None  # (undecided: the head may be a partial "<think>")
        forced_text = self.matcher.compute_ff_tokens()
        if forced_text or left is None or left > 2 * self._closing_cost + _BUDGET_MARGIN:
            return forced_text[:1] or None
        plan = self._shortest_completion(self.matcher, limit=left - 1)
        if plan is None:
            return None  # the document cannot be completed in time whatever comes: it stops at "length"
        self._closing_cost = len(plan)
        if left > len(plan) + 1 + _BUDGET_MARGIN:  # (+ 1: the stop token)
            return None
        fits = []
        likeliest = torch.argsort(logits.masked_fill(~torch.from_numpy(allowed[:len(logits)]), float("-inf")),
                                  descending=True)[:8].tolist()
        for token in (t for t in likeliest if allowed[t]):
            after = self.matcher.deep_copy()
            if token in self.stop_ids or (after.consume_token(token) and self._shortest_completion(
                    after, limit=left - 2) is not None):
                fits.append(token)
        return fits or (plan[:1] or self.stop_ids[:1])

    def _shortest_completion(self, matcher: llguidance.LLMatcher, limit: int) -> list[int] | None:
        """Tokens that complete the document from ``matcher``'s state soon, or None when none is found within
        ``limit`` tokens: forced text in its canonical tokens, else a greedy step (:meth:`_closing_step`)."""
        matcher, plan = matcher.deep_copy(), []
        while len(plan) <= limit and not matcher.is_error():
            if matcher.is_accepting():
                return plan
            step = matcher.compute_ff_tokens() or self._closing_step(matcher)
            if not step:
                return None
            matcher.consume_tokens(step)
            plan += step
        return None

    def _closing_step(self, matcher: llguidance.LLMatcher) -> list[int]:
        """One greedy step towards the end: a grammar token if one is allowed (``<|/tool_call|>``); inside free
        text the closing quote, else ``@`` or ``.`` (what e-mail addresses and host names need), else the smallest
        allowed byte; elsewhere the byte that ends soonest (close an object or array, the shortest scalars), else
        the smallest allowed one. Whitespace comes last and ``<`` never (it opens the reasoning). Being greedy, it
        can miss a completion that a pattern only allows by a detour; such a document ends at the budget."""
        allowed = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        special = [i for i in self.vocab.special_token_ids if i < len(allowed) and allowed[i]]
        vocab = self.vocab
        options = vocab.ranked_bytes[allowed[vocab.ranked_ids].astype(bool)].tobytes()
        if special or not options:
            return special[:1]
        preferred = b'"@.' if len(options) >= _FREE_TEXT else _CLOSING_BYTES
        return [vocab.single[next((b for b in preferred if b in options), options[0])]]


def _executor() -> llguidance.LLExecutor:
    global _EXECUTOR
    with _LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = llguidance.LLExecutor()
        return _EXECUTOR


def mask_logits(logits: torch.Tensor, constraints: Sequence[Constraint],
                generated: Sequence[Sequence[int]]) -> torch.Tensor:
    """Mask rows of ``logits`` ([rows, vocab]) so each row can only sample what its constraint allows next.

    Args:
        logits: one row per constraint.
        constraints: the rows' constraints.
        generated: each row's generated ids so far (the constraint catches up on them first).

    Returns:
        The logits with disallowed tokens at -inf (a new tensor).
    """
    for constraint, ids in zip(constraints, generated, strict=True):
        constraint.follow(ids)
    width = max(c.vocab_size for c in constraints)
    bitmask = np.zeros((len(constraints), (width + 31) // 32), dtype=np.int32)
    live = [(c.matcher, row) for row, c in enumerate(constraints) if not c.matcher.is_error()]
    if live:
        _executor().unsafe_compute_mask_ptr(live, bitmask.ctypes.data, bitmask.shape[1] * 4, len(constraints))
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :width].astype(bool)
    for row, constraint in enumerate(constraints):
        only = constraint.stop_ids if constraint.matcher.is_error() else constraint.narrowed(logits[row],
                                                                                            allowed[row])
        if only is not None:
            allowed[row] = False
            allowed[row, only] = True
    if logits.shape[-1] > width:  # ids past the tokenizer's (the model's padding) are never allowed
        allowed = np.pad(allowed, ((0, 0), (0, logits.shape[-1] - width)))
    mask = torch.from_numpy(allowed[:, :logits.shape[-1]]).to(logits.device)
    return torch.where(mask, logits, float("-inf"))


def constraint_for(tokenizer: ChatTokenizer, *, tools: Sequence[Mapping[str, Any]] | None = None,
                   schema: Mapping[str, Any] | bool | None = None, max_new_tokens: int,
                   max_reasoning_tokens: int | None = None, required: bool = True) -> Constraint:
    """The constraint of one forced call of ``tools`` (or else of one JSON document valid for ``schema``); with
    ``required=False`` (``tool_choice="auto"``), of free text that may end in calls of ``tools``, each valid.

    The model may reason first, for ``max_reasoning_tokens`` (default: half of ``max_new_tokens`` for a forced
    document, so that it has the other half of the budget; no cap when the call is optional; 0 turns the
    reasoning off).

    Raises:
        ValueError: neither tools nor schema, or a schema llguidance cannot compile (the message says why).
    """
    if not required:  # (tool_call_grammar refuses an empty tool list)
        grammar = tool_call_grammar(tools or [], reasoning=max_reasoning_tokens != 0, required=False)
        return Constraint(tokenizer, grammar, max_new_tokens=max_new_tokens, max_reasoning_tokens=max_reasoning_tokens,
                          free_text=True)
    budget = max_new_tokens // 2 if max_reasoning_tokens is None else max_reasoning_tokens
    if tools:
        grammar = tool_call_grammar(tools, reasoning=budget > 0)
    elif schema is not None:
        grammar = json_grammar(schema, reasoning=budget > 0)
    else:
        raise ValueError("a constrained generation needs tools or a schema")
    return Constraint(tokenizer, grammar, max_new_tokens=max_new_tokens, max_reasoning_tokens=budget)


def optional_calls(tokenizer: ChatTokenizer, tools: Sequence[Mapping[str, Any]], *, max_new_tokens: int
                   ) -> Constraint | None:
    """The constraint of ``tool_choice="auto"`` (:func:`constraint_for` with ``required=False``), or None when
    there are no tools or their schemas cannot be compiled (logged): the model then calls freely, as it would
    without a grammar, rather than the request failing over a choice the caller did not make."""
    if not tools:
        return None
    try:
        return constraint_for(tokenizer, tools=tools, max_new_tokens=max_new_tokens, required=False)
    except ValueError as err:
        logger.warning("tool calls left unconstrained: %s", str(err).splitlines()[0])
        return None
