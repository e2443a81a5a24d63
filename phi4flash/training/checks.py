"""The issue's checks beyond held-out accuracy (``phi4flash eval embedded --extras``).

- **the article's problems**: 2x² + 5x - 3 = 0 and the three departments, in every wording the web chat and
  the article use, greedy and with ten seeds at temperature 0.6;
- **agents**: the README's LangChain agent at the engine level (``What is (3 + 4) * 5?`` with ``add`` and
  ``multiply``, a reasoning budget of 64), and held-out expressions with held-out tool names, each run to
  its answer by executing the calls;
- **the reasoning budget**: held-out problems with the reasoning capped, closed either at the cap (the
  token) or at the end of the line the cap falls in; an answer is clean when it has a boxed value and no
  reasoning left in it;
- **follow-ups**: held-out problems asked as the second question of a conversation without tools (the earlier
  reply whole or its answer only, as chat UIs keep it): right, and answered without a tool call.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .. import tools as tool_format
from . import data as data_mod
from . import toolchat
from .evaluate import grade

README_TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"], "type": "object"}}},
    {"type": "function", "function": {"name": "multiply", "description": "Multiply two integers.", "parameters": {
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"], "type": "object"}}},
]
_REASONING_MARKS = re.compile(r"so far|carry|borrow|Work out|left \d|</?think>|\d+u\b")


def _generate_all(engine: Any, jobs: Sequence[tuple[list[dict[str, Any]], Any]]) -> list[Any]:
    """Generate for every (messages, config) pair at once (they share decode steps); results in order."""
    results: list[Any] = [None] * len(jobs)

    def run(i: int, messages: list[dict[str, Any]], config: Any) -> None:
        results[i] = engine.generate(messages, config)

    threads = [threading.Thread(target=run, args=(i, m, c)) for i, (m, c) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def article_check(engine: Any, seeds: int = 10, temperature: float = 0.6) -> list[dict[str, Any]]:
    """Each wording of the article's problems: right in greedy decoding? right in how many of ``seeds`` samples?"""
    from .. import GenerationConfig

    demos = {d.question: d for d in data_mod.demo_examples()}
    rows = []
    for question in (*data_mod.ARTICLE_QUADRATIC, *data_mod.ARTICLE_DEPARTMENTS):
        example = demos[question]
        messages = [{"role": "user", "content": question}]
        jobs = [(messages, GenerationConfig(temperature=0.0, max_new_tokens=1024))]
        jobs += [(messages, GenerationConfig(temperature=temperature, top_p=0.95, seed=seed, max_new_tokens=1024))
                 for seed in range(seeds)]
        done = _generate_all(engine, jobs)
        greedy = grade(example, done[0].answer)
        rows.append({"question": question, "expected": example.value, "greedy": greedy[1], "greedy_answer": greedy[0],
                     "sampled_right": sum(grade(example, c.answer)[1] for c in done[1:]), "seeds": seeds})
    return rows


def run_agent(engine: Any, question: str, tools: list[dict[str, Any]], execute: Callable[[str, dict[str, Any]], Any],
              system: str | None = None, reasoning_budget: int | None = 64, max_turns: int = 6,
              max_new_tokens: int = 256, constrain: bool = True) -> tuple[str, list[tuple[str, dict[str, Any], Any]]]:
    """Run a tool-calling loop as an agent framework does; returns (final answer, [(name, arguments, result)]).
    ``constrain``: calls follow the tools' grammar, as ``ChatPhi4Flash`` and the server run them (tool_choice
    "auto")."""
    from .. import GenerationConfig
    from ..constrained import optional_calls
    from ..reasoning import AnswerGuard

    messages: list[dict[str, Any]] = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": question})
    calls: list[tuple[str, dict[str, Any], Any]] = []
    for _ in range(max_turns):
        guard = AnswerGuard(engine.tokenizer, max_new_tokens=max_new_tokens, max_reasoning_tokens=reasoning_budget)
        config = GenerationConfig(temperature=0.0, max_new_tokens=max_new_tokens, logits_processor=guard)
        if constrain:
            config.constraint = optional_calls(engine.tokenizer, tools, max_new_tokens=max_new_tokens)
        done = engine.generate(tool_format.attach_tools(messages, tools), config)
        text, found, _ = tool_format.parse_tool_calls(done.answer)
        if not found:
            return text, calls
        messages.append(tool_format.assistant_message(text, [(c.name, c.arguments) for c in found]))
        for call in found:
            result = execute(call.name, call.arguments)
            calls.append((call.name, call.arguments, result))
            messages.append(tool_format.tool_result_message(str(result)))
    return "", calls


