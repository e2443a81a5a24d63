"""Reasoning/answer splitting: whole strings, streams split at every position, and their agreement."""

from __future__ import annotations

import pytest

from phi4flash.reasoning import ReasoningSplitter, split_reasoning


def stream(splitter: ReasoningSplitter, chunks: list[str]) -> tuple[str, str, list[tuple[str, str]]]:
    """Feed chunks; return (reasoning, answer, all pieces)."""
    pieces = []
    for chunk in chunks:
        pieces += splitter.push(chunk)
    pieces += splitter.flush()
    reasoning = "".join(t for c, t in pieces if c == "reasoning")
    answer = "".join(t for c, t in pieces if c == "answer")
    return reasoning, answer, pieces


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>a</think>b", ("a", "b")),
        ("a</think>b", ("a", "b")),
        ("ab", ("", "ab")),
        ("<think>a", ("a", "")),
        ("  <think>\n a b \n</think>\n\n b c ", ("a b", "b c ")),
        ("\n\nanswer only", ("", "answer only")),
        ("</think>b", ("", "b")),
        ("<think></think>b", ("", "b")),
        ("x <think>a</think>b", ("a", "x b")),
        ("x <think>a", ("a", "x ")),
        ("<think>a</think>b</think>c<think>d", ("a", "b</think>c<think>d")),
        ("<think>a<think>b</think>c", ("a<think>b", "c")),
        ("<thin>k", ("", "<thin>k")),
        ("", ("", "")),
    ],
)
def test_split_reasoning(text: str, expected: tuple[str, str]) -> None:
    assert split_reasoning(text) == expected


def test_split_reasoning_custom_tags() -> None:
    assert split_reasoning("<r>x</r>y", "<r>", "</r>") == ("x", "y")


# Texts on which the streaming mode agrees with split_reasoning (see the module docstring).
AGREE_BOTH = [
    "<think>a</think>b",
    "<think>\nstep 1\n\nstep 2\n</think>\n\nThe answer is 4.",
    "<think>a",
    "  <think> reasoning with < and </ and </thin k</think> answer < </",
    "<think></think>b",
    "</think>b",
    "<think>a</think>b</think>c",
]
AGREE_ANSWER_FIRST = AGREE_BOTH + ["ab", "\n\nanswer < only </ done", "x <think>a</think>b", "x <think>a", "<thin"]
AGREE_REASONING_FIRST = AGREE_BOTH + ["a</think>b", "  a \n</think>\n b", "a </thin> b</think>c"]


def _all_agree(text: str, assume: bool) -> None:
    expected = split_reasoning(text)
    reasoning, answer, _ = stream(ReasoningSplitter(assume_reasoning_first=assume), [text])
    assert (reasoning, answer) == expected
    reasoning, answer, _ = stream(ReasoningSplitter(assume_reasoning_first=assume), list(text))
    assert (reasoning, answer) == expected, "one character per push"
    for cut in range(len(text) + 1):
        reasoning, answer, _ = stream(ReasoningSplitter(assume_reasoning_first=assume), [text[:cut], text[cut:]])
        assert (reasoning, answer) == expected, f"split at {cut}"


@pytest.mark.parametrize("text", AGREE_ANSWER_FIRST)
def test_stream_matches_split_answer_first(text: str) -> None:
    _all_agree(text, assume=False)


@pytest.mark.parametrize("text", AGREE_REASONING_FIRST)
def test_stream_matches_split_reasoning_first(text: str) -> None:
    _all_agree(text, assume=True)


def test_documented_disagreements() -> None:
    # Answer-first cannot take back text already streamed as answer when a bare </think> shows up late.
    splitter = ReasoningSplitter(assume_reasoning_first=False)
    assert stream(splitter, ["a", "</think>", "b"])[:2] == ("", "ab")
    assert splitter.closed and not splitter.opened
    # Reasoning-first streams tagless text as reasoning; closed stays False so the caller can re-split.
    splitter = ReasoningSplitter(assume_reasoning_first=True)
    assert stream(splitter, ["ab"])[:2] == ("ab", "")
    assert not splitter.closed


@pytest.mark.parametrize("tag", ["<think>", "</think>"])
def test_tags_split_at_every_position(tag: str) -> None:
    before = "<think>r1 " if tag == "</think>" else ""
    after = " tail" if tag == "<think>" else ""
    text = f"{before}{tag}x{after}" + ("</think>y" if tag == "<think>" else "")
    expected = split_reasoning(text)
    assert expected == (("x tail", "y") if tag == "<think>" else ("r1", "x"))
    start = len(before)
    for cut in range(start, start + len(tag) + 1):
        for assume in (False, True):
            got = stream(ReasoningSplitter(assume_reasoning_first=assume), [text[:cut], text[cut:]])
            assert got[:2] == expected, (cut, assume)


def test_streaming_is_prompt() -> None:
    splitter = ReasoningSplitter()
    assert splitter.push("<think>") == []
    assert splitter.channel == "reasoning"
    assert splitter.push("Let me") == [("reasoning", "Let me")]
    # Held: a possible start of </think>, and whitespace that may precede it.
    assert splitter.push(" think </th") == [("reasoning", " think")]
    assert splitter.push("ought") == [("reasoning", " </thought")]
    assert splitter.push("\n</think>\n\n") == []
    assert splitter.channel == "answer"
    assert splitter.push("Four") == [("answer", "Four")]
    assert splitter.push(" <think> is text now") == [("answer", " <think> is text now")]
    assert splitter.flush() == []


def test_answer_first_streams_answer_immediately() -> None:
    splitter = ReasoningSplitter()
    assert splitter.push("\n") == []  # whitespace only: may still precede <think>
    assert splitter.push("Hi") == [("answer", "Hi")]
    assert splitter.push(" there <") == [("answer", " there ")]
    assert splitter.push("3") == [("answer", "<3")]


def test_pieces_are_merged_and_nonempty() -> None:
    _, _, pieces = stream(ReasoningSplitter(), ["<think>a", "b</think>c", "d"])
    assert pieces == [("reasoning", "a"), ("reasoning", "b"), ("answer", "c"), ("answer", "d")]
    assert all(text for _, text in pieces)
    assert ReasoningSplitter().push("<think>a</think>b") == [("reasoning", "a"), ("answer", "b")]


def test_empty_tags_rejected() -> None:
    with pytest.raises(ValueError):
        ReasoningSplitter(start_tag="")
