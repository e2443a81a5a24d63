"""Constrained decoding: only sample tokens that keep the output a valid prefix of a JSON document that
matches a JSON schema (or of a forced tool call), after a free ``<think>...</think>`` phase.

The grammar is a byte-level pushdown automaton built from the schema. A parser state is a stack of
frames ``(node, data)`` (immutable tuples, so states can be hashed, shared and memoised); several states
can be alive at once where the grammar is ambiguous (``anyOf``, which tool is being called). Each token's
bytes are precomputed once per tokenizer and sorted, so the tokens allowed in a state are found by a
depth-first walk over the implicit trie of token bytes that stops at the first byte the grammar rejects.
Inside free text (a JSON string body, the reasoning) a precomputed mask of "safe" tokens is used instead
of walking the whole vocabulary.

Guarantees, given the processor is called before every sampling step: every emitted token keeps the output
a valid prefix; stop tokens are allowed only when the document is complete (and then only they are); the
reasoning is capped (``</think>`` is forced after ``max_reasoning_tokens``); when the token budget
(``max_new_tokens``) runs low the shortest completion is forced, so the output ends complete.

Supported schema keywords: ``type`` (object, array, string, integer, number, boolean, null, or a list),
``properties``/``required``/``additionalProperties``, ``items``/``minItems``/``maxItems``,
``minLength``/``maxLength``, ``enum``, ``const``, ``anyOf``/``oneOf``, ``allOf`` (merged), ``$ref`` into
``$defs``/``definitions``. Unknown or missing types allow any JSON value (depth-limited). Objects with
``properties`` allow only those keys; output is compact JSON (one optional space after ``:`` and ``,``).
"""

from __future__ import annotations

import bisect
import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "AnswerGuard",
    "ConstrainedLogitsProcessor",
    "Grammar",
    "TokenTable",
    "compile_schema",
    "json_schema_processor",
    "token_table",
    "tool_call_grammar",
    "tool_call_processor",
]

THINK_OPEN = b"<think>"
THINK_CLOSE = b"</think>"
TOOL_CALL_OPEN = "<|tool_call|>"
TOOL_CALL_CLOSE = "<|/tool_call|>"

# Frame actions returned by Node.step.
_CONSUME = 0  # (kind, new_data): the byte was consumed, the frame stays
_PUSH = 1  # (kind, new_data, child): replace the frame's data, push child, feed the byte to the child
_POP = 2  # (kind,): the byte completed the frame
_POP_PASS = 3  # (kind,): the frame is complete without the byte; feed the byte to the parent

_WS_AFTER_SEP = 0x20  # the one optional space allowed after ':' and ','
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DIGITS = frozenset(b"0123456789")


class Node:
    """A grammar node. Subclasses define how a frame of this node consumes bytes."""

    def enter(self) -> list[tuple[Node, Any]]:
        """The frames this node starts as (a choice starts as several)."""
        return [(self, self.initial())]

    def initial(self) -> Any:
        """The data of a fresh frame."""
        return 0

    def step(self, data: Any, b: int) -> list[tuple]:
        """Actions for byte ``b`` in a frame with ``data``."""
        raise NotImplementedError

    def can_end(self, data: Any) -> bool:
        """Whether the frame is complete without more bytes (numbers, finished sequences)."""
        return False

    def close(self, data: Any) -> bytes:
        """The shortest bytes that complete a frame with ``data`` (its active child assumed complete)."""
        raise NotImplementedError

    def min_bytes(self) -> bytes:
        """The shortest complete serialisation of this node."""
        return self.close(self.initial())

    def free_kind(self, data: Any) -> str | None:
        """"string" or "think" when the frame is inside free text (enables the fast token masks)."""
        return None


class Literal(Node):
    """Exact bytes (``true``, an enum value, ``<|tool_call|>``)."""

    def __init__(self, text: bytes) -> None:
        if not text:
            raise ValueError("a literal must not be empty")
        self.text = text

    def step(self, pos: int, b: int) -> list[tuple]:
        if self.text[pos] != b:
            return []
        return [(_POP,)] if pos + 1 == len(self.text) else [(_CONSUME, pos + 1)]

    def close(self, pos: int) -> bytes:
        return self.text[pos:]


class Choice(Node):
    """One of several nodes (``anyOf``, ``enum``, a list of types)."""

    def __init__(self, options: Sequence[Node]) -> None:
        if not options:
            raise ValueError("a choice needs at least one option")
        self.options = list(options)

    def enter(self) -> list[tuple[Node, Any]]:
        return [frame for option in self.options for frame in option.enter()]

    def min_bytes(self) -> bytes:
        return min((o.min_bytes() for o in self.options), key=len)


