"""Tool calling in the Phi-4-mini chat format, framework-free (the LangChain model and the OpenAI server
share it).

Prompt side: tool definitions go into the system message's ``tools`` key as a JSON string, which the chat
template renders as ``<|system|>...<|tool|>[...]<|/tool|><|end|>``; an assistant's earlier calls are
written back as ``<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>`` text in its content (the
Phi-4-mini format, which the embedded model also writes);
tool results are ``{"role": "tool"}`` messages.

Output side: :func:`parse_tool_calls` finds calls in a whole completion (inside ``<|tool_call|>`` tags,
or a bare JSON object/list with ``name`` and ``arguments``); :class:`ToolCallStreamParser` does the same
on a stream of text deltas, announcing each call as soon as its name is known and then streaming the raw
argument JSON, so clients can show a call while it is being written.
"""

from __future__ import annotations

import ast
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_TOOL_SYSTEM_PROMPT",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "InvalidToolCall",
    "ToolCall",
    "ToolCallStreamParser",
    "assistant_message",
    "attach_tools",
    "forced_tools",
    "format_tool_call",
    "new_call_id",
    "parse_tool_calls",
    "tool_definitions",
    "tool_result_message",
    "tools_json",
]

TOOL_CALL_OPEN = "<|tool_call|>"
TOOL_CALL_CLOSE = "<|/tool_call|>"
DEFAULT_TOOL_SYSTEM_PROMPT = "You are a helpful assistant with some tools."
_ARG_KEYS = ("arguments", "parameters", "args")