def _arithmetic(tools: list[toolchat.Tool]) -> Callable[[str, dict[str, Any]], Any]:
    by_name = {t.name: t for t in tools}

    def execute(name: str, arguments: dict[str, Any]) -> Any:
        tool = by_name.get(name)
        if tool is None or tool.op is None:
            return f"Error: no arithmetic tool named {name}"
        a, b = (arguments.get(k) for k in tool.arg_names)
        if not isinstance(a, int) or not isinstance(b, int):
            return "Error: integer arguments expected"
        if tool.op == "/" and b == 0:
            return "Error: division by zero"
        return toolchat.apply_op(tool.op, a, b)

    return execute


def agent_check(engine: Any, n: int = 30, seed: int = 0, constrain: bool = True) -> dict[str, Any]:
    """The README agent, and ``n`` held-out expressions with held-out tool names, run through their tools
    (``constrain``: see :func:`run_agent`)."""
    readme_tools = [toolchat.Tool("add", "", ["a", "b"], {}, op="+"),
                    toolchat.Tool("multiply", "", ["a", "b"], {}, op="*")]
    answer, calls = run_agent(engine, "What is (3 + 4) * 5?", README_TOOLS, _arithmetic(readme_tools),
                              system="Use the tools for arithmetic.", constrain=constrain)
    readme = {"answer": answer, "calls": [(name, args) for name, args, _ in calls],
              "right": data_mod.extract_boxed(answer) == "35" and [c[0] for c in calls] == ["add", "multiply"]}
    rng = random.Random(f"agent-check:{seed}")
    right = 0
    failures = []
    for _ in range(n):
        expr, steps = toolchat.draw_expression(rng)
        needed = list(dict.fromkeys(op for op, _, _ in steps))
        tools = [toolchat.arithmetic_tool(op, rng, True) for op in needed]
        value = _evaluate(steps)
        answer, calls = run_agent(engine, f"What is {expr}?", [t.definition() for t in tools], _arithmetic(tools),
                                  system=rng.choice([None, "Use the tools for arithmetic."]), constrain=constrain)
        ok = data_mod.extract_boxed(answer) == str(value) and len(calls) == len(steps)
        right += ok
        if not ok and len(failures) < 3:
            failures.append({"expression": expr, "value": value, "answer": answer, "calls": calls})
    return {"readme": readme, "heldout": {"n": n, "right": right}, "failures": failures}


def _evaluate(steps: list[tuple[str, int | None, int | None]]) -> int:
    result = 0
    for op, left, right in steps:
        a = result if left is None else left
        b = result if right is None else right
        result = toolchat.apply_op(op, a, b)
    return result


def clean_answer(answer: str) -> bool:
    """An answer, not more reasoning: a boxed value and none of the reasoning's marks."""
    return data_mod.extract_boxed(answer) is not None and not _REASONING_MARKS.search(answer)


