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
"""

from __future__ import annotations

from typing import Literal

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
