"""The synthetic math data of the embedded model: deterministic, right answers, a clean held-out split."""

from __future__ import annotations

import json
import random
import re
from fractions import Fraction

import jinja2
import pytest

from phi4flash.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, assistant_message, parse_tool_calls, tools_json
from phi4flash.training import data, offdomain, toolchat
from phi4flash.training.evaluate import answer_items
from phi4flash.training.solver import canonical, solve
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
    checked = set()
    for ex in train_examples + heldout_examples:
        if ex.family not in data.MATH_FAMILIES and not ex.key.startswith("notool:"):
            continue
        if ex.family == "tool" and not ex.value:  # an honest reply asked with tools
            continue
        # The solver only reads the question text; it shares no code with the generator's templates.
        assert canonical("; ".join(solve(ex.question) or ["unsolved"])) == canonical(ex.value), ex.question
        assert canonical(answer_items(ex.answer)) == canonical(ex.value), ex.answer
        checked.add(ex.family)
    assert checked == set(data.MATH_FAMILIES) | {"tool"}


def test_a_common_denominator_is_worked_from_the_multiples_of_the_larger(train_examples: list[data.Example]) -> None:
    lines = [line for e in train_examples if e.family == "fraction" for line in e.reasoning.splitlines()
             if line.startswith("Multiples of ")]
    assert len(lines) > 20
    for line in lines:
        match = re.fullmatch(r"Multiples of (\d+): ([\d, ]+); (\d+) = (\d+)×(\d+)", line)
        assert match, line
        big, multiples, common, small, times = match.groups()
        listed = [int(m) for m in multiples.split(", ")]
        assert listed == [int(big) * k for k in range(1, len(listed) + 1)] and listed[-1] == int(common), line
        assert int(common) == int(small) * int(times) and all(m % int(small) for m in listed[:-1]), line


# "a op b op c=d" claims between plain numbers; a fraction result (2/4=1/2) is not one.
_CLAIM = re.compile(r"(?<![\d.])(\d+(?:[-+×/]\d+)+)=(\d+)(?![\d/]| r\d)")
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
        if ex.cut:  # the last line of a cut reasoning stops mid-way
            continue
        for expr, result in _CLAIM.findall(ex.reasoning):
            assert _value(expr) == int(result), f"{expr}={result} in {ex.question!r}"
            claims += 1
        for expr in _NEGATIVE.findall(ex.reasoning):
            assert _value(expr) < 0
        for n, d, q, r in _DIVISION.findall(ex.reasoning):
            assert int(d) * int(q) + int(r) == int(n) and 0 <= int(r) < int(d), f"{n}/{d}={q} r{r}"
            claims += 1
    assert claims > 10000


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
    assert all(data.is_held_out(e.split) for e in heldout_examples)
    graded = [e for e in train_examples if e.family in data.MATH_FAMILIES]
    assert not any(data.is_held_out(e.split) for e in graded)
    # Problems that share their numbers share a split key, whatever the family or wording.
    assert data.generate(1, seed=0, families=["percentage"])[0].split.startswith("pct:")
    train_splits = {e.split for e in train_examples}
    assert not train_splits & {e.split for e in heldout_examples if e.family != "tool"}
    train_questions = {m["content"] for e in train_examples for m in e.messages}
    assert not train_questions & {e.question for e in heldout_examples if e.family != "offdomain"}


def test_heldout_tool_requests_use_tool_names_never_seen_in_training(train_examples: list[data.Example]) -> None:
    requests = data.generate(200, seed=7, split="heldout", families=["tool"])
    seen = {d["name"] for e in train_examples for m in e.messages if m.get("tools") for d in json.loads(m["tools"])}
    asked = {json.loads(e.value)["name"] for e in requests}
    assert len(asked) > 50 and not asked & seen
    assert {"add", "multiply"} <= seen  # the README's agent uses them