def budget_check(engine: Any, budgets: Sequence[int] = (16, 64), n_per_family: int = 6, seed: int = 0,
                 modes: Sequence[str] = ("token", "line")) -> list[dict[str, Any]]:
    """Held-out math problems with the reasoning capped: clean answers and right answers, per budget and mode."""
    from .. import GenerationConfig
    from ..reasoning import AnswerGuard

    problems = data_mod.generate(n_per_family * len(data_mod.MATH_FAMILIES), seed=seed, split="heldout")
    rows = []
    for budget in budgets:
        for mode in modes:
            jobs = []
            for ex in problems:
                guard = AnswerGuard(engine.tokenizer, max_new_tokens=budget + 64, max_reasoning_tokens=budget,
                                    close_at=mode)
                jobs.append((ex.message_dicts(), GenerationConfig(temperature=0.0, max_new_tokens=budget + 64,
                                                                  logits_processor=guard)))
            done = _generate_all(engine, jobs)
            clean = sum(clean_answer(c.answer) for c in done)
            right = sum(grade(ex, c.answer)[1] for ex, c in zip(problems, done, strict=True))
            rows.append({"budget": budget, "mode": mode, "n": len(problems), "clean": clean, "right": right,
                         "example": done[0].answer[:120]})
    return rows


def follow_up_check(engine: Any, n_per_family: int = 6, seed: int = 0) -> dict[str, Any]:
    """Held-out math problems, each after an earlier exchange on another held-out problem and no tool list:
    how many are right, and how many replies call a tool (a model that met second questions mostly in tool
    sessions calls tools that do not exist)."""
    from .. import GenerationConfig

    families = data_mod.MATH_FAMILIES
    problems = data_mod.generate(n_per_family * len(families), seed=seed, split="heldout")
    earlier = data_mod.generate(len(problems) + 1, seed=seed + 1, split="heldout")[1:]  # another family each
    jobs = []
    for i, (ex, prev) in enumerate(zip(problems, earlier, strict=True)):
        reply = prev.completion if i % 2 == 0 else prev.answer
        messages = [*prev.message_dicts(), {"role": "assistant", "content": reply}, *ex.message_dicts()]
        jobs.append((messages, GenerationConfig(temperature=0.0, max_new_tokens=768)))
    done = _generate_all(engine, jobs)
    calls = [c.answer for c in done if tool_format.parse_tool_calls(c.answer)[1]]
    right = sum(grade(ex, c.answer)[1] for ex, c in zip(problems, done, strict=True))
    return {"n": len(problems), "right": right, "tool_calls": len(calls), "example_call": calls[0][:160] if calls
            else None}


def run_extras(engine: Any, progress: bool = False, constrain: bool = True) -> dict[str, Any]:
    """All the checks above (``constrain``: the agents' calls follow the tools' grammar, see :func:`run_agent`)."""
    return {"article": article_check(engine), "agents": agent_check(engine, constrain=constrain),
            "budget": budget_check(engine), "follow_ups": follow_up_check(engine)}


def format_extras(extras: dict[str, Any]) -> str:
    """The checks as Markdown tables."""
    lines = ["| the article's problem, as worded | greedy | right at temperature 0.6 |", "|---|---|---:|"]
    for row in extras["article"]:
        q = row["question"].replace("\n", " ")
        lines.append(f"| {q} | {'right' if row['greedy'] else 'wrong: ' + str(row['greedy_answer'])} | "
                     f"{row['sampled_right']}/{row['seeds']} |")
    agents = extras["agents"]
    lines += ["", f"README agent `(3 + 4) * 5`: calls {agents['readme']['calls']}, answer "
                  f"{agents['readme']['answer']!r} ({'right' if agents['readme']['right'] else 'wrong'})",
              f"held-out agent chains (unseen tool names): {agents['heldout']['right']}/{agents['heldout']['n']} right",
              "", "| reasoning budget | closed at | clean answers | right answers |", "|---:|---|---:|---:|"]
    for row in extras["budget"]:
        lines.append(f"| {row['budget']} | {'the cap' if row['mode'] == 'token' else 'the end of the line'} | "
                     f"{row['clean']}/{row['n']} | {row['right']}/{row['n']} |")
    if "follow_ups" in extras:  # (reports written before the check existed lack it)
        follow = extras["follow_ups"]
        lines += ["", f"follow-up questions without tools: {follow['right']}/{follow['n']} right, "
                      f"{follow['tool_calls']} with a tool call"]
    return "\n".join(lines)
