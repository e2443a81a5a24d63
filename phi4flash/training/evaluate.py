"""Evaluation of a checkpoint on held-out chats (greedy decoding), and the checks of the issue's targets.

    python -m phi4flash.training.evaluate [DIR] [--n N] [--seed S] [--extras]

DIR is a checkpoint folder, a hub id or "embedded" (the default). Problems come from the held-out side of
data.py, which training never sees. Grading:

- math families: the boxed values of the answer (one, or each labelled one for answers with several values)
  against the true value; the true value is computed twice, by the generator and by the independent solver
  (:mod:`.solver`), and the two must agree;
- ``tool``: the answer must hold exactly one valid call, with the right tool name and arguments (tool names
  never seen in training);
- ``notool``: held-out math problems asked with tools that do not fit: graded as math, and no call;
- ``offdomain``: the honest reply (held-out generated prompts and hand-written ones no template produces).

``--extras`` adds the article's two problems (greedy and ten seeds at temperature 0.6, in every wording), the
README's agent and held-out agent chains run through their tools, and the reasoning budget measured with both
ways of closing the reasoning (see :mod:`.checks`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .. import tools as tool_format
from ..cli import HelpFormatter
from . import data as data_mod
from . import offdomain, toolchat
from .solver import canonical, solve

EVAL_FAMILIES = (*data_mod.MATH_FAMILIES, "tool", "notool", "offdomain")


@dataclass
class Graded:
    """One evaluated chat."""

    family: str
    question: str
    expected: str
    got: str | None
    correct: bool
    tokens: int
    finish_reason: str
    output: str


def normalise(answer: str | None) -> str | None:
    """Canonical form of one boxed answer: no spaces, thousands separators, ``x=`` prefix or percent sign."""
    if answer is None:
        return None
    text = answer.replace(" ", "").replace(",", "").replace("$", "").replace("\\%", "").replace("%", "")
    text = text.replace("−", "-").replace("\\dfrac", "\\frac")
    frac = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}", text)
    if frac:
        text = f"{frac.group(1)}{frac.group(2)}/{frac.group(3)}".replace("--", "")
    return re.sub(r"^[a-zA-Z]=", "", text)


def answer_items(answer: str) -> str:
    """The boxed values of an answer as a value string (``"Sales=75; Marketing=60"``, ``"1/2; -3"``)."""
    items = []
    for label, value in data_mod.extract_all_boxed(answer):
        value = normalise(value) or ""
        items.append(f"{label}={value}" if label else value)
    return "; ".join(items)


def grade(example: data_mod.Example, answer: str) -> tuple[str | None, bool]:
    """(what the answer gave, whether it is right) for ``example``'s family."""
    if example.family == "offdomain":
        called = tool_format.TOOL_CALL_OPEN in answer
        return answer[:60], offdomain.HONEST_MARK in answer and "\\boxed" not in answer and not called
    if example.family == "tool":
        _, calls, invalid = tool_format.parse_tool_calls(answer, allow_bare_json=False)
        if len(calls) != 1 or invalid:
            return answer[:80], False
        got = toolchat.expected_call(calls[0].name, calls[0].arguments)
        return got, got == example.value
    if tool_format.TOOL_CALL_OPEN in answer:
        return answer[:80], False
    if ";" in example.value:
        got = answer_items(answer)
        return got, bool(got) and canonical(got) == canonical(example.value)
    got = data_mod.extract_boxed(answer)
    return got, normalise(got) == normalise(example.value)


def heldout_problems(n_per_family: int, seed: int = 0, families: Sequence[str] | None = None
                     ) -> list[data_mod.Example]:
    """``n_per_family`` distinct held-out chats of each family (fewer where a family has fewer keys)."""
    out: list[data_mod.Example] = []
    for family in families or EVAL_FAMILIES:
        if family == "offdomain":
            out += _offdomain_problems(n_per_family, seed)
            continue
        if family == "notool":
            out += _notool_problems(n_per_family, seed)
            continue
        seen: set[str] = set()
        for ex in data_mod.generate(n_per_family * 20, seed=seed, split="heldout", families=[family]):
            if ex.key in seen:
                continue
            seen.add(ex.key)
            if family in data_mod.MATH_FAMILIES:
                _check_truth(ex)
            out.append(ex)
            if len(seen) == n_per_family:
                break
    return out


def _check_truth(ex: data_mod.Example) -> None:
    truth = solve(ex.question)
    if truth is None or canonical("; ".join(truth)) != canonical(ex.value):
        raise AssertionError(f"generator and independent solver disagree on {ex.question!r}: {ex.value} vs {truth}")