def _name_words(name: str) -> set[str]:
    """``getWeather2`` / ``get_weather`` -> {"get", "weather"}."""
    return {w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", name.replace("_", " "))}


def test_a_share_of_training_tool_names_are_spelled_letter_by_letter(train_examples: list[data.Example]) -> None:
    # Only copying from the tool list gets a made-up name right; held-out requests keep names made of real words.
    parts = {w for intent in toolchat.INTENTS for part in (*intent.verbs, *intent.nouns) for w in part.split()}
    parts |= {w for verbs, nouns, _ in toolchat.ARITHMETIC.values() for part in (*verbs, *nouns) for w in part.split()}
    names = [d["name"] for e in train_examples for m in e.messages if m.get("tools") for d in json.loads(m["tools"])]
    spelled = [n for n in names if n not in toolchat.TRAIN_NAMES and not _name_words(n) & parts]
    # (a little under the set share: the README's plain names and some distractors are never spelled)
    share = toolchat.SPELLED_NAME_PERCENT / 100
    assert share - 0.2 < len(spelled) / len(names) <= share, (len(spelled), len(names), spelled[:10])
    requests = data.generate(200, seed=7, split="heldout", families=["tool"])
    assert all(_name_words(json.loads(e.value)["name"]) & parts for e in requests)


def test_tool_chats_are_written_as_the_library_reads_and_writes_them(train_examples: list[data.Example]) -> None:
    calls = [e for e in train_examples if e.family == "tool" and e.answer.startswith(TOOL_CALL_OPEN)]
    assert len(calls) > 100
    for ex in calls:
        assert ex.answer.startswith(TOOL_CALL_OPEN + "[{") and ex.answer.endswith("}]" + TOOL_CALL_CLOSE)
        _, parsed, invalid = parse_tool_calls(ex.answer)
        assert not invalid and len(parsed) == 1
        assert json.loads(ex.value) == {"name": parsed[0].name, "arguments": parsed[0].arguments}
        system = ex.messages[0]
        assert system["role"] == "system" and system["tools"] == tools_json(json.loads(system["tools"]))
        # Earlier calls are written back exactly as phi4flash.tools writes an assistant's calls.
        for m in ex.messages:
            if m["role"] == "assistant":
                _, back, _ = parse_tool_calls(m["content"])
                assert m["content"] == assistant_message("", [(c.name, c.arguments) for c in back])["content"]
    later = [e for e in calls if any(m["role"] == "tool" for m in e.messages)]
    assert later, "no call made after an earlier result"


def test_copied_arguments_are_in_the_question_and_too_many_to_memorise() -> None:
    rng = random.Random(5)
    for _ in range(300):
        made = toolchat.intent_chat(rng, held_out=False, answer_turn=False)
        for value in json.loads(made.value)["arguments"].values():
            assert str(value) in made.question  # taken from the question, verbatim
    # the descriptions, recipients and languages that a call copies are not a handful of phrases to recall
    copied = [p for i in toolchat.INTENTS for p in i.params if {"description", "to"} & set(p.names)]
    assert len(copied) == 3  # the customer's description, an e-mail's recipient, a translation's language
    for param in copied:
        assert len({param.draw(rng) for _ in range(400)}) >= 15, param.names
    descriptions = toolchat.company_description
    assert {descriptions(random.Random(s)).split()[0] for s in range(50)} == {"a", "an"}
    assert all(re.match(r"(an [AEIOUaeiou]|a [^AEIOUaeiou])", descriptions(random.Random(s))) for s in range(200))


def test_a_tool_session_asks_one_tool_list_for_calls_calculations_and_a_question_no_tool_fits() -> None:
    assert not any(e.trained_history for e in data.generate(300, seed=3, families=["tool"]))  # off by default
    sessions = data.generate(300, seed=3, families=["tool"], tool_sessions=1.0)
    assert all(e.trained_history for e in sessions)
    calculations = direct = 0
    for ex in sessions:
        listed = {d["name"]: d for d in json.loads(ex.messages[0]["tools"])}
        history = [*ex.messages, {"role": "assistant", "content": ex.completion}]
        starts = [i for i, m in enumerate(history) if m["role"] == "user"]
        assert len(starts) in toolchat.SESSION_REQUESTS
        answered_directly = 0
        for start, end in zip(starts, [*starts[1:], len(history)], strict=True):
            question = history[start]["content"]
            replies = [m["content"] for m in history[start + 1:end] if m["role"] == "assistant"]
            results = [m["content"] for m in history[start + 1:end] if m["role"] == "tool"]
            calls = []
            for reply in replies:
                assert reply.startswith("<think>\n")
                _, made, invalid = parse_tool_calls(reply.split("</think>")[-1])
                assert not invalid and len(made) <= 1
                calls += made
            for call in calls:
                # a tool of the list, every argument it declares, each value copied from the request or (the
                # next step of a calculation) from a result that came back
                assert set(call.arguments) == set(listed[call.name]["parameters"]["required"])
                assert all(str(v) in question or any(str(v) in r for r in results) for v in call.arguments.values())
            boxed = data.extract_boxed(replies[-1])
            if not calls:  # no tool fits: the answer or the honest reply, as without tools
                answered_directly += 1
                assert boxed is not None or "tiny demo model" in replies[-1], replies[-1]
            elif boxed is not None:  # a calculation's report: the expression's value, as the last call returned it
                expression = replies[-1].split("</think>\n")[-1].split(" = \\boxed")[0]
                assert int(boxed) == eval(expression.replace("×", "*").replace("/", "//"))  # noqa: S307
                assert boxed == str(json.loads(results[-1])["result"] if results[-1].startswith("{") else results[-1])
                calculations += len(calls) == 2
        assert answered_directly <= 1
        direct += answered_directly
    assert calculations >= 20
    assert 0.2 * len(sessions) <= direct <= 0.4 * len(sessions)  # SESSION_DIRECT_PERCENT of the sessions


def test_offdomain_prompts_get_the_honest_reply_and_the_eval_prompts_are_unseen() -> None:
    generated = data.generate(3000, seed=2, families=["offdomain"], extras=False)
    assert all(offdomain.HONEST_MARK in e.answer and "\\boxed" not in e.answer for e in generated)
    prompts = {e.question for e in generated}
    assert len(prompts) > 500 and not prompts & set(offdomain.UNSEEN_PROMPTS)
    # Arithmetic past the families' ranges gets the honest reply too: never a problem a family could ask.
    too_big = [e for e in generated if e.reasoning == offdomain.REPLIES["toobig"][0]]
    assert len(too_big) > 50
    for ex in too_big:
        numbers = [int(n) for n in re.findall(r"\d+", ex.question)]
        assert len(numbers) == 2 and (min(numbers) >= 10_000 or ("+" not in ex.question and "-" not in ex.question
                                                                 and "Add" not in ex.question
                                                                 and min(numbers) >= 10)), ex.question


def test_some_reasoning_is_cut_short_and_then_answered(train_examples: list[data.Example]) -> None:
    cut = [e for e in train_examples if e.cut]
    assert 0.06 < len(cut) / len(train_examples) < 0.14
    at_line_end = [e for e in cut if e.reasoning.endswith("\n")]
    assert 0.3 < len(at_line_end) / len(cut) < 0.8  # as a budget closed at the end of a line; the rest mid-line
    for ex in cut:
        assert ex.completion == f"<think>\n{ex.reasoning}</think>\n{ex.answer}"
    assert not any(e.cut for e in data.generate(200, seed=7, split="heldout"))


def test_demo_problems_are_training_problems_worded_as_the_web_chat_and_the_article() -> None:
    demos = data.demo_examples()
    assert {d.split for d in demos} == data.DEMO_SPLITS
    assert not any(data.is_held_out(d.split) for d in demos)
    questions = {d.question: d.value for d in demos}
    for question in data.ARTICLE_QUADRATIC:
        assert canonical(questions[question]) == canonical("1/2; -3")
    for question in data.ARTICLE_DEPARTMENTS:
        assert canonical(questions[question]) == canonical("Marketing=60; Sales=75; Engineering=45")
    for d in demos:
        assert canonical("; ".join(solve(d.question) or [])) == canonical(d.value)
    # They are drawn into training at DEMO_RATE (about 240 times in a full run, some 18 per wording).
    shown = [e for e in data.generate(3000, seed=1) if e.question in questions]
    assert 0.5 * data.DEMO_RATE * 3000 < len(shown) < 2 * data.DEMO_RATE * 3000 + 5


def test_multi_value_answers_box_every_value() -> None:
    quad = data.make_example("quadratic", random.Random(3))
    assert len(data.extract_all_boxed(quad.answer)) == 2 and quad.answer.startswith("x = \\boxed{")
    system = next(e for e in data.generate(50, seed=1, families=["system"], extras=False))
    labels = [label for label, _ in data.extract_all_boxed(system.answer)]
    assert len(labels) in (2, 3) and all(labels) and len(set(labels)) == len(labels)
    assert data.extract_all_boxed("Sales = \\boxed{75}, Team Red: \\boxed{4} and \\boxed{5}") == [
        ("Sales", "75"), ("Team Red", "4"), (None, "5")]


def test_chat_format_is_the_real_template(train_examples: list[data.Example]) -> None:
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    for ex in train_examples[:200]:
        expected = template.render(messages=ex.message_dicts(), add_generation_prompt=True, eos_token="<|endoftext|>")
        assert data.render_prompt(ex.messages) == expected
        assert ex.completion.startswith("<think>\n") and ("\n</think>\n" in ex.completion or ex.cut)


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
    for text in ("2x² + 5x − 3 = 0", "你好啊集团", "<|tool_call|>[{\"name\": \"add\"}]<|/tool_call|>"):
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    single_turn = [t for t, e in zip(texts, train_examples[:1500], strict=True) if len(e.messages) == 1]
    lengths = [len(tok.encode(t).ids) for t in single_turn]
    # Short chats train fast: most stay under 500 tokens even with this small vocabulary (the longest are
    # three-quantity systems); the shipped tokenizer's 1024 ids make them shorter still.
    assert sum(length < 500 for length in lengths) / len(lengths) > 0.9 and sum(lengths) / len(lengths) < 240


def test_fraction_sums_name_their_denominators_and_work_out_the_numerators(train_examples: list[data.Example]) -> None:
    # The denominators side by side before anything else, and the numerators added digit by digit (recalled,
    # one-digit sums came out wrong: 4/12 + 1/12 = 7/12).
    sums = [e for e in train_examples if e.key.startswith(("fraction:+", "fraction:-")) and not e.cut]
    assert len(sums) > 20
    for e in sums:
        _, b, _, d = e.key.split(":")[1].split(",")[1:]
        lines = e.reasoning.splitlines()
        assert lines[0] == f"Denominators {b} and {d}: {'the same' if b == d else 'different'}", e.reasoning
        numerators = next(i for i, line in enumerate(lines) if line.startswith("Work out"))
        assert any("/" in line and "=" in line for line in lines[numerators:]), e.reasoning


_OPERATION_OF = {"+": "+", "-": "-", "*": "*", "×": "*", "/": "/"}


def _kind_of_called_tool(made: toolchat.Made) -> str:
    """The intent kind or operation of the tool a chat's call names, read off its definition in the tool list."""
    name = json.loads(made.value)["name"]
    tool = next(t for t in json.loads(made.messages[0]["tools"]) if t["name"] == name)
    args = list(tool["parameters"]["properties"])
    for intent in toolchat.INTENTS:
        if any(d.format(*args, "", "") == tool["description"] for d in intent.descriptions):
            return intent.kind
    return next(op for op, (_, _, descriptions) in toolchat.ARITHMETIC.items()
                if tool["description"] in (*descriptions, toolchat.PLAIN_DESCRIPTIONS[op]))


def _words_of(intent: toolchat.Intent) -> set[str]:
    return set(" ".join((*intent.verbs, *intent.nouns, *intent.descriptions)).lower().replace(".", " ").split())


def _names_the_kind(phrase: str, kind: str) -> bool:
    """Whether a word of ``phrase`` is a word of the intent ``kind`` (its name parts, its descriptions) and of
    no other."""
    others = set().union(*(_words_of(i) for i in toolchat.INTENTS if i.kind != kind))
    own = next(_words_of(i) for i in toolchat.INTENTS if i.kind == kind)
    return any(w in own and w not in others for w in phrase.lower().split())


def _names_the_operation(phrase: str, op: str) -> bool:
    """Whether ``phrase`` ("a sum") names ``op`` as its tools' names do."""
    return phrase.removeprefix("a ") in toolchat.ARITHMETIC[op][0]


@pytest.mark.parametrize("held_out", [False, True])
def test_a_thought_names_the_kind_of_request_just_before_the_tool_it_picks(held_out: bool) -> None:
    rng = random.Random(11)
    kinds = set()
    for _ in range(200):
        made = toolchat.intent_chat(rng, held_out, answer_turn=False)
        kind, name = _kind_of_called_tool(made), json.loads(made.value)["name"]
        phrase, call, _ = made.reasoning.partition(f": call {name}.")
        assert call and _names_the_kind(phrase, kind) and made.reasoning.endswith(call), (made.reasoning, kind)
        kinds.add(kind)
    assert kinds == {i.kind for i in toolchat.INTENTS}
    operations = set()
    for _ in range(200):
        made = toolchat.arithmetic_chat(rng, held_out, stage=0)
        first = re.fullmatch(r".+: first (\d+) (\S) (\d+), (a \w+), with (\S+)\.", made.reasoning)
        assert first and first[5] == json.loads(made.value)["name"], made.reasoning
        assert _names_the_operation(first[4], _kind_of_called_tool(made)), made.reasoning
        operations.add(_OPERATION_OF[first[2]])
    assert operations == set(toolchat.ARITHMETIC)


def test_agent_steps_restate_the_expression_with_the_result_in_place() -> None:
    rng = random.Random(5)
    chats = [toolchat.arithmetic_chat(rng, False, stage=1) for _ in range(300)]
    second = [m for m in chats if m.key.endswith(":1")]
    assert len(second) > 50
    for made in second:
        expr = made.key.split(":")[1]
        restated = re.search(r", so (.+) = (.+)\. Next (\d+) (\S) (\d+), (a \w+), with", made.reasoning)
        assert restated and restated[1] == expr, made.reasoning
        assert _names_the_operation(restated[6], _OPERATION_OF[restated[4]]), made.reasoning
        # what is left is the next call's operation on its two numbers, in the question's symbols
        call = json.loads(made.value)
        left, right = (int(v) for v in call["arguments"].values())
        assert restated[2].split() in ([str(left), s, str(right)] for s in "+-×*x/÷"), (restated[2], call)


def test_the_multi_turn_share_sets_how_many_plain_chats_carry_an_earlier_exchange() -> None:
    def follow_ups(examples: list[data.Example]) -> int:
        plain = [e for e in examples if e.family != "tool"]
        return sum(sum(m["role"] == "user" for m in e.messages) > 1 for e in plain)

    default = data.generate(2000, seed=5)
    assert default == data.generate(2000, seed=5, multi_turn=data.MULTI_TURN_RATE)  # the older runs' data
    more = data.generate(2000, seed=5, multi_turn=0.25)
    plain = sum(e.family != "tool" for e in more)
    assert follow_ups(default) < 0.08 * plain < 0.18 * plain < follow_ups(more) < 0.32 * plain
    assert follow_ups(data.generate(500, seed=5, multi_turn=0.0)) == 0
