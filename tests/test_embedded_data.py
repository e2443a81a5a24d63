"""The synthetic math data of the embedded model: deterministic, right answers, a clean held-out split."""

from __future__ import annotations

import re
from fractions import Fraction

import jinja2
import pytest

from phi4flash.training import data
from phi4flash.training.tokenizer_train import CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer


@pytest.fixture(scope="module")
def train_examples() -> list[data.Example]:
    return data.generate(3000, seed=7)


@pytest.fixture(scope="module")
def heldout_examples() -> list[data.Example]:
    return data.generate(600, seed=7, split="heldout")


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b = data.generate(300, seed=3), data.generate(300, seed=3)
    assert [(e.messages, e.completion) for e in a] == [(e.messages, e.completion) for e in b]
    c = data.generate(300, seed=4)
    assert [e.completion for e in a] != [e.completion for e in c]
    h1, h2 = data.generate(60, seed=3, split="heldout"), data.generate(60, seed=3, split="heldout")
    assert [e.key for e in h1] == [e.key for e in h2]


def test_every_family_appears(train_examples: list[data.Example]) -> None:
    assert {e.family for e in train_examples} == set(data.FAMILIES)


def test_answers_match_an_independent_solver(train_examples: list[data.Example],
                                             heldout_examples: list[data.Example]) -> None:
    checked = 0
    for ex in train_examples + heldout_examples:
        if ex.family == "chat":
            continue
        # The solver only reads the question text; it shares no code with the generator's templates.
        assert data.exact_value(ex.question) == Fraction(int(ex.value)), ex.question
        assert data.extract_boxed(ex.answer) == ex.value
        assert int(ex.value) >= 0
        checked += 1
    assert checked > 3000


_CLAIM = re.compile(r"(?<![\d.])(\d+(?:[-+×/]\d+)+)=(\d+)(?!\d| r\d)")
_DIVISION = re.compile(r"(?<![\d.])(\d+)/(\d+)=(\d+) r(\d+)")
_NEGATIVE = re.compile(r"(?<![\d.])(\d+(?:-\d+)+)<0")


def _value(expr: str) -> Fraction:
    tokens = re.findall(r"\d+|[-+×/]", expr)
    # Left to right with × and / first, as written in the reasoning.
    terms: list[Fraction] = [Fraction(int(tokens[0]))]
    ops: list[str] = []
    for op, num in zip(tokens[1::2], tokens[2::2], strict=True):
        n = Fraction(int(num))
        if op == "×":
            terms[-1] *= n
        elif op == "/":
            terms[-1] /= n
        else:
            ops.append(op)
            terms.append(n)
    total = terms[0]
    for op, t in zip(ops, terms[1:], strict=True):
        total = total + t if op == "+" else total - t
    return total


def test_every_step_of_the_reasoning_is_right(train_examples: list[data.Example]) -> None:
    claims = 0
    for ex in train_examples:
        for expr, result in _CLAIM.findall(ex.reasoning):
            assert _value(expr) == int(result), f"{expr}={result} in {ex.question!r}"
            claims += 1
        for expr in _NEGATIVE.findall(ex.reasoning):
            assert _value(expr) < 0
        for n, d, q, r in _DIVISION.findall(ex.reasoning):
            assert int(d) * int(q) + int(r) == int(n) and 0 <= int(r) < int(d), f"{n}/{d}={q} r{r}"
            claims += 1
    assert claims > 5000


def test_digit_by_digit_lines_end_with_the_answer() -> None:
    lines = data.addition_steps(4728, 395)
    assert lines[0] == "8+5+0=13, carry 1, so far 3, left 472+39"
    assert lines[-1].split(", so far ")[1].startswith("5123,")
    sub = data.subtraction_steps(1000, 999)
    assert sub[-1] == "1-0-1=0, borrow 0, so far 0001, left 0-0"
    mul = data.multiplication_steps(47, 6)
    assert mul == ["7×6=42, 2+0=2, carry 4+0=4, so far 2, left 4", "4×6=24, 4+4=8, carry 2+0=2, so far 82, left 0",
                   "0×6=0, 0+2=2, carry 0+0=0, so far 282, left 0"]
    assert data.multiplication_steps(47, 9)[1] == "4×9=36, 6+6=12, carry 3+1=4, so far 23, left 0"
    div = data.division_steps(136, 4)
    assert div == ["1/4=0 r1, so far 0, left 36", "13/4=3 r1, so far 03, left 6", "16/4=4 r0, so far 034, left none"]
    lines, value = data.column(180, "/", 12)
    assert value == 15 and lines[0] == "Work out 180/12:" and lines[-1] == "180/12=15"


def test_heldout_split_never_overlaps_training(train_examples: list[data.Example],
                                              heldout_examples: list[data.Example]) -> None:
    assert all(data.is_held_out(e.key) for e in heldout_examples)
    assert not any(data.is_held_out(e.key) for e in train_examples if e.family != "chat")
    train_keys = {e.key for e in train_examples}
    assert not train_keys & {e.key for e in heldout_examples}
    train_questions = {m["content"] for e in train_examples for m in e.messages}
    assert not train_questions & {e.question for e in heldout_examples}


def test_demo_problems_are_training_problems() -> None:
    demos = data.demo_examples()
    assert {d.key for d in demos} == data.DEMO_KEYS
    assert not any(data.is_held_out(d.key) for d in demos)
    assert [d.value for d in demos] == ["75", "60", "45", "5"]
    for d in demos:
        assert data.exact_value(d.question) == int(d.value)


def test_demo_problem_is_in_the_word_family() -> None:
    demo = ("Sales has 25% more employees than Marketing. Engineering has 40% fewer employees than Sales. "
            "The three departments have 180 employees in total. How many employees does Marketing have?")
    assert data.exact_value(demo) == 60
    found = [e for e in data.generate(3000, seed=1, families=["word"], extras=False)
             if "Engineering has" in e.question and "departments have" in e.question]
    assert found, "the departments template is missing"


def test_chat_format_is_the_real_template(train_examples: list[data.Example]) -> None:
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    for ex in train_examples[:200]:
        expected = template.render(messages=ex.message_dicts(), add_generation_prompt=True, eos_token="<|endoftext|>")
        assert data.render_prompt(ex.messages) == expected
        assert ex.completion.startswith("<think>\n") and "\n</think>\n" in ex.completion


def test_tokenizer_digits_specials_and_short_sequences(train_examples: list[data.Example]) -> None:
    texts = [data.render_prompt(e.messages) + e.completion + "<|end|>" for e in train_examples[:1500]]
    tok = train_tokenizer(texts, vocab_size=448)
    assert tok.get_vocab_size() == 448
    specials = [t for t, _, _ in SPECIAL_TOKENS]
    assert [tok.token_to_id(t) for t in specials] == list(range(448 - len(specials), 448))
    enc = tok.encode("<|user|>What is 4728 + 395?<|end|><|assistant|>")
    assert enc.tokens[0] == "<|user|>" and enc.tokens[-1] == "<|assistant|>"
    assert [t for t in enc.tokens if any(ch.isdigit() for ch in t)] == list("4728395")
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|user|>What is 4728 + 395?<|end|><|assistant|>"
    single_turn = [t for t, e in zip(texts, train_examples[:1500], strict=True) if len(e.messages) == 1]
    lengths = [len(tok.encode(t).ids) for t in single_turn]
    # Short chats train fast: most stay under 200 tokens (the longest are three-quantity word problems).
    assert sum(length < 200 for length in lengths) / len(lengths) > 0.85 and sum(lengths) / len(lengths) < 160
