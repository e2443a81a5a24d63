"""The shipped embedded model: loads offline, has every block kind, and reasons its way to right answers."""

from __future__ import annotations

import subprocess
import sys

import pytest

import phi4flash
from phi4flash import GenerationConfig
from phi4flash.config import LAYER_KINDS
from phi4flash.training import data, evaluate

PER_FAMILY = 8
# Right answers required among the first PER_FAMILY held-out problems of each family, graded as `phi4flash eval`
# grades them (greedy, so the same every run on one machine; one below the measured count leaves room for
# another CPU's rounding). `phi4flash eval embedded` measures 50 per family (docs/embedded.md); these first
# eight got 8 in every family but fraction (5) when the model was made, 8 in every family but quadratic (7) and
# fraction (5) after its first continuation, and after its second (2026-12-01, the fraction sums worked digit by
# digit) 8 in every family but quadratic (7) and fraction (6). The eleventh run, which replaced that model on
# 2026-12-02, and the sixteenth run continued, which replaced it on 2026-12-05, pass the same thresholds.
REQUIRED = {family: 7 for family in data.MATH_FAMILIES} | {"quadratic": 6, "fraction": 5}


@pytest.fixture(scope="module")
def engine():
    eng = phi4flash.load("embedded")
    yield eng
    eng.close()


def test_loads_offline_without_touching_the_network() -> None:
    code = """
import socket, sys
def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")
socket.socket.connect = refuse
socket.create_connection = refuse
import phi4flash
engine = phi4flash.load("embedded")
done = engine.generate([{"role": "user", "content": "What is 12 + 30?"}], phi4flash.GenerationConfig(temperature=0))
engine.close()
print(done.finish_reason)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={"PATH": "", "HOME": "/tmp", "HF_HUB_OFFLINE": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "stop"


def test_has_every_block_kind_and_fits_in_the_wheel(engine) -> None:
    config = engine.model.config
    assert config.model_type == "phi4flash"
    assert set(config.layer_kinds) == set(LAYER_KINDS)
    weights = phi4flash.weights.EMBEDDED_DIR / "model.safetensors"
    assert weights.stat().st_size <= 25 * 2**20


@pytest.mark.parametrize("family", data.MATH_FAMILIES)
def test_answers_held_out_problems_with_its_reasoning_apart(engine, family: str) -> None:
    problems = evaluate.heldout_problems(PER_FAMILY, families=[family])
    results = engine.generate_batch([p.message_dicts() for p in problems],
                                    GenerationConfig(temperature=0, max_new_tokens=768))
    right = []
    for problem, done in zip(problems, results, strict=True):
        assert done.finish_reason == "stop", (problem.question, done)
        # the worked steps in the reasoning channel, the boxed answer in the answer channel
        assert done.reasoning and "\\boxed" not in done.reasoning and "<think>" not in done.reasoning
        assert data.extract_boxed(done.answer) is not None, done.answer
        assert done.metrics.reasoning_tokens > done.metrics.answer_tokens > 0
        right.append(evaluate.grade(problem, done.answer)[1])
    assert sum(right) >= REQUIRED[family], [(p.question, ok) for p, ok in zip(problems, right, strict=True)]


def test_tool_grammar_lets_it_call_tools_it_never_saw(engine) -> None:
    """Held-out tool names, under tool_choice "auto"'s grammar as the server and ChatPhi4Flash run it: 7 of the
    first 8 right when measured (the eval's 4 x 100: 86.5%), and never fewer than free (7 of 8; the tool-heavy
    continuations taught it to copy listed names, so the grammar now adds 2 points on the eval's 200, where it
    added 24 to the second edition); the chats where no tool fits are answered as before (8 of 8 both ways)."""
    free = evaluate.evaluate(engine=engine, n_per_family=PER_FAMILY, families=["tool", "notool"],
                             constrain_tools=False)["families"]
    constrained = evaluate.evaluate(engine=engine, n_per_family=PER_FAMILY, families=["tool", "notool"])["families"]
    assert constrained["tool"]["correct"] >= 7 and constrained["tool"]["correct"] >= free["tool"]["correct"]
    assert constrained["notool"]["correct"] >= free["notool"]["correct"] - 1


@pytest.mark.parametrize("close_at", ["token", "line"])
def test_a_capped_reasoning_still_ends_in_an_answer(engine, close_at: str) -> None:
    """With the reasoning cut at 64 tokens, what follows ``</think>`` is an answer (a boxed value, none of the
    reasoning's marks), not more reasoning. 60 of 60 in both modes when measured; 3 and 12 of 60 while the cap was
    forced in the tag's own tokens, which the model never saw (it wrote a second ``</think>``)."""
    from phi4flash.reasoning import AnswerGuard
    from phi4flash.training import checks

    problems = evaluate.heldout_problems(2, families=list(data.MATH_FAMILIES))
    results = checks._generate_all(engine, [(p.message_dicts(), GenerationConfig(
        temperature=0, max_new_tokens=128, logits_processor=AnswerGuard(
            engine.tokenizer, max_new_tokens=128, max_reasoning_tokens=64, close_at=close_at))) for p in problems])
    clean = [checks.clean_answer(done.answer) for done in results]
    assert sum(clean) >= len(problems) - 1, [done.answer for done in results]


def test_a_follow_up_question_without_tools_gets_an_answer_not_a_call(engine) -> None:
    """Held-out problems asked after an earlier exchange with no tool list: answered, never a call of a tool that
    does not exist (what a model that met second questions mostly in tool sessions does). The eleventh run: 16 of
    20 right, no call; the sixteenth: a phantom call; the sixteenth continued with --multi-turn 0.6 (shipped): no
    call."""
    from phi4flash.training import checks

    follow = checks.follow_up_check(engine, n_per_family=2)
    assert follow["tool_calls"] == 0, follow["example_call"]
    assert follow["right"] >= 0.75 * follow["n"], follow