@dataclass
class ToolCall:
    """One parsed call: the tool's name and its arguments."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: new_call_id())


@dataclass
class InvalidToolCall:
    """Text that looked like a call but could not be parsed."""

    raw: str
    error: str
    name: str | None = None
    id: str = field(default_factory=lambda: new_call_id())


def new_call_id() -> str:
    """A fresh call id in the OpenAI style (``call_`` + 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


# ----------------------------------------------------------------------------------------- prompt side


def tool_definitions(tools: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Normalise tools to the ``{"name", "description", "parameters"}`` form the model was trained on.

    Args:
        tools: OpenAI-style ``{"type": "function", "function": {...}}`` dicts or plain function dicts.

    Returns:
        The definitions, in order.

    Raises:
        ValueError: if a tool has no name.
    """
    out = []
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not fn.get("name"):
            raise ValueError(f"invalid tool {tool!r}: needs a name")
        item: dict[str, Any] = {"name": fn["name"], "description": fn.get("description", "")}
        item["parameters"] = fn.get("parameters") or {"type": "object", "properties": {}}
        out.append(item)
    return out


def tools_json(tools: Iterable[Mapping[str, Any]]) -> str:
    """The JSON string that goes into the system message's ``tools`` key."""
    return json.dumps(tool_definitions(tools), ensure_ascii=False)


def attach_tools(messages: Sequence[Mapping[str, Any]], tools: Iterable[Mapping[str, Any]] | None,
                 system_prompt: str = DEFAULT_TOOL_SYSTEM_PROMPT) -> list[dict[str, Any]]:
    """Return a copy of ``messages`` whose first system message carries the tool definitions.

    Args:
        messages: chat messages (dicts).
        tools: the tools (nothing is attached when empty or None).
        system_prompt: the system text used when there is no system message.

    Returns:
        New message dicts (the input is not modified).
    """
    out = [dict(m) for m in messages]
    defs = list(tools or [])
    if not defs:
        return out
    rendered = tools_json(defs)
    for m in out:
        if m.get("role") == "system":
            m["tools"] = rendered
            return out
    return [{"role": "system", "content": system_prompt, "tools": rendered}] + out


def forced_tools(tools: Sequence[Mapping[str, Any]], tool_choice: Any) -> list[Mapping[str, Any]] | None:
    """The tools one of which must be called under ``tool_choice``, or None when the model may answer freely.

    Args:
        tools: OpenAI-style tool dicts (or ``{name, parameters}``).
        tool_choice: None, False, "auto" or "none" (free); "required", "any" or True (one of ``tools``);
            a tool name, ``{"type": "function", "function": {"name": ...}}`` or ``{"name": ...}`` (that tool).

    Raises:
        ValueError: the choice names no tool in ``tools``, or is of a kind not listed above, or a tool has
            no name.
    """
    if not tools or tool_choice in (None, False, "auto", "none"):
        return None
    if tool_choice is True or tool_choice in ("required", "any"):
        return list(tools)
    name = tool_choice
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else tool_choice.get("name")
    if not isinstance(name, str):
        raise ValueError(f"invalid tool_choice {tool_choice!r}: use 'auto', 'none', 'required' or "
                         '{"type": "function", "function": {"name": ...}}')
    names = [definition["name"] for definition in tool_definitions(tools)]
    chosen = [tool for tool, tool_name in zip(tools, names, strict=True) if tool_name == name]
    if not chosen:
        known = ", ".join(repr(tool_name) for tool_name in names)
        raise ValueError(f"invalid tool_choice {tool_choice!r}: no tool is named {name!r} (the tools are {known})")
    return chosen


def format_tool_call(name: str, arguments: Mapping[str, Any] | str | None) -> str:
    """``<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>`` for one call (the Phi-4-mini format).

    Args:
        name: the tool's name.
        arguments: a dict, or a JSON string of one (as OpenAI messages carry them).

    Returns:
        The call as text.
    """
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass
    payload = [{"name": name, "arguments": arguments if arguments is not None else {}}]
    return TOOL_CALL_OPEN + json.dumps(payload, ensure_ascii=False) + TOOL_CALL_CLOSE


def assistant_message(content: str, tool_calls: Iterable[tuple[str, Mapping[str, Any] | str]] = ()) -> dict[str, Any]:
    """An assistant message whose content ends with its calls written in the model's format.

    Args:
        content: the answer text.
        tool_calls: (name, arguments) pairs.

    Returns:
        ``{"role": "assistant", "content": ...}``.
    """
    calls = "".join(format_tool_call(name, args) for name, args in tool_calls)
    return {"role": "assistant", "content": (content or "") + calls}


def tool_result_message(content: Any) -> dict[str, Any]:
    """A tool result as a ``{"role": "tool"}`` message (non-string results are JSON-dumped)."""
    if not isinstance(content, str):
        content = json.dumps(content, ensure_ascii=False, default=str)
    return {"role": "tool", "content": content}


# ----------------------------------------------------------------------------------------- output side


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # Models sometimes write Python literals (single quotes, True/None).
        return ast.literal_eval(text)


def _calls_from_value(value: Any) -> list[ToolCall] | None:
    """Calls in a parsed JSON value, or None when it is not a call or a list of calls."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            return None
        args: Any = next((item[k] for k in _ARG_KEYS if k in item), {})
        if isinstance(args, str):
            args = _loads(args) if args.strip() else {}
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            raise ValueError(f"arguments must be an object, got {type(args).__name__}")
        calls.append(ToolCall(item["name"], dict(args)))
    return calls or None


def _parse_payload(payload: str) -> tuple[list[ToolCall], list[InvalidToolCall]]:
    text = payload.strip()
    try:
        calls = _calls_from_value(_loads(text))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        return [], [InvalidToolCall(payload, f"could not parse the tool call: {exc}", _guess_name(text))]
    if calls is None:
        return [], [InvalidToolCall(payload, "a tool call needs a 'name' and 'arguments'", _guess_name(text))]
    return calls, []


def _guess_name(text: str) -> str | None:
    scan = _scan_calls(text)
    return scan[0].name if scan else None


def parse_tool_calls(text: str, *, allow_bare_json: bool = True) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Split a completed answer into its text and its tool calls.

    Args:
        text: the answer (reasoning already removed).
        allow_bare_json: also take an answer that is nothing but a JSON call (or list of calls) as calls.

    Returns:
        (remaining text, calls, invalid calls). Calls inside ``<|tool_call|>`` tags are removed from the text;
        an unclosed tag runs to the end of the text.
    """
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    pieces: list[str] = []
    rest = text
    while True:
        start = rest.find(TOOL_CALL_OPEN)
        if start < 0:
            pieces.append(rest)
            break
        pieces.append(rest[:start])
        rest = rest[start + len(TOOL_CALL_OPEN):]
        end = rest.find(TOOL_CALL_CLOSE)
        payload, rest = (rest, "") if end < 0 else (rest[:end], rest[end + len(TOOL_CALL_CLOSE):])
        found, bad = _parse_payload(payload)
        calls.extend(found)
        invalid.extend(bad)
    content = "".join(pieces).strip()
    if not calls and not invalid and allow_bare_json and content[:1] in ("{", "["):
        try:
            bare = _calls_from_value(_loads(content))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            bare = None
        if bare:
            return "", bare, []
    return content, calls, invalid


# ------------------------------------------------------------------------------------------ streaming


@dataclass
class _ScannedCall:
    name: str | None = None
    args_raw: str = ""  # the raw argument JSON seen so far (complete once args_done)
    args_done: bool = False
    args_is_string: bool = False
    done: bool = False


def _scan_calls(payload: str) -> list[_ScannedCall]:
    """Find the calls in a (possibly unfinished) payload: ``{...}`` or ``[{...}, ...]``.

    A small string-aware bracket scanner: keys at the call object's depth are tracked, the ``name`` value
    is read once its string closes, and the raw text of the ``arguments`` value is captured as it grows.
    """
    calls: list[_ScannedCall] = []
    text = payload.lstrip()
    if not text:
        return calls
    call_depth = 2 if text[0] == "[" else 1
    depth = 0
    in_string = escape = False
    string_start = 0
    key: str | None = None
    expecting_value = False
    current: _ScannedCall | None = None
    args_start = -1
    args_depth_open = False
    value_key: str | None = None
    name_start = -1
    for i, ch in enumerate(text):
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
                if depth == call_depth and current is not None:
                    literal = text[string_start:i + 1]
                    if expecting_value and value_key == "name" and name_start == string_start:
                        try:
                            current.name = json.loads(literal)
                        except json.JSONDecodeError:
                            current.name = literal.strip('"')
                        expecting_value = False
                    elif expecting_value and value_key in _ARG_KEYS and args_start == string_start:
                        current.args_raw = literal
                        current.args_done = True
                        current.args_is_string = True
                        expecting_value = False
                    elif not expecting_value:
                        try:
                            key = json.loads(literal)
                        except json.JSONDecodeError:
                            key = None
            continue
        if ch == '"':
            in_string = True
            string_start = i
            if depth == call_depth and expecting_value:
                if value_key == "name":
                    name_start = i
                elif value_key in _ARG_KEYS:
                    args_start = i
            continue
        if ch in "{[":
            if depth == call_depth and expecting_value and value_key in _ARG_KEYS and current is not None:
                args_start = i
                args_depth_open = True
                expecting_value = False
            depth += 1
            if depth == call_depth and ch == "{":
                current = _ScannedCall()
                calls.append(current)
                key, expecting_value = None, False
            continue
        if ch in "}]":
            depth -= 1
            if depth == call_depth and args_depth_open and current is not None:
                current.args_raw = text[args_start:i + 1]
                current.args_done = True
                args_depth_open = False
            if depth == call_depth - 1 and current is not None:
                current.done = True
                current = None
            continue
        if depth == call_depth and current is not None:
            if ch == ":":
                expecting_value, value_key = True, key
            elif ch == ",":
                expecting_value, key = False, None
    if current is not None and args_depth_open:
        current.args_raw = text[args_start:]
    return calls


@dataclass
class StreamItem:
    """One output of :class:`ToolCallStreamParser`.

    kind "text": ``text`` is answer text. kind "call": a call chunk at ``index``: the first one carries
    ``name`` and ``id``; later ones carry argument JSON deltas in ``args``. kind "invalid": ``text`` is the
    raw payload that did not parse, ``error`` why.
    """

    kind: str
    text: str = ""
    index: int = 0
    name: str | None = None
    id: str | None = None
    args: str = ""
    error: str = ""


class ToolCallStreamParser:
    """Turns answer-text deltas into text and tool-call chunks.

    Text outside ``<|tool_call|>`` tags passes through (a possible partial tag at the end is held back).
    Inside a tag, a call is announced once its name is known, then its raw argument JSON streams as it
    grows. With ``allow_bare_json``, an answer that starts with ``{`` or ``[`` is held back to the end and
    then either parsed as calls or released as text.
    """

    def __init__(self, *, allow_bare_json: bool = True) -> None:
        self.allow_bare_json = allow_bare_json
        self._pending = ""  # text not yet classified
        self._payload: str | None = None  # inside a tag: its payload so far
        self._bare: str | None = None  # holding back a possible bare-JSON answer
        self._seen_text = False
        self._calls_done = 0  # calls of earlier tags
        self._emitted: list[tuple[str, int]] = []  # per call of the current tag: (id, argument chars emitted)
        self.calls: list[ToolCall] = []
        self.invalid: list[InvalidToolCall] = []

    def feed(self, text: str) -> list[StreamItem]:
        """Consume a delta of answer text; return what can be emitted now."""
        out: list[StreamItem] = []
        if self._bare is not None:
            self._bare += text
            return out
        self._pending += text
        while self._pending:
            if self._payload is None:
                start = self._pending.find(TOOL_CALL_OPEN)
                if start < 0:
                    keep = _partial_suffix(self._pending, TOOL_CALL_OPEN)
                    emit, self._pending = self._pending[: len(self._pending) - keep], self._pending[
                        len(self._pending) - keep:]
                    if emit:
                        if not self._seen_text and self.allow_bare_json and not self.calls:
                            stripped = emit.lstrip()
                            if stripped[:1] in ("{", "["):
                                self._bare = emit + self._pending
                                self._pending = ""
                                return out
                            if stripped:
                                self._seen_text = True
                        out.append(StreamItem("text", text=emit))
                    break
                if start:
                    out.append(StreamItem("text", text=self._pending[:start]))
                    if self._pending[:start].strip():
                        self._seen_text = True
                self._pending = self._pending[start + len(TOOL_CALL_OPEN):]
                self._payload = ""
                self._emitted = []
            else:
                end = self._pending.find(TOOL_CALL_CLOSE)
                if end < 0:
                    keep = _partial_suffix(self._pending, TOOL_CALL_CLOSE)
                    self._payload += self._pending[: len(self._pending) - keep]
                    self._pending = self._pending[len(self._pending) - keep:]
                    out.extend(self._progress(final=False))
                    break
                self._payload += self._pending[:end]
                self._pending = self._pending[end + len(TOOL_CALL_CLOSE):]
                out.extend(self._progress(final=True))
        return out

    def finish(self) -> list[StreamItem]:
        """Flush at the end of the stream (an unclosed tag is parsed as it stands)."""
        out: list[StreamItem] = []
        if self._bare is not None:
            text, self._bare = self._bare, None
            try:
                calls = _calls_from_value(_loads(text.strip()))
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                calls = None
            if calls:
                for call in calls:
                    index = self._calls_done
                    self._calls_done += 1
                    self.calls.append(call)
                    args = json.dumps(call.arguments, ensure_ascii=False)
                    out.append(StreamItem("call", index=index, name=call.name, id=call.id, args=args))
                return out
            return [StreamItem("text", text=text)]
        if self._payload is not None:
            self._payload += self._pending
            self._pending = ""
            out.extend(self._progress(final=True))
        elif self._pending:
            out.append(StreamItem("text", text=self._pending))
            self._pending = ""
        return out

    def _progress(self, *, final: bool) -> list[StreamItem]:
        """Emit new call chunks for the current tag's payload; on ``final`` parse it and close the tag."""
        out: list[StreamItem] = []
        scanned = _scan_calls(self._payload or "")
        for k, call in enumerate(scanned):
            if call.name is None:
                break
            if k >= len(self._emitted):
                self._emitted.append((new_call_id(), 0))
                out.append(StreamItem("call", index=self._calls_done + k, name=call.name, id=self._emitted[k][0]))
            call_id, sent = self._emitted[k]
            if call.args_is_string:
                continue  # JSON-in-a-string arguments are sent decoded at the end
            if len(call.args_raw) > sent:
                out.append(StreamItem("call", index=self._calls_done + k, args=call.args_raw[sent:]))
                self._emitted[k] = (call_id, len(call.args_raw))
        if not final:
            return out
        payload = self._payload or ""
        self._payload = None
        calls, invalid = _parse_payload(payload)
        if invalid:
            self.invalid.extend(invalid)
            out.append(StreamItem("invalid", text=payload, error=invalid[0].error, name=invalid[0].name,
                                  index=self._calls_done))
            self._calls_done += max(1, len(self._emitted))
            return out
        for k, call in enumerate(calls):
            index = self._calls_done + k
            if k < len(self._emitted):
                call.id = self._emitted[k][0]
                sent = self._emitted[k][1]
                if sent == 0 and call.arguments:
                    out.append(StreamItem("call", index=index, args=json.dumps(call.arguments, ensure_ascii=False)))
                elif sent == 0:
                    out.append(StreamItem("call", index=index, args="{}"))
            else:
                out.append(StreamItem("call", index=index, name=call.name, id=call.id,
                                      args=json.dumps(call.arguments, ensure_ascii=False)))
            self.calls.append(call)
        self._calls_done += len(calls)
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