def _offdomain_problems(n: int, seed: int) -> list[data_mod.Example]:
    """Half hand-written prompts no template produces, half held-out generated ones."""
    unseen = list(offdomain.UNSEEN_PROMPTS[: n // 2])
    rng = random.Random(f"offdomain-eval:{seed}")
    generated: list[str] = []
    while len(generated) < n - len(unseen):
        _, prompt = offdomain.draw_prompt(rng)
        if data_mod.is_held_out(f"offdomain:{prompt}") and prompt not in generated:
            generated.append(prompt)
    return [data_mod.Example("offdomain", f"offdomain:{p}", ({"role": "user", "content": p},), "", "", "")
            for p in unseen + generated]


def _notool_problems(n: int, seed: int) -> list[data_mod.Example]:
    """Held-out math problems asked with tools (held-out names) that do not fit them."""
    rng = random.Random(f"notool-eval:{seed}")
    problems = data_mod.generate(n, seed=seed + 1, split="heldout")
    out = []
    for ex in problems:
        tools = toolchat.unrelated_tools(rng, True, {"+", "-", "*", "/"})
        system = toolchat.system_message(tools, rng)
        out.append(data_mod.Example("notool", ex.key, (system, *ex.messages), ex.reasoning, ex.answer, ex.value,
                                    ex.split))
    return out


def _config_for(example: data_mod.Example, config: Any, tokenizer: Any) -> Any:
    """``config``, with a fresh tool-call constraint (tool_choice "auto") when the chat carries tools."""
    tools = next((m["tools"] for m in example.messages if m["role"] == "system" and m.get("tools")), None)
    if tools is None:
        return config
    from ..constrained import optional_calls

    return dataclasses.replace(config, constraint=optional_calls(tokenizer, json.loads(tools),
                                                                 max_new_tokens=config.max_new_tokens))


def evaluate(source: str = "embedded", n_per_family: int = 50, seed: int = 0, *, batch: int = 8,
             max_new_tokens: int = 768, families: Sequence[str] | None = None, engine: Any = None,
             progress: bool = False, quantize: str | None = None, constrain_tools: bool = True) -> dict[str, Any]:
    """Generate greedily for the held-out chats and grade them.

    Args:
        source: Checkpoint for ``phi4flash.load`` (ignored when ``engine`` is given).
        n_per_family: Chats per family.
        seed: Which held-out chats.
        batch: Chats decoded together.
        max_new_tokens: Generation limit per chat.
        families: Families to evaluate (default: :data:`EVAL_FAMILIES`).
        engine: An already loaded engine to use.
        progress: Show a tqdm progress bar.
        quantize: weight-only quantization of the loaded model ("int8", "int4", ...; ignored with ``engine``).
        constrain_tools: chats that carry tools follow the tools' grammar (tool_choice "auto"), as the server and
            ``ChatPhi4Flash`` run them; False: free generation.

    Returns:
        ``{"families": {family: {"n", "correct", "accuracy"}}, "overall": {...}, "tokens_per_s": float,
        "decode_tokens_per_s": float, "seconds": float, "results": [Graded, ...]}``; "overall" counts the
        math families only (tools and off-domain have their own rows).
    """
    from .. import GenerationConfig

    own_engine = engine is None
    if engine is None:
        from .. import load

        engine = load(source, max_batch=batch, quantize=quantize)
    problems = heldout_problems(n_per_family, seed, families)
    config = GenerationConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    results: list[Graded] = []
    decode_rates: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(problems), desc="eval", unit="chat", dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for start in range(0, len(problems), batch):
            chunk = problems[start:start + batch]
            configs = [_config_for(ex, config, engine.tokenizer) if constrain_tools else config for ex in chunk]
            completions = engine.generate_batch([ex.message_dicts() for ex in chunk], configs)
            for ex, c in zip(chunk, completions, strict=True):
                output = f"{c.reasoning}\n</think>\n{c.answer}" if c.reasoning else c.answer
                got, ok = grade(ex, c.answer)
                results.append(Graded(ex.family, ex.question, ex.value, got, ok, c.usage.completion_tokens,
                                      c.finish_reason, output))
                if c.metrics.decode_tokens_per_s:
                    decode_rates.append(c.metrics.decode_tokens_per_s)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        if own_engine:
            engine.close()
    seconds = time.perf_counter() - started
    per_family: dict[str, dict[str, Any]] = {}
    for family in dict.fromkeys(r.family for r in results):
        rows = [r for r in results if r.family == family]
        correct = sum(r.correct for r in rows)
        per_family[family] = {"n": len(rows), "correct": correct, "accuracy": correct / len(rows)}
    math_rows = [r for r in results if r.family in data_mod.MATH_FAMILIES]
    total = sum(r.correct for r in math_rows)
    tokens = sum(r.tokens for r in results)
    return {
        "families": per_family,
        "overall": {"n": len(math_rows), "correct": total, "accuracy": total / max(1, len(math_rows))},
        "tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "decode_tokens_per_s": sum(decode_rates) / len(decode_rates) if decode_rates else 0.0,
        "seconds": seconds,
        "batch": batch,
        "results": results,
    }


def format_report(report: dict[str, Any]) -> str:
    """The accuracy table as Markdown."""
    lines = ["| family | n | correct | accuracy |", "|---|---:|---:|---:|"]
    families = report["families"]
    for family in [f for f in families if f in data_mod.MATH_FAMILIES]:
        row = families[family]
        lines.append(f"| {family} | {row['n']} | {row['correct']} | {row['accuracy']:.1%} |")
    o = report["overall"]
    lines.append(f"| **math overall** | {o['n']} | {o['correct']} | **{o['accuracy']:.1%}** |")
    names = {"tool": "tool calls (unseen tool names)", "notool": "no tool fits: answered directly",
             "offdomain": "off-domain: honest reply"}
    for family in [f for f in families if f not in data_mod.MATH_FAMILIES]:
        row = families[family]
        lines.append(f"| {names.get(family, family)} | {row['n']} | {row['correct']} | {row['accuracy']:.1%} |")
    lines.append("")
    lines.append(f"{report['tokens']} tokens in {report['seconds']:.1f} s: {report['tokens_per_s']:.0f} tokens/s "
                 f"in total (batches of {report['batch']}), {report['decode_tokens_per_s']:.0f} tokens/s per "
                 "sequence (decode)")
    return "\n".join(lines)


def build_parser(prog: str = "phi4flash eval") -> argparse.ArgumentParser:
    """The ``phi4flash eval`` options (also ``python -m phi4flash.training.evaluate``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("source", nargs="?", default="embedded", help="checkpoint folder, hub id or 'embedded'")
    parser.add_argument("--n", type=int, default=50, help="held-out chats per family")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
    parser.add_argument("--batch", type=int, default=8, help="chats decoded together")
    parser.add_argument("--max-new-tokens", type=int, default=768, help="most new tokens per answer")
    parser.add_argument("--families", nargs="*", default=None, choices=EVAL_FAMILIES,
                        help="families to evaluate (none given: all)")
    parser.add_argument("--errors", type=int, default=3, help="wrong answers to show per family")
    parser.add_argument("--extras", action="store_true",
                        help="also the article's problems, the agents and the reasoning budget")
    parser.add_argument("--free-tools", action="store_true",
                        help="generate tool calls without their grammar (default: as the server and ChatPhi4Flash "
                             "run them, tool_choice 'auto')")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``phi4flash eval [DIR] [--n N] [--seed S]``."""
    parser = build_parser()
    parser.add_argument("--quantize", default=None,
                        help="weight-only quantization: int8, int4 or int4-g<group size> (default: none)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    from .. import load

    engine = load(args.source, max_batch=args.batch, quantize=args.quantize)
    try:
        report = evaluate(args.source, args.n, args.seed, batch=args.batch, max_new_tokens=args.max_new_tokens,
                          families=args.families, engine=engine, progress=True, constrain_tools=not args.free_tools)
        print(format_report(report))  # noqa: T201 (command-line output)
        if args.errors:
            for family in report["families"]:
                wrong = [r for r in report["results"] if r.family == family and not r.correct][: args.errors]
                for r in wrong:
                    print(f"\n[{family}] {r.question}\n  expected {r.expected}, got {r.got} ({r.finish_reason})\n  "  # noqa: T201
                          + r.output.replace("\n", "\n  "))
        extras = None
        if args.extras:
            from .checks import format_extras, run_extras

            extras = run_extras(engine, progress=True, constrain=not args.free_tools)
            print("\n" + format_extras(extras))  # noqa: T201
    finally:
        engine.close()
    if args.json:
        out = {k: v for k, v in report.items() if k != "results"}
        out["results"] = [asdict(r) for r in report["results"]]
        if extras is not None:
            out["extras"] = extras
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
