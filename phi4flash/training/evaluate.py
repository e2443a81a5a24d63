"""Accuracy of a checkpoint on the held-out synthetic math problems (greedy decoding).

    python -m phi4flash.training.evaluate [DIR] [--n N] [--seed S]

DIR is a checkpoint folder, a hub id or "embedded" (the default). Problems come from the held-out
split of data.py, which training never sees. Each answer is the last ``\\boxed{...}`` of the model's
output, compared with the true value; the true value is computed twice, by the generator and by
solving the question text independently (data.exact_value), and the two must agree.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ..cli import HelpFormatter
from . import data as data_mod


@dataclass
class Graded:
    """One evaluated problem."""

    family: str
    question: str
    expected: str
    got: str | None
    correct: bool
    tokens: int
    finish_reason: str
    output: str


def normalise(answer: str | None) -> str | None:
    """Canonical form of a boxed answer: no spaces, no thousands separators, no ``x=`` prefix."""
    if answer is None:
        return None
    text = answer.replace(" ", "").replace(",", "").replace("$", "")
    text = re.sub(r"^[a-zA-Z]=", "", text)
    return text


def heldout_problems(n_per_family: int, seed: int = 0, families: Sequence[str] | None = None
                     ) -> list[data_mod.Example]:
    """``n_per_family`` distinct held-out problems of each family (fewer where a family has fewer keys)."""
    fams = list(families or data_mod.MATH_FAMILIES)
    out: list[data_mod.Example] = []
    for family in fams:
        seen: set[str] = set()
        draws = data_mod.generate(n_per_family * 20, seed=seed, split="heldout", families=[family])
        for ex in draws:
            if ex.key in seen:
                continue
            seen.add(ex.key)
            truth = data_mod.exact_value(ex.question)
            if truth is None or truth != Fraction(int(ex.value)):
                raise AssertionError(f"generator and independent solver disagree on {ex.question!r}: "
                                     f"{ex.value} vs {truth}")
            out.append(ex)
            if len(seen) == n_per_family:
                break
    return out


def evaluate(source: str = "embedded", n_per_family: int = 50, seed: int = 0, *, batch: int = 8,
             max_new_tokens: int = 256, families: Sequence[str] | None = None, engine: Any = None,
             progress: bool = False, quantize: str | None = None) -> dict[str, Any]:
    """Generate greedily for the held-out problems and grade the boxed answers.

    Args:
        source: Checkpoint for ``phi4flash.load`` (ignored when ``engine`` is given).
        n_per_family: Problems per family.
        seed: Which held-out problems.
        batch: Problems decoded together.
        max_new_tokens: Generation limit per problem.
        families: Families to evaluate (default: all math families).
        engine: An already loaded engine to use.
        progress: Show a tqdm progress bar.
        quantize: weight-only quantization of the loaded model ("int8", "int4", ...; ignored with ``engine``).

    Returns:
        ``{"families": {family: {"n", "correct", "accuracy"}}, "overall": {...}, "tokens_per_s": float,
        "decode_tokens_per_s": float, "seconds": float, "results": [Graded, ...]}``.
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

        bar = tqdm(total=len(problems), desc="eval", unit="problem", dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for start in range(0, len(problems), batch):
            chunk = problems[start:start + batch]
            completions = engine.generate_batch([ex.message_dicts() for ex in chunk], config)
            for ex, c in zip(chunk, completions, strict=True):
                output = f"{c.reasoning}\n</think>\n{c.answer}" if c.reasoning else c.answer
                got = data_mod.extract_boxed(c.answer) or data_mod.extract_boxed(output)
                ok = normalise(got) == normalise(ex.value)
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
    total = sum(r.correct for r in results)
    tokens = sum(r.tokens for r in results)
    return {
        "families": per_family,
        "overall": {"n": len(results), "correct": total, "accuracy": total / max(1, len(results))},
        "tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "decode_tokens_per_s": sum(decode_rates) / len(decode_rates) if decode_rates else 0.0,
        "seconds": seconds,
        "batch": batch,
        "results": results,
    }


def format_report(report: dict[str, Any]) -> str:
    """The accuracy table as Markdown-style text."""
    lines = ["| family | n | correct | accuracy |", "|---|---:|---:|---:|"]
    for family, row in report["families"].items():
        lines.append(f"| {family} | {row['n']} | {row['correct']} | {row['accuracy']:.1%} |")
    o = report["overall"]
    lines.append(f"| **overall** | {o['n']} | {o['correct']} | **{o['accuracy']:.1%}** |")
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
    parser.add_argument("--n", type=int, default=50, help="held-out problems per family")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out problem draw")
    parser.add_argument("--batch", type=int, default=8, help="problems decoded together")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most new tokens per answer")
    parser.add_argument("--families", nargs="*", default=None, choices=data_mod.MATH_FAMILIES,
                        help="problem families to evaluate (none given: all)")
    parser.add_argument("--errors", type=int, default=3, help="wrong answers to show per family")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``phi4flash eval [DIR] [--n N] [--seed S]``."""
    parser = build_parser()
    parser.add_argument("--quantize", default=None,
                        help="weight-only quantization: int8, int4 or int4-g<group size> (default: none)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    report = evaluate(args.source, args.n, args.seed, batch=args.batch, max_new_tokens=args.max_new_tokens,
                      families=args.families, progress=True, quantize=args.quantize)
    print(format_report(report))  # noqa: T201 (command-line output)
    if args.errors:
        for family in report["families"]:
            wrong = [r for r in report["results"] if r.family == family and not r.correct][: args.errors]
            for r in wrong:
                print(f"\n[{family}] {r.question}\n  expected {r.expected}, got {r.got} ({r.finish_reason})\n  "  # noqa: T201
                      + r.output.replace("\n", "\n  "))
    if args.json:
        data = {k: v for k, v in report.items() if k != "results"}
        data["results"] = [r.__dict__ for r in report["results"]]
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
