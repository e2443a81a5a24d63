"""Split model output into reasoning and answer text, for whole strings and for streams.

Phi-4-mini-flash-reasoning is distilled from DeepSeek-R1, so its output may carry literal
``<think>...</think>`` text (made of ordinary tokens), or only the closing tag, or no tags at all
(architecture.md §6.5). Two tools cover this:

- :func:`split_reasoning` sees the whole text, so it handles every case exactly.
- :class:`ReasoningSplitter` streams. It cannot look ahead, so text before any tag goes to a channel
  chosen up front: ``assume_reasoning_first=True`` sends it to reasoning (right for models that always
  reason; a missing opening tag is then harmless), ``False`` sends it to the answer (right for models that
  may not reason; a leading ``<think>`` still switches to reasoning).

Both strip the whitespace around the reasoning and at the start of the answer. Only the first closing
tag counts; tags after it are answer text. The streamed concatenation equals :func:`split_reasoning`
except in the cases the chosen mode guesses wrong: with ``assume_reasoning_first=False``, an answer
followed by a bare ``</think>`` (``a</think>b`` streams as answer "ab"); with ``True``, text without any
closing tag or with an opening tag after other text. :attr:`ReasoningSplitter.closed` lets the caller
re-split the whole text at the end when it matters.

On the token side, :class:`ReasoningBudget` follows a generation's ``<think>`` block token by token and says
when to force its end; :class:`AnswerGuard` uses it as a ``logits_processor`` for free generation (constrained
generation uses it through :class:`phi4flash.constrained.Constraint`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Literal

import torch

Channel = Literal["reasoning", "answer"]
Piece = tuple[Channel, str]


def split_reasoning(text: str, start_tag: str = "<think>", end_tag: str = "</think>") -> tuple[str, str]:
    """Split a whole completion into (reasoning, answer).

    ``<think>a</think>b`` -> ("a", "b"); ``a</think>b`` -> ("a", "b"); ``ab`` -> ("", "ab");
    ``<think>a`` -> ("a", ""); ``x<think>a</think>b`` -> ("a", "xb").

    Args:
        text: the generated text.
        start_tag: the opening tag.
        end_tag: the closing tag.

    Returns:
        The reasoning (stripped) and the answer (leading whitespace stripped).
    """
    stripped = text.lstrip()
    if stripped.startswith(start_tag):
        body = stripped[len(start_tag) :]
        end = body.find(end_tag)
        if end == -1:
            return body.strip(), ""
        return body[:end].strip(), body[end + len(end_tag) :].lstrip()
    start = text.find(start_tag)
    end = text.find(end_tag)
    if end != -1 and (start == -1 or end < start):
        return text[:end].strip(), text[end + len(end_tag) :].lstrip()
    if start != -1:
        before = text[:start].lstrip()
        body = text[start + len(start_tag) :]
        end = body.find(end_tag)
        if end == -1:
            return body.strip(), before
        return body[:end].strip(), before + body[end + len(end_tag) :].lstrip()
    return "", stripped


def _partial_suffix(text: str, *tags: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``tags``."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


class ReasoningSplitter:
    """Streaming splitter: push text deltas, get ``(channel, text)`` pieces.

    Only a possible tag prefix (and, inside reasoning, trailing whitespace that may precede the closing
    tag) is held back; everything else comes out at once.
    """

    def __init__(self, start_tag: str = "<think>", end_tag: str = "</think>", assume_reasoning_first: bool = False):
        """Create a splitter.

        Args:
            start_tag: the opening tag.
            end_tag: the closing tag.
            assume_reasoning_first: send text before any tag to reasoning (else to the answer).
        """
        if not start_tag or not end_tag:
            raise ValueError("start_tag and end_tag must be non-empty")
        self.start_tag = start_tag
        self.end_tag = end_tag
        self.assume_reasoning_first = assume_reasoning_first
        # lead: nothing but whitespace yet; reasoning; open_answer: answer before any tag (tags still
        # switch); answer: after the closing tag (tags are plain text).
        self._state = "lead"
        self._strip = True  # drop whitespace at the start of the current channel
        self._buf = ""
        self.opened = False
        self.closed = False

    @property
    def channel(self) -> Channel:
        """The channel that text arriving now would go to."""
        if self._state == "reasoning" or (self._state == "lead" and self.assume_reasoning_first):
            return "reasoning"
        return "answer"

    def push(self, text: str) -> list[Piece]:
        """Add a text delta; return the pieces that are now final (consecutive ones merged)."""
        self._buf += text
        out: list[Piece] = []
        self._drain(out, final=False)
        return _merge(out)

    def flush(self) -> list[Piece]:
        """End of stream: return everything still held back."""
        out: list[Piece] = []
        self._drain(out, final=True)
        return _merge(out)

    def _drain(self, out: list[Piece], final: bool) -> None:
        start, end = self.start_tag, self.end_tag
        while True:
            buf = self._buf
            if self._state == "lead":
                buf = buf.lstrip()
                self._buf = buf
                if not buf:
                    return
                if buf.startswith(start):
                    self._buf, self._state, self._strip, self.opened = buf[len(start) :], "reasoning", True, True
                    continue
                if buf.startswith(end):
                    self._buf, self._state, self._strip, self.closed = buf[len(end) :], "answer", True, True
                    continue
                if not final and (start.startswith(buf) or end.startswith(buf)):
                    return  # could still become a tag
                self._state = "reasoning" if self.assume_reasoning_first else "open_answer"
                self._strip = False  # already stripped above
                continue

            if self._strip:
                buf = buf.lstrip()
                self._buf = buf
                if not buf:
                    return
                self._strip = False

            if self._state == "reasoning":
                i = buf.find(end)
                if i != -1:
                    out.append(("reasoning", buf[:i].rstrip()))
                    self._buf, self._state, self._strip, self.closed = buf[i + len(end) :], "answer", True, True
                    continue
                if final:
                    out.append(("reasoning", buf.rstrip()))
                    self._buf = ""
                    return
                keep = len(buf) - _partial_suffix(buf, end)
                # Trailing whitespace is held too: it is dropped if the closing tag follows.
                keep = len(buf[:keep].rstrip())
                out.append(("reasoning", buf[:keep]))
                self._buf = buf[keep:]
                return

            if self._state == "open_answer":
                i, j = buf.find(start), buf.find(end)
                if i != -1 and (j == -1 or i < j):
                    out.append(("answer", buf[:i]))
                    self._buf, self._state, self._strip, self.opened = buf[i + len(start) :], "reasoning", True, True
                    continue
                if j != -1:
                    out.append(("answer", buf[:j]))
                    self._buf, self._state, self._strip, self.closed = buf[j + len(end) :], "answer", True, True
                    continue
                keep = len(buf) if final else len(buf) - _partial_suffix(buf, start, end)
                out.append(("answer", buf[:keep]))
                self._buf = buf[keep:]
                return

            out.append(("answer", buf))  # state "answer": pass-through
            self._buf = ""
            return


def _merge(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for channel, text in pieces:
        if not text:
            continue
        if merged and merged[-1][0] == channel:
            merged[-1] = (channel, merged[-1][1] + text)
        else:
            merged.append((channel, text))
    return merged


THINK_OPEN, THINK_CLOSE = b"<think>", b"</think>"
LINE_GRACE = 24  # reasoning tokens a capped line may run on before ``</think>`` is forced anyway
CLOSE_AT = ("token", "line")

# per tokenizer: (lead, rest of the tag) -> ids of the tokens that write them (see ReasoningBudget._closing_ids)
_CLOSING_IDS: weakref.WeakKeyDictionary[Any, dict[tuple[bytes, bytes], list[int]]] = weakref.WeakKeyDictionary()


class ReasoningBudget:
    """Follows the ``<think>`` block at the start of one generation by its token bytes and says when to force
    the rest of ``</think>``: once ``budget`` reasoning tokens are spent, or when the tokens left only hold it."""

    def __init__(self, tokenizer: Any, budget: int | None, close_at: str = "token") -> None:
        """Follow one generation.

        Args:
            tokenizer: a :class:`phi4flash.ChatTokenizer` (``token_bytes``, ``encode``).
            budget: reasoning tokens allowed before ``</think>`` is forced (None: no cap).
            close_at: where a capped reasoning is closed: "token" (at the cap) or "line" (at the end of the line
                the cap falls in, at most :data:`LINE_GRACE` tokens later, so that the last step is finished).
        """
        if close_at not in CLOSE_AT:
            raise ValueError(f"close_at must be one of {CLOSE_AT}, got {close_at!r}")
        self.close_at = close_at
        self.tokenizer = tokenizer
        self.bytes_of = tokenizer.token_bytes()
        self.budget = budget
        self.thinking: bool | None = None  # None: the output has not shown yet whether it opens with <think>
        self.tokens = 0  # reasoning tokens so far
        self._text = b""  # the head while undecided, then the last bytes of the reasoning

    def feed(self, token_id: int) -> bytes:
        """Take one generated token; return the bytes it adds after the reasoning (the answer's)."""
        data = self.bytes_of[token_id] if 0 <= token_id < len(self.bytes_of) else None
        if self.thinking is None:
            self._text += data or b"\xff"  # a token that is not text settles it: no reasoning
            head = self._text.lstrip()
            if head.startswith(THINK_OPEN):
                self.thinking, self._text, data = True, head[len(THINK_OPEN):], b""
            elif THINK_OPEN.startswith(head):
                return b""
            else:
                self.thinking, data = False, self._text.replace(b"\xff", b"")
        elif self.thinking:
            self.tokens += 1
            self._text = (self._text + (data or b""))[-64:]
        if self.thinking and THINK_CLOSE in self._text:
            self.thinking, data = False, self._text[self._text.index(THINK_CLOSE) + len(THINK_CLOSE):]
        return b"" if self.thinking else (data or b"")

    def closing(self, tokens_left: int | None = None, reserve: int = 0,
                logits: torch.Tensor | None = None) -> list[int] | None:
        """The tokens allowed next when ``</think>`` must come now, else None.

        The tag is written the way the model writes it itself, its logits choosing among the tokens that go on
        with it: a BPE vocabulary merges the tag with what surrounds it (``</think>\\n``, ``\\n</think>\\n``), so
        the tag's own encoding (``<``, ``/``, ``thin``, ``k``, ``>``) is a sequence the model never saw, after which
        the embedded model wrote a second ``</think>`` into the answer.

        Args:
            tokens_left: the generation's remaining token budget, if it has one.
            reserve: tokens to keep free after the tag (for the answer).
            logits: the model's next-token logits ([vocab]). In "line" mode a capped reasoning whose line its
                likeliest token ends (one that starts with a newline) is closed right there, by a token that writes
                the newline and the tag together, if the vocabulary has one.
        """
        if not self.thinking:
            return None
        rest = next(THINK_CLOSE[n:] for n in range(len(THINK_CLOSE) - 1, -1, -1)
                    if self._text.endswith(THINK_CLOSE[:n]))
        ids = self.tokenizer.encode(rest.decode())
        over = self.budget is not None and self.tokens >= self.budget
        if over and self.close_at == "line" and rest == THINK_CLOSE and not self._text.endswith(b"\n"):
            # Let the model finish the line it is writing (its last step), within a few tokens.
            next_id = None if logits is None else int(torch.argmax(logits))
            next_bytes = self.bytes_of[next_id] if next_id is not None and next_id < len(self.bytes_of) else None
            ends_line = (next_bytes or b"").startswith(b"\n")
            merged = self._closing_ids(b"\n", rest) if ends_line else []
            if merged:
                return merged
            over = self.tokens >= self.budget + LINE_GRACE  # (or the model writes the newline itself first)
        if over or (tokens_left is not None and tokens_left <= len(ids) + reserve):
            return self._closing_ids(b"", rest) or ids[:1]
        return None

    def _closing_ids(self, lead: bytes, rest: bytes) -> list[int]:
        """Ids of the tokens that write ``lead`` and then go on with ``rest`` (the tag's unwritten tail): they
        end inside it (``</``) or write all of it and go on (``</think>\\n``). Built once per tokenizer."""
        table = _CLOSING_IDS.setdefault(self.tokenizer, {})
        if (lead, rest) not in table:
            table[lead, rest] = [i for i, data in enumerate(self.bytes_of)
                                 if data and data.startswith(lead) and len(data) > len(lead)
                                 and (rest.startswith(data[len(lead):]) or data[len(lead):].startswith(rest))]
        return table[lead, rest]


class AnswerGuard:
    """A ``logits_processor`` for free generation: caps the reasoning (forcing ``</think>``) and, with
    ``require_answer``, masks the stop tokens until the answer has some non-blank text. Costs next to nothing."""

    def __init__(self, tokenizer: Any, *, max_new_tokens: int | None = None, max_reasoning_tokens: int | None = None,
                 require_answer: bool = True, close_at: str = "token") -> None:
        """Follow one generation.

        Args:
            tokenizer: the engine's :class:`phi4flash.ChatTokenizer`.
            max_new_tokens: the budget; ``</think>`` is forced early enough to leave room for an answer.
            max_reasoning_tokens: force ``</think>`` after this many reasoning tokens (None: no cap).
            require_answer: mask stop tokens until the answer has non-blank text.
            close_at: "token" closes a capped reasoning at the cap, "line" at the end of that line (see
                :class:`ReasoningBudget`).
        """
        self.reasoning = ReasoningBudget(tokenizer, max_reasoning_tokens, close_at)
        self.max_new_tokens = max_new_tokens
        self.require_answer = require_answer
        self.stop_ids = sorted(tokenizer.stop_token_ids)
        self.answered = False
        self._seen = 0

    def __call__(self, generated_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """Mask ``logits`` (shape [vocab]) as described in the class docstring."""
        for token_id in generated_ids[self._seen:]:
            self.answered = self.answered or bool(self.reasoning.feed(int(token_id)).strip())
        self._seen = len(generated_ids)
        left = None if self.max_new_tokens is None else self.max_new_tokens - self._seen
        closing = self.reasoning.closing(left, reserve=4, logits=logits)  # (4: for an answer)
        if closing is not None:
            index = torch.tensor(closing, device=logits.device)
            chosen = logits[index]
            out = torch.full_like(logits, float("-inf"))
            out[index] = chosen if bool(torch.isfinite(chosen).any()) else 0.0
            return out
        if self.require_answer and not self.answered:
            logits = logits.index_fill(0, torch.tensor(self.stop_ids, device=logits.device), float("-inf"))
        return logits