class Whitespace(Node):
    """Up to ``limit`` optional whitespace bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def step(self, count: int, b: int) -> list[tuple]:
        if b in b" \n\r\t" and count < self.limit:
            return [(_CONSUME, count + 1), (_POP_PASS,)]
        return [(_POP_PASS,)]

    def can_end(self, count: int) -> bool:
        return True

    def close(self, count: int) -> bytes:
        return b""


class Sequence_(Node):
    """Nodes one after another."""

    def __init__(self, parts: Sequence[Node]) -> None:
        self.parts = list(parts)

    def step(self, idx: int, b: int) -> list[tuple]:
        if idx < len(self.parts):
            return [(_PUSH, idx + 1, self.parts[idx])]
        return [(_POP_PASS,)]

    def can_end(self, idx: int) -> bool:
        return idx >= len(self.parts) or all(_nullable(p) for p in self.parts[idx:])

    def close(self, idx: int) -> bytes:
        return b"".join(p.min_bytes() for p in self.parts[idx:])


def _nullable(node: Node) -> bool:
    return isinstance(node, (Whitespace, Optional_)) or (isinstance(node, Sequence_) and node.can_end(0))


class Optional_(Node):
    """A node or nothing (the reasoning block)."""

    def __init__(self, inner: Node) -> None:
        self.inner = inner

    def step(self, started: int, b: int) -> list[tuple]:
        if started:
            return [(_POP_PASS,)]
        return [(_PUSH, 1, self.inner), (_POP_PASS,)]

    def can_end(self, started: int) -> bool:
        return True

    def close(self, started: int) -> bytes:
        return b""


class Think(Node):
    """``<think>`` free text ``</think>``; data is (phase, matched): phase 0 matches the opening tag,
    phase 1 is the free text, ``matched`` bytes of the closing tag seen so far."""

    def initial(self) -> tuple[int, int]:
        return (0, 0)

    def step(self, data: tuple[int, int], b: int) -> list[tuple]:
        phase, matched = data
        if phase == 0:
            if THINK_OPEN[matched] != b:
                return []
            return [(_CONSUME, (1, 0) if matched + 1 == len(THINK_OPEN) else (0, matched + 1))]
        if THINK_CLOSE[matched] == b:
            return [(_POP,)] if matched + 1 == len(THINK_CLOSE) else [(_CONSUME, (1, matched + 1))]
        return [(_CONSUME, (1, 1 if b == THINK_CLOSE[0] else 0))]

    def close(self, data: tuple[int, int]) -> bytes:
        phase, matched = data
        if phase == 0:
            return THINK_OPEN[matched:] + THINK_CLOSE
        return THINK_CLOSE[matched:]

    def free_kind(self, data: tuple[int, int]) -> str | None:
        return "think" if data == (1, 0) else None


class String(Node):
    """A JSON string; data is (phase, chars, pending_utf8, hex_left).

    phase 0 expects the opening quote, 1 is the body, 2 follows a backslash, 3 reads ``\\u`` hex digits.
    Multi-byte UTF-8 characters are checked for their lead/continuation structure.
    """

    def __init__(self, min_length: int = 0, max_length: int = 4096) -> None:
        self.min_length = min_length
        self.max_length = max(max_length, min_length)

    def initial(self) -> tuple[int, int, int, int]:
        return (0, 0, 0, 0)

    def step(self, data: tuple[int, int, int, int], b: int) -> list[tuple]:
        phase, n, pending, hex_left = data
        if phase == 0:
            return [(_CONSUME, (1, 0, 0, 0))] if b == 0x22 else []
        if phase == 1:
            if pending:
                return [(_CONSUME, (1, n, pending - 1, 0))] if 0x80 <= b <= 0xBF else []
            if b == 0x22:
                return [(_POP,)] if n >= self.min_length else []
            if n >= self.max_length or b < 0x20:
                return []
            if b == 0x5C:
                return [(_CONSUME, (2, n, 0, 0))]
            if b < 0x80:
                return [(_CONSUME, (1, n + 1, 0, 0))]
            if 0xC2 <= b <= 0xDF:
                return [(_CONSUME, (1, n + 1, 1, 0))]
            if 0xE0 <= b <= 0xEF:
                return [(_CONSUME, (1, n + 1, 2, 0))]
            if 0xF0 <= b <= 0xF4:
                return [(_CONSUME, (1, n + 1, 3, 0))]
            return []
        if phase == 2:
            if b in b'"\\/bfnrt':
                return [(_CONSUME, (1, n + 1, 0, 0))]
            return [(_CONSUME, (3, n, 0, 4))] if b == 0x75 else []
        if b not in _HEX:
            return []
        return [(_CONSUME, (1, n + 1, 0, 0) if hex_left == 1 else (3, n, 0, hex_left - 1))]

    def close(self, data: tuple[int, int, int, int]) -> bytes:
        phase, n, pending, hex_left = data
        if phase == 0:
            return b'"' + b"a" * self.min_length + b'"'
        head = b""
        if phase == 1 and pending:
            head = b"\xbf" * pending
        elif phase == 2:
            head, n = b"n", n + 1
        elif phase == 3:
            head, n = b"0" * hex_left, n + 1
        return head + b"a" * max(0, self.min_length - n) + b'"'

    def free_kind(self, data: tuple[int, int, int, int]) -> str | None:
        return "string" if data[0] == 1 and data[2] == 0 else None


class Number(Node):
    """A JSON number (or integer); data is (phase, digits).

    Phases: 0 start, 1 after '-', 2 after a leading 0, 3 integer digits, 4 after '.', 5 fraction digits,
    6 after 'e', 7 after the exponent sign, 8 exponent digits. 2, 3, 5 and 8 can end.
    """

    MAX_DIGITS = 15

    def __init__(self, integer: bool) -> None:
        self.integer = integer

    def initial(self) -> tuple[int, int]:
        return (0, 0)

    def step(self, data: tuple[int, int], b: int) -> list[tuple]:
        phase, digits = data
        is_digit = b in _DIGITS
        more = digits < self.MAX_DIGITS
        if phase in (0, 1):
            if phase == 0 and b == 0x2D:
                return [(_CONSUME, (1, 0))]
            if b == 0x30:
                return [(_CONSUME, (2, 1))]
            return [(_CONSUME, (3, 1))] if is_digit else []
        if phase in (2, 3):
            if phase == 3 and is_digit and more:
                return [(_CONSUME, (3, digits + 1))]
            if not self.integer and b == 0x2E:
                return [(_CONSUME, (4, digits))]
            if not self.integer and b in b"eE":
                return [(_CONSUME, (6, 0))]
            return [(_POP_PASS,)]
        if phase in (4, 5):
            if is_digit and more:
                return [(_CONSUME, (5, digits + 1))]
            if phase == 5 and b in b"eE":
                return [(_CONSUME, (6, 0))]
            return [(_POP_PASS,)] if phase == 5 else []
        if phase == 6 and b in b"+-":
            return [(_CONSUME, (7, 0))]
        if phase in (6, 7, 8):
            if is_digit and digits < 3:
                return [(_CONSUME, (8, digits + 1))]
            return [(_POP_PASS,)] if phase == 8 else []
        return []

    def can_end(self, data: tuple[int, int]) -> bool:
        return data[0] in (2, 3, 5, 8)

    def close(self, data: tuple[int, int]) -> bytes:
        return b"" if data[0] in (2, 3, 5, 8) else b"0"


class Object(Node):
    """A JSON object; data is (phase, seen keys, key bytes so far, current key, extra key count, space).

    Phases: 0 expects '{', 1 a key or '}', 2 inside a declared key, 3 expects ':', 4 a value (one optional
    space first), 5 ',' or '}', 6 after ',' (one optional space, then a key). ``additional`` (a node or
    None) allows undeclared keys (free strings) with that value schema.
    """

    MAX_EXTRA_KEYS = 8

    def __init__(self, properties: Mapping[str, Node], required: Sequence[str], additional: Node | None) -> None:
        self.properties = dict(properties)
        self.required = [k for k in required if k in self.properties]
        self.additional = additional
        self._key_bytes = {k: json.dumps(k, ensure_ascii=False)[1:].encode() for k in self.properties}
        self._key_string = String(max_length=64)

    def initial(self) -> tuple:
        return (0, frozenset(), b"", None, 0, 0)

    def _more_keys(self, seen: frozenset, extra: int) -> bool:
        if len(seen) < len(self.properties):
            return True
        return self.additional is not None and extra < self.MAX_EXTRA_KEYS

    def _can_close(self, seen: frozenset) -> bool:
        return all(k in seen for k in self.required)

    def _value_node(self, key: str | None) -> Node:
        return self.properties[key] if key is not None else self.additional  # type: ignore[return-value]

    def _key_start(self, seen: frozenset, extra: int) -> list[tuple]:
        out: list[tuple] = []
        if len(seen) < len(self.properties):
            out.append((_CONSUME, (2, seen, b"", None, extra, 0)))
        if self.additional is not None and extra < self.MAX_EXTRA_KEYS:
            out.append((_PUSH, (3, seen, b"", None, extra + 1, 0), self._key_string))
        return out

    def step(self, data: tuple, b: int) -> list[tuple]:
        phase, seen, buf, key, extra, space = data
        if phase == 0:
            return [(_CONSUME, (1, seen, b"", None, extra, 0))] if b == 0x7B else []
        if phase == 1:
            if b == 0x7D:
                return [(_POP,)] if self._can_close(seen) else []
            return self._key_start(seen, extra) if b == 0x22 else []
        if phase == 2:
            buf = buf + bytes((b,))
            out: list[tuple] = []
            for name, enc in self._key_bytes.items():
                if name in seen or not enc.startswith(buf):
                    continue
                if len(enc) == len(buf):
                    out.append((_CONSUME, (3, seen | {name}, b"", name, extra, 0)))
                elif not out or out[-1][1][0] != 2:
                    out.append((_CONSUME, (2, seen, buf, None, extra, 0)))
            return out
        if phase == 3:
            return [(_CONSUME, (4, seen, b"", key, extra, 0))] if b == 0x3A else []
        if phase == 4:
            out = [(_PUSH, (5, seen, b"", None, extra, 0), self._value_node(key))]
            if b == _WS_AFTER_SEP and not space:
                out.append((_CONSUME, (4, seen, b"", key, extra, 1)))
            return out
        if phase == 5:
            if b == 0x7D:
                return [(_POP,)] if self._can_close(seen) else []
            if b == 0x2C and self._more_keys(seen, extra):
                return [(_CONSUME, (6, seen, b"", None, extra, 0))]
            return []
        # phase 6
        if b == _WS_AFTER_SEP and not space:
            return [(_CONSUME, (6, seen, b"", None, extra, 1))]
        return self._key_start(seen, extra) if b == 0x22 else []

    def _rest(self, seen: frozenset, first: bool) -> bytes:
        """Bytes that add the missing required keys and close the object."""
        parts = []
        for k in self.required:
            if k not in seen:
                parts.append(self._key_bytes_full(k) + b":" + self.properties[k].min_bytes())
        body = b",".join(parts)
        if body and not first:
            body = b"," + body
        return body + b"}"

    def _key_bytes_full(self, k: str) -> bytes:
        return b'"' + self._key_bytes[k]

    def _any_key_pair(self, seen: frozenset) -> tuple[bytes, frozenset]:
        """The shortest key/value pair that can still be added (after a dangling ',')."""
        missing = [k for k in self.required if k not in seen]
        candidates = missing or [k for k in self.properties if k not in seen]
        if candidates:
            k = min(candidates, key=lambda c: len(self._key_bytes[c]) + len(self.properties[c].min_bytes()))
            return self._key_bytes_full(k) + b":" + self.properties[k].min_bytes(), seen | {k}
        return b'"":' + self.additional.min_bytes(), seen  # type: ignore[union-attr]

    def close(self, data: tuple) -> bytes:
        phase, seen, buf, key, extra, space = data
        if phase == 0:
            return b"{" + self._rest(seen, True)
        if phase == 1:
            return self._rest(seen, True)
        if phase == 5:
            return self._rest(seen, False)
        if phase == 6:
            pair, seen2 = self._any_key_pair(seen)
            return pair + self._rest(seen2, False)
        if phase == 2:
            names = [n for n, enc in self._key_bytes.items() if n not in seen and enc.startswith(buf)]
            name = min(names, key=lambda n: (n not in self.required, len(self._key_bytes[n])))
            value = self.properties[name].min_bytes()
            return self._key_bytes[name][len(buf):] + b":" + value + self._rest(seen | {name}, False)
        value = self._value_node(key).min_bytes()
        return (b":" if phase == 3 else b"") + value + self._rest(seen, False)


class Array(Node):
    """A JSON array; data is (phase, items, space): 0 expects '[', 1 an item or ']', 2 ',' or ']',
    3 after ',' (one optional space, then an item)."""

    def __init__(self, items: Node, min_items: int = 0, max_items: int = 16) -> None:
        self.items = items
        self.min_items = min_items
        self.max_items = max(max_items, min_items)

    def initial(self) -> tuple[int, int, int]:
        return (0, 0, 0)

    def step(self, data: tuple[int, int, int], b: int) -> list[tuple]:
        phase, n, space = data
        if phase == 0:
            return [(_CONSUME, (1, 0, 0))] if b == 0x5B else []
        if phase == 1:
            if b == 0x5D:
                return [(_POP,)] if self.min_items == 0 else []
            return [(_PUSH, (2, 1, 0), self.items)] if self.max_items > 0 else []
        if phase == 2:
            if b == 0x5D:
                return [(_POP,)] if n >= self.min_items else []
            return [(_CONSUME, (3, n, 0))] if b == 0x2C and n < self.max_items else []
        out = [(_PUSH, (2, n + 1, 0), self.items)]
        if b == _WS_AFTER_SEP and not space:
            out.append((_CONSUME, (3, n, 1)))
        return out

    def close(self, data: tuple[int, int, int]) -> bytes:
        phase, n, space = data
        item = self.items.min_bytes()
        if phase in (0, 1):
            return (b"[" if phase == 0 else b"") + b",".join([item] * self.min_items) + b"]"
        if phase == 3:
            n += 1
            return item + b"".join(b"," + item for _ in range(max(0, self.min_items - n))) + b"]"
        return b"".join(b"," + item for _ in range(max(0, self.min_items - n))) + b"]"


# --------------------------------------------------------------------------------------------- schemas


def _literal_value(value: Any) -> Literal:
    return Literal(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def _any_value(depth: int) -> Node:
    scalars: list[Node] = [String(), Number(integer=False), Literal(b"true"), Literal(b"false"), Literal(b"null")]
    if depth <= 0:
        return Choice(scalars)
    inner = _any_value(depth - 1)
    return Choice(scalars + [Array(inner, 0, 8), Object({}, [], inner)])


def compile_schema(schema: Mapping[str, Any] | bool, *, max_string_length: int = 4096, max_depth: int = 8) -> Node:
    """Compile a JSON schema into a grammar node.

    Args:
        schema: the JSON schema (``True``/``{}`` means any JSON value).
        max_string_length: cap on strings without ``maxLength`` (keeps a runaway string finite).
        max_depth: how deep ``$ref`` recursion and untyped values may nest.

    Returns:
        The root node.

    Raises:
        ValueError: for a schema that admits no value (``False``, an empty ``enum``).
    """
    root = schema if isinstance(schema, Mapping) else {}
    defs = {**(root.get("definitions") or {}), **(root.get("$defs") or {})}

    def resolve(s: Mapping[str, Any]) -> Mapping[str, Any]:
        seen = 0
        while "$ref" in s and seen < 32:
            ref = s["$ref"]
            name = ref.rsplit("/", 1)[-1]
            if ref == "#":
                target: Mapping[str, Any] = root
            elif name in defs:
                target = defs[name]
            else:
                raise ValueError(f"invalid $ref {ref!r}: only #, #/$defs/... and #/definitions/... are supported")
            s = {**target, **{k: v for k, v in s.items() if k != "$ref"}}
            seen += 1
        return s

    def build(s: Any, depth: int) -> Node:
        if s is True or s is None:
            return _any_value(min(depth, 2))
        if s is False:
            raise ValueError("invalid schema False: it admits no value")
        s = resolve(s)
        if depth <= 0:
            return _any_value(0)
        if "const" in s:
            return _literal_value(s["const"])
        if "enum" in s:
            if not s["enum"]:
                raise ValueError("invalid schema: empty enum")
            return Choice([_literal_value(v) for v in s["enum"]])
        for key in ("anyOf", "oneOf"):
            if key in s:
                base = {k: v for k, v in s.items() if k != key}
                return Choice([build({**base, **resolve(option)}, depth - 1) for option in s[key]])
        if "allOf" in s:
            merged: dict[str, Any] = {k: v for k, v in s.items() if k != "allOf"}
            for part in s["allOf"]:
                part = resolve(part)
                for k, v in part.items():
                    if k == "properties":
                        merged["properties"] = {**merged.get("properties", {}), **v}
                    elif k == "required":
                        merged["required"] = list(merged.get("required", [])) + list(v)
                    else:
                        merged.setdefault(k, v)
            return build(merged, depth)
        kind = s.get("type")
        if kind is None:
            if "properties" in s:
                kind = "object"
            elif "items" in s:
                kind = "array"
            else:
                return _any_value(min(depth, 2))
        if isinstance(kind, list):
            return Choice([build({**s, "type": k}, depth) for k in kind])
        if kind == "object":
            props = {k: build(v, depth - 1) for k, v in (s.get("properties") or {}).items()}
            extra = s.get("additionalProperties")
            additional: Node | None
            if "properties" in s:
                # Declared properties (even none, as for a tool without arguments): only those keys.
                additional = build(extra, depth - 1) if isinstance(extra, Mapping) and extra else None
            else:
                additional = None if extra is False else build(extra if isinstance(extra, Mapping) else True,
                                                                depth - 1)
            return Object(props, list(s.get("required") or []), additional)
        if kind == "array":
            items = s.get("items", True)
            return Array(build(items, depth - 1), int(s.get("minItems", 0)), int(s.get("maxItems", 16)))
        if kind == "string":
            return String(int(s.get("minLength", 0)), int(s.get("maxLength", max_string_length)))
        if kind in ("integer", "number"):
            return Number(integer=kind == "integer")
        if kind == "boolean":
            return Choice([Literal(b"true"), Literal(b"false")])
        if kind == "null":
            return Literal(b"null")
        raise ValueError(f"invalid schema type {kind!r}")

    return build(schema, max_depth)


def _tool_parts(tool: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """(name, parameters schema) of an OpenAI-style tool or a plain {name, parameters} dict."""
    fn = tool.get("function", tool)
    return fn["name"], fn.get("parameters") or {"type": "object", "properties": {}}


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], **kwargs: Any) -> Node:
    """The grammar of one forced tool call:
    ``<|tool_call|>{"name": <one of the tools>, "arguments": <that tool's schema>}<|/tool_call|>``.

    Args:
        tools: OpenAI-style tool dicts (``{"type": "function", "function": {...}}``) or ``{name, parameters}``.
        **kwargs: passed to :func:`compile_schema`.

    Returns:
        The grammar node (without the reasoning prefix).
    """
    if not tools:
        raise ValueError("a forced tool call needs at least one tool")
    options = []
    for tool in tools:
        name, params = _tool_parts(tool)
        options.append(Object({"name": _literal_value(name), "arguments": compile_schema(params, **kwargs)},
                              ["name", "arguments"], None))
    call = options[0] if len(options) == 1 else Choice(options)
    return Sequence_([Literal(TOOL_CALL_OPEN.encode()), call, Literal(TOOL_CALL_CLOSE.encode())])


class Grammar:
    """A document grammar: optional ``<think>...</think>``, a little whitespace, then ``body``."""

    def __init__(self, body: Node, *, allow_reasoning: bool = True) -> None:
        parts: list[Node] = [Optional_(Think())] if allow_reasoning else []
        self.root = Sequence_(parts + [Whitespace(4), body])
        self.body = body

    def initial_states(self) -> frozenset:
        return frozenset((frame,) for frame in self.root.enter())


# ------------------------------------------------------------------------------------ state machinery


def _advance(stack: tuple, b: int, out: set) -> None:
    """Add to ``out`` every stack reachable from ``stack`` by consuming byte ``b``."""
    if not stack:
        return
    node, data = stack[-1]
    rest = stack[:-1]
    for action in node.step(data, b):
        kind = action[0]
        if kind == _CONSUME:
            out.add(rest + ((node, action[1]),))
        elif kind == _PUSH:
            base = rest + ((node, action[1]),)
            for child in action[2].enter():
                _advance(base + (child,), b, out)
        elif kind == _POP:
            out.add(rest)
        else:
            _advance(rest, b, out)


def advance(states: frozenset, data: bytes) -> frozenset:
    """Feed ``data`` to a set of states; an empty set means the bytes are not a valid continuation."""
    for b in data:
        nxt: set = set()
        for stack in states:
            _advance(stack, b, nxt)
        states = frozenset(nxt)
        if not states:
            break
    return states


def is_complete(states: frozenset) -> bool:
    """Whether some state is a complete document."""
    return any(all(node.can_end(data) for node, data in stack) for stack in states)


def close_bytes(states: frozenset) -> bytes | None:
    """The shortest bytes that complete some state (None for no state)."""
    best: bytes | None = None
    for stack in states:
        tail = b"".join(node.close(data) for node, data in reversed(stack))
        if best is None or len(tail) < len(best):
            best = tail
    return best


def in_reasoning(states: frozenset) -> bool:
    """Whether every state is inside the free reasoning text (after ``<think>``)."""
    return bool(states) and all(stack and isinstance(stack[-1][0], Think) and stack[-1][1][0] == 1
                                for stack in states)


# ----------------------------------------------------------------------------------- token tables


def _byte_decoder() -> dict[str, int]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_CONTROL_RE = re.compile(r"<\|[^|<>]+\|>")


class TokenTable:
    """Each token's bytes, sorted for trie walks, plus the masks of tokens safe inside free text.

    Built once per tokenizer (see :func:`token_table`). Added tokens marked special (role tokens,
    ``<|end|>``) are never emitted as text; other added tokens (``<|tool_call|>``) may only be emitted
    where the grammar expects exactly their text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.vocab_size = int(tokenizer.vocab_size)
        self.stop_ids = sorted(int(i) for i in getattr(tokenizer, "stop_token_ids", ()))
        added = dict(getattr(tokenizer, "added_tokens", {}) or {})
        special = set(getattr(tokenizer, "special_token_ids", ()) or ())
        decoder = _byte_decoder()
        self.token_bytes: list[bytes | None] = [None] * self.vocab_size
        self.control: dict[int, bytes] = {}  # non-special added tokens: only where a literal wants them
        regular: list[tuple[bytes, int]] = []
        for i in range(self.vocab_size):
            piece = tokenizer.id_to_token(i)
            if piece is None or i in special or i in self.stop_ids:
                continue
            if i in added or (not added and _CONTROL_RE.fullmatch(piece)):
                self.control[i] = (added.get(i) or piece).encode()
                self.token_bytes[i] = self.control[i]
                continue
            if all(c in decoder for c in piece):
                data = bytes(decoder[c] for c in piece)
            else:
                data = piece.encode()
            if data:
                self.token_bytes[i] = data
                regular.append((data, i))
        regular.sort()
        self.sorted_bytes = [d for d, _ in regular]
        self.sorted_ids = [i for _, i in regular]
        # Free-text fast paths: tokens that stay inside a string body / the reasoning whatever they are.
        str_safe = torch.zeros(self.vocab_size, dtype=torch.bool)
        think_safe = torch.zeros(self.vocab_size, dtype=torch.bool)
        char_len = torch.full((self.vocab_size,), 1 << 30, dtype=torch.long)
        str_rest: list[tuple[bytes, int]] = []
        think_rest: list[tuple[bytes, int]] = []
        for data, i in regular:
            if b"<" in data:
                think_rest.append((data, i))
            else:
                think_safe[i] = True
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is not None and not any(c in text for c in '"\\') and all(ord(c) >= 0x20 for c in text):
                str_safe[i] = True
                char_len[i] = len(text)
            else:
                str_rest.append((data, i))
        self.str_safe, self.think_safe, self.char_len = str_safe, think_safe, char_len
        self.str_rest = ([d for d, _ in str_rest], [i for _, i in str_rest])
        self.think_rest = ([d for d, _ in think_rest], [i for _, i in think_rest])
        self._device_cache: dict[tuple[str, str], torch.Tensor] = {}

    def on_device(self, name: str, device: torch.device) -> torch.Tensor:
        """A precomputed mask moved to ``device`` (cached)."""
        key = (name, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = getattr(self, name).to(device)
        return self._device_cache[key]


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TABLES_BY_ID: dict[int, TokenTable] = {}
_TABLES_LOCK = threading.Lock()


def token_table(tokenizer: Any) -> TokenTable:
    """The :class:`TokenTable` of ``tokenizer``, built on first use and cached."""
    with _TABLES_LOCK:
        try:
            table = _TABLES.get(tokenizer)
        except TypeError:  # not weak-referenceable
            table = _TABLES_BY_ID.get(id(tokenizer))
        if table is None:
            table = TokenTable(tokenizer)
            try:
                _TABLES[tokenizer] = table
            except TypeError:
                _TABLES_BY_ID[id(tokenizer)] = table
        return table


def _walk(states: frozenset, toks: list[bytes], ids: list[int], lo: int, hi: int, depth: int,
          out: list[int]) -> None:
    """Collect ids of tokens in ``toks[lo:hi]`` (sharing a prefix of ``depth`` bytes, after which the parser
    is in ``states``) whose remaining bytes the parser accepts."""
    i = lo
    while i < hi and len(toks[i]) == depth:
        out.append(ids[i])
        i += 1
    while i < hi:
        b = toks[i][depth]
        prefix = toks[i][:depth]
        j = bisect.bisect_left(toks, prefix + bytes((b + 1,)), i, hi) if b < 255 else hi
        nxt = advance(states, bytes((b,)))
        if nxt:
            _walk(nxt, toks, ids, i, j, depth + 1, out)
        i = j


class ConstrainedLogitsProcessor:
    """A ``GenerationConfig.logits_processor`` that keeps the output inside a :class:`Grammar`.

    One instance follows one generation (it is stateful); build a new one per call.
    """

    def __init__(self, tokenizer: Any, grammar: Grammar, *, max_new_tokens: int | None = None,
                 max_reasoning_tokens: int = 256) -> None:
        """Follow one generation.

        Args:
            tokenizer: the engine's tokenizer (``vocab_size``, ``id_to_token``, ``stop_token_ids``).
            grammar: what the output must be.
            max_new_tokens: the generation's token budget; when it runs low the shortest completion is forced.
            max_reasoning_tokens: after this many reasoning tokens ``</think>`` is forced.
        """
        self.table = token_table(tokenizer)
        self.grammar = grammar
        self.states = grammar.initial_states()
        self.max_new_tokens = max_new_tokens
        self.max_reasoning_tokens = max_reasoning_tokens
        self.reasoning_tokens = 0
        self.finished = False  # a stop token was emitted
        self.failed = False  # an unexpected token arrived (the caller sampled outside the mask)
        self._seen = 0
        self._cache: dict[frozenset, list[int]] = {}
        self._forced_pending = False

    # -- tracking

    def feed(self, token_id: int) -> None:
        """Advance the parser by one generated token."""
        if self.finished or self.failed:
            return
        if token_id in self.table.stop_ids:
            self.finished = True
            return
        data = self.table.token_bytes[token_id] if 0 <= token_id < self.table.vocab_size else None
        if in_reasoning(self.states):
            self.reasoning_tokens += 1
        nxt = advance(self.states, data) if data else frozenset()
        if not nxt:
            self.failed = True
            return
        self.states = nxt

    @property
    def complete(self) -> bool:
        """Whether the output so far is a complete document."""
        return not self.failed and is_complete(self.states)

    # -- masking

    def allowed_ids(self, generated: int = 0) -> list[int]:
        """Ids allowed next, given ``generated`` tokens so far (for the budget)."""
        table = self.table
        if self.failed or self.finished:
            return list(table.stop_ids)
        forced = self._forced(generated)
        if forced is not None:
            return self._prefix_tokens(forced)
        key = self.states
        if key in self._cache:
            return self._cache[key]
        out: list[int] = []
        _walk(self.states, table.sorted_bytes, table.sorted_ids, 0, len(table.sorted_bytes), 0, out)
        out.extend(self._control_ids())
        if is_complete(self.states):
            out.extend(table.stop_ids)
        if len(self._cache) < 4096:
            self._cache[key] = out
        return self._budget_filter(out, generated)

    def _cost(self, tail: bytes | None) -> int:
        """Tokens needed to emit ``tail``: one per byte (every byte is a token), one per added token."""
        if tail is None:
            return 1 << 30
        cost = len(tail)
        for data in self.table.control.values():
            if data in tail:
                cost -= tail.count(data) * (len(data) - 1)
        return cost

    def _budget_filter(self, ids: list[int], generated: int) -> list[int]:
        """Drop tokens after which the shortest completion would no longer fit in the budget.

        Free-text tokens never lengthen the completion, so only walked candidates need this check.
        """
        if self.max_new_tokens is None:
            return ids
        remaining = self.max_new_tokens - generated
        tail = close_bytes(self.states)
        if tail is None or remaining > self._cost(tail) + 64:
            return ids
        stops = set(self.table.stop_ids)
        kept = []
        for i in ids:
            if i in stops:
                kept.append(i)
                continue
            nxt = advance(self.states, self.table.token_bytes[i] or b"")
            if nxt and self._cost(close_bytes(nxt)) + 2 <= remaining:
                kept.append(i)
        return kept

    def _control_ids(self) -> list[int]:
        # Added tokens (<|tool_call|>) stand for grammar literals, never for text inside a string or the reasoning.
        structural = frozenset(s for s in self.states if s and not isinstance(s[-1][0], (String, Think)))
        if not structural:
            return []
        return [i for i, data in self.table.control.items() if advance(structural, data)]

    def _forced(self, generated: int) -> bytes | None:
        if in_reasoning(self.states) and self.reasoning_tokens >= self.max_reasoning_tokens:
            tail = close_bytes(self.states) or b""
            return tail[: tail.index(THINK_CLOSE[-1:]) + 1] if THINK_CLOSE[-1:] in tail else tail
        if self.max_new_tokens is None:
            return None
        tail = close_bytes(self.states)
        if tail is None:
            return None
        # The tail's worst-case token count, plus the stop token.
        if self.max_new_tokens - generated <= self._cost(tail) + 1:
            return tail
        return None

    def _prefix_tokens(self, forced: bytes) -> list[int]:
        if not forced:
            return list(self.table.stop_ids) if is_complete(self.states) else []
        for i, data in self.table.control.items():
            if forced.startswith(data):
                return [i]  # one token for the whole tag keeps the budget estimate true
        out = []
        toks, ids = self.table.sorted_bytes, self.table.sorted_ids
        for k in range(1, len(forced) + 1):
            piece = forced[:k]
            j = bisect.bisect_left(toks, piece)
            while j < len(toks) and toks[j] == piece:
                out.append(ids[j])
                j += 1
        return out

    def _fast_mask(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The mask for a single state inside free text, or None when the full walk is needed."""
        if len(self.states) != 1 or self._forced_pending:
            return None
        (stack,) = self.states
        node, data = stack[-1]
        kind = node.free_kind(data)
        if kind is None:
            return None
        table = self.table
        if kind == "think":
            safe = table.on_device("think_safe", logits.device)
            toks, ids = table.think_rest
        else:
            room = node.max_length - data[1]  # type: ignore[attr-defined]
            if room <= 0:
                return None
            safe = table.on_device("str_safe", logits.device) & (table.on_device("char_len", logits.device) <= room)
            toks, ids = table.str_rest
        mask = safe.clone()
        extra: list[int] = []
        _walk(self.states, toks, ids, 0, len(toks), 0, extra)
        extra.extend(self._control_ids())
        extra = self._budget_filter(extra, self._seen)
        if extra:
            mask[torch.tensor(extra, dtype=torch.long, device=logits.device)] = True
        return mask

    def __call__(self, generated_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """Mask ``logits`` (shape [vocab]) so only tokens that keep the output valid can be sampled."""
        for token_id in list(generated_ids)[self._seen:]:
            self.feed(int(token_id))
        self._seen = len(generated_ids)
        self._forced_pending = (not self.failed and not self.finished and self._forced(self._seen) is not None)
        mask = self._fast_mask(logits)
        if mask is None:
            allowed = self.allowed_ids(self._seen)
            mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            allowed = [i for i in allowed if i < logits.shape[-1]]
            if allowed:
                mask[torch.tensor(allowed, dtype=torch.long, device=logits.device)] = True
        else:
            if mask.shape[-1] < logits.shape[-1]:
                mask = torch.cat([mask, mask.new_zeros(logits.shape[-1] - mask.shape[-1])])
            mask = mask[: logits.shape[-1]]
        if not bool(mask.any()):
            # Nothing fits (a budget too small to finish): end rather than sample garbage.
            mask[torch.tensor(self.table.stop_ids[:1] or [0], device=logits.device)] = True
        return logits.masked_fill(~mask, float("-inf"))


def json_schema_processor(tokenizer: Any, schema: Mapping[str, Any] | bool, *, allow_reasoning: bool = True,
                          max_new_tokens: int | None = None, max_reasoning_tokens: int = 256,
                          **schema_kwargs: Any) -> ConstrainedLogitsProcessor:
    """A processor whose output is (optional reasoning, then) one JSON document valid for ``schema``.

    Args:
        tokenizer: the engine's tokenizer.
        schema: a JSON schema.
        allow_reasoning: let the model think in ``<think>...</think>`` first.
        max_new_tokens: the generation budget (forces the shortest completion near the end).
        max_reasoning_tokens: cap on reasoning tokens before ``</think>`` is forced.
        **schema_kwargs: passed to :func:`compile_schema`.

    Returns:
        A new processor (one per generation).
    """
    grammar = Grammar(compile_schema(schema, **schema_kwargs), allow_reasoning=allow_reasoning)
    return ConstrainedLogitsProcessor(tokenizer, grammar, max_new_tokens=max_new_tokens,
                                      max_reasoning_tokens=max_reasoning_tokens)


def tool_call_processor(tokenizer: Any, tools: Sequence[Mapping[str, Any]], *, allow_reasoning: bool = True,
                        max_new_tokens: int | None = None, max_reasoning_tokens: int = 256,
                        **schema_kwargs: Any) -> ConstrainedLogitsProcessor:
    """A processor whose output is (optional reasoning, then) exactly one call of one of ``tools``.

    Args:
        tokenizer: the engine's tokenizer.
        tools: the tools the call may name (OpenAI-style dicts).
        allow_reasoning: let the model think in ``<think>...</think>`` first.
        max_new_tokens: the generation budget (forces the shortest completion near the end).
        max_reasoning_tokens: cap on reasoning tokens before ``</think>`` is forced.
        **schema_kwargs: passed to :func:`compile_schema`.

    Returns:
        A new processor (one per generation).
    """
    grammar = Grammar(tool_call_grammar(tools, **schema_kwargs), allow_reasoning=allow_reasoning)
    return ConstrainedLogitsProcessor(tokenizer, grammar, max_new_tokens=max_new_tokens,
                                      max_reasoning_tokens=max_reasoning_tokens)


def min_tokens(grammar: Grammar) -> int:
    """An upper bound on the tokens the shortest document needs (one per byte, plus the stop token)."""
    tail = grammar.body.min_bytes()
    cost = len(tail)
    for tag in (TOOL_CALL_OPEN.encode(), TOOL_CALL_CLOSE.encode()):
        cost -= tail.count(tag) * (len(tag) - 1)
    return cost + 1


def constrained_processor(tokenizer: Any, *, tools: Sequence[Mapping[str, Any]] | None = None,
                          schema: Mapping[str, Any] | bool | None = None, max_new_tokens: int,
                          max_reasoning_tokens: int | None = None) -> tuple[ConstrainedLogitsProcessor, int]:
    """The processor for one forced tool call of ``tools`` (or else one JSON document valid for ``schema``),
    with the token budget the generation needs.

    The model may reason first: by default for half of what the shortest document leaves of
    ``max_new_tokens``. The budget grows, if it must, to hold that reasoning, the closing tag and the
    shortest document, so that a small ``max_new_tokens`` cannot cut the document off.

    Args:
        tokenizer: the engine's tokenizer.
        tools: OpenAI-style tools, one of which must be called; takes precedence over ``schema``.
        schema: a JSON schema the answer must follow.
        max_new_tokens: the caller's token budget.
        max_reasoning_tokens: cap on the reasoning (None: the default above).

    Returns:
        (processor, max_new_tokens to generate with).

    Raises:
        ValueError: neither tools nor schema, or a schema it cannot compile.
    """
    if tools:
        body = tool_call_grammar(tools)
    elif schema is not None:
        body = compile_schema(schema)
    else:
        raise ValueError("a constrained generation needs tools or a schema")
    grammar = Grammar(body)
    need = min_tokens(grammar)
    budget = max_reasoning_tokens if max_reasoning_tokens is not None else max(0, (max_new_tokens - need) // 2)
    max_new_tokens = max(max_new_tokens, budget + need + 16)  # reasoning, "</think>", the shortest document
    processor = ConstrainedLogitsProcessor(tokenizer, grammar, max_new_tokens=max_new_tokens,
                                           max_reasoning_tokens=budget)
    return processor, max_new_tokens


LINE_GRACE = 24  # reasoning tokens a capped line may run on before ``</think>`` is forced anyway


class AnswerGuard:
    """A light ``logits_processor`` for free generation: caps the reasoning (forcing ``</think>``) and, with
    ``require_answer``, masks the stop tokens until the answer has some non-blank text.

    It never walks the vocabulary except to force the closing tag, so it costs next to nothing per step.
    """

    def __init__(self, tokenizer: Any, *, max_new_tokens: int | None = None, max_reasoning_tokens: int | None = None,
                 require_answer: bool = True, close_at: str = "token") -> None:
        """Follow one generation.

        Args:
            tokenizer: the engine's tokenizer.
            max_new_tokens: the budget; ``</think>`` is forced early enough to leave room for an answer.
            max_reasoning_tokens: force ``</think>`` after this many reasoning tokens (None: no cap).
            require_answer: mask stop tokens until the answer has non-blank text.
            close_at: where a capped reasoning is closed: "token" (at the cap) or "line" (at the end of the
                line the cap falls in, at most :data:`LINE_GRACE` tokens later, so the last step is finished).
        """
        if close_at not in ("token", "line"):
            raise ValueError(f"close_at must be 'token' or 'line', got {close_at!r}")
        self.table = token_table(tokenizer)
        self.max_new_tokens = max_new_tokens
        self.max_reasoning_tokens = max_reasoning_tokens
        self.require_answer = require_answer
        self.close_at = close_at
        self._head = b""  # the first bytes, until we know whether the output opens with <think>
        self._thinking: bool | None = None  # None: undecided
        self._tail = b""  # the last bytes inside the reasoning (to find </think>)
        self.reasoning_tokens = 0
        self.answered = False
        self._seen = 0

    def _feed(self, token_id: int) -> None:
        data = self.table.token_bytes[token_id] if 0 <= token_id < self.table.vocab_size else None
        data = data or b""
        if self._thinking is None:
            self._head += data
            stripped = self._head.lstrip()
            if stripped.startswith(THINK_OPEN):
                self._thinking, data = True, stripped[len(THINK_OPEN):]
            elif not THINK_OPEN.startswith(stripped):
                self._thinking, data = False, self._head
            else:
                return
        if self._thinking:
            self.reasoning_tokens += 1
            self._tail = (self._tail + data)[-64:]
            end = self._tail.find(THINK_CLOSE)
            if end < 0:
                return
            self._thinking, data = False, self._tail[end + len(THINK_CLOSE):]
        if data.strip():
            self.answered = True

    def _forced_close(self, generated: int) -> bytes | None:
        if not self._thinking:
            return None
        matched = next((n for n in range(len(THINK_CLOSE) - 1, 0, -1) if self._tail.endswith(THINK_CLOSE[:n])), 0)
        rest = THINK_CLOSE[matched:]
        over = self.max_reasoning_tokens is not None and self.reasoning_tokens >= self.max_reasoning_tokens
        if over and self.close_at == "line" and not matched:
            # Let the model finish the line it is writing (its last step), within a few tokens.
            over = self._tail.endswith(b"\n") or self.reasoning_tokens >= self.max_reasoning_tokens + LINE_GRACE
        # Leave a few tokens after the tag for the answer.
        low = self.max_new_tokens is not None and self.max_new_tokens - generated <= len(rest) + 4
        return rest if over or low else None

    def __call__(self, generated_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """Mask ``logits`` (shape [vocab]) as described in the class docstring."""
        for token_id in list(generated_ids)[self._seen:]:
            self._feed(int(token_id))
        self._seen = len(generated_ids)
        forced = self._forced_close(self._seen)
        if forced is not None:
            toks, ids = self.table.sorted_bytes, self.table.sorted_ids
            allowed = []
            for k in range(1, len(forced) + 1):
                j = bisect.bisect_left(toks, forced[:k])
                while j < len(toks) and toks[j] == forced[:k]:
                    allowed.append(ids[j])
                    j += 1
            allowed = [i for i in allowed if i < logits.shape[-1]]
            if allowed:
                mask = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
                mask[torch.tensor(allowed, dtype=torch.long, device=logits.device)] = False
                return logits.masked_fill(mask, float("-inf"))
        if self.require_answer and not self.answered:
            stops = [i for i in self.table.stop_ids if i < logits.shape[-1]]
            if stops:
                logits = logits.clone()
                logits[torch.tensor(stops, dtype=torch.long, device=logits.device)] = float("-inf")
        return logits
