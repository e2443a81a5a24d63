"""An independent solver for the generated questions: it reads only the question text, shares no code with
the generators, and gives the answer in the canonical form of :attr:`~.data.Example.value`.

The evaluator checks every held-out problem's stored answer against it, and the tests check every training
problem, so a template that says one thing and computes another cannot slip through.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_NAME = r"([A-Z][a-z]*(?: [A-Z][a-z]*)?)"


def _text(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def canonical(value: str) -> tuple[str, ...]:
    """The items of an answer value (``"a; b"``), each normalised, in sorted order (so order does not matter)."""
    items = []
    for item in value.split(";"):
        item = item.strip().replace(" ", "").replace("\\%", "").replace("%", "").replace("−", "-")
        label, _, number = item.rpartition("=")
        items.append(f"{label}={number}" if label and not label.lower() == "x" else number)
    return tuple(sorted(items))


def exact_value(question: str) -> Fraction | None:
    """The single value that answers ``question`` (None when it has several or cannot be parsed)."""
    items = solve(question)
    if items is None or len(items) != 1 or "=" in items[0]:
        return None
    return Fraction(items[0])


def solve(question: str) -> list[str] | None:
    """The answer items of ``question`` (``["36"]``, ``["1/2", "-3"]``, ``["Marketing=60", ...]``), or None."""
    q = question.replace("−", "-").replace("²", "^2")
    for solver in (_quadratic, _system, _ratio_split, _ratio_scale, _fraction, _what_percent, _percent_change):
        found = solver(q)
        if found is not None:
            return found
    value = _first_edition(q)
    return None if value is None else [_text(value)]


def _quadratic(q: str) -> list[str] | None:
    m = re.search(r"(\d*)x\^2\s*(?:([-+])\s*(\d*)x)?\s*(?:([-+])\s*(\d+))?\s*=\s*0", q)
    if not m:
        return None
    a = int(m.group(1) or 1)
    b = (int(m.group(3) or 1) * (-1 if m.group(2) == "-" else 1)) if m.group(2) else 0
    c = (int(m.group(5)) * (-1 if m.group(4) == "-" else 1)) if m.group(4) else 0
    disc = b * b - 4 * a * c
    root = math.isqrt(disc) if disc >= 0 else -1
    if root * root != disc:
        return None
    return sorted({_text(Fraction(-b + root, 2 * a)), _text(Fraction(-b - root, 2 * a))})


def _relations(q: str) -> list[tuple[str, int, str, str]]:
    return [(name, int(p), rel, other) for name, p, rel, other in
            re.findall(_NAME + r" has (\d+)% (more|fewer) \w+ than " + _NAME, q)]


def _system(q: str) -> list[str] | None:
    if "each" not in q or " ratio " in q:
        return None
    rel = _relations(q)
    total = re.search(r"(\d+) \w+ in total|Together they have (\d+)|is (\d+)\s*$", q, re.M)
    if not rel or not total:
        return None
    t = int(next(g for g in total.groups() if g))
    names = {r[0] for r in rel} | {r[3] for r in rel}
    roots = [n for n in names if n not in {r[0] for r in rel}]
    if len(roots) != 1:
        return None
    values = {roots[0]: Fraction(1)}
    while len(values) < len(names):
        for name, p, direction, other in rel:
            if other in values and name not in values:
                values[name] = values[other] * (1 + Fraction(p, 100) * (1 if direction == "more" else -1))
    scale = Fraction(t) / sum(values.values())
    return sorted(f"{n}={_text(v * scale)}" for n, v in values.items())


def _ratio_split(q: str) -> list[str] | None:
    m = re.search(r"(\d+) (?:\w+ )?(?:between .* )?in the ratio (\d+(?::\d+)+)", q)
    if not m or "ratio of" in q:
        return None
    total, ratio = int(m.group(1)), [int(r) for r in m.group(2).split(":")]
    shares = [Fraction(total * r, sum(ratio)) for r in ratio]
    who = re.search(r"between (.*) in the ratio|^(.*) split \d+", q)
    if who:
        names = re.split(r", | and ", next(g for g in who.groups() if g))
        return sorted(f"{n}={_text(s)}" for n, s in zip(names, shares, strict=True))
    return sorted(_text(s) for s in shares)


def _ratio_scale(q: str) -> list[str] | None:
    m = re.search(r"ratio (?:of .+? to .+? is )?(\d+):(\d+)\. (?:There are|If there are) (\d+)", q)
    if not m:
        return None
    a, b, known = (int(g) for g in m.groups())
    return [_text(Fraction(known * b, a))]


def _fraction(q: str) -> list[str] | None:
    of = re.search(r"(\d+)/(\d+) of (\d+)", q)
    if of:
        n, d, x = (int(g) for g in of.groups())
        return [_text(Fraction(n * x, d))]
    s = re.search(r"(\d+)/(\d+) ([-+]) (\d+)/(\d+)|Add (\d+)/(\d+) and (\d+)/(\d+)", q)
    if not s:
        return None
    if s.group(1):
        a, b, op, c, d = s.group(1), s.group(2), s.group(3), s.group(4), s.group(5)
    else:
        a, b, op, c, d = s.group(6), s.group(7), "+", s.group(8), s.group(9)
    left, right = Fraction(int(a), int(b)), Fraction(int(c), int(d))
    return [_text(left + right if op == "+" else left - right)]


def _what_percent(q: str) -> list[str] | None:
    m = (re.search(r"What percent(?:age)? of (\d+) is (\d+)", q) or re.search(r"(\d+) is what percent of (\d+)", q)
         or re.search(r"Express (\d+) as a percentage of (\d+)", q))
    if not m:
        return None
    x, y = int(m.group(1)), int(m.group(2))
    part, whole = (y, x) if q.startswith("What percent") else (x, y)
    return [_text(Fraction(part * 100, whole))]


def _percent_change(q: str) -> list[str] | None:
    m = re.search(r"from (\d+) to (\d+)|does (\d+) (?:increase|decrease) to (\d+)", q)
    if not m or "percent" not in q:
        return None
    b, c = (int(g) for g in m.groups() if g)
    return [_text(abs(Fraction((c - b) * 100, b)))]


def _first_edition(question: str) -> Fraction | None:
    """The first edition's solver (single-valued questions of the old families and simple percentages)."""
    q = question.replace("×", "*").replace(" percent of", "% of")
    nums = [int(t) for t in re.findall(r"\d+", q)]
    m = re.search(r"(\d+)\s*([-+*])\s*(\d+)", q)
    if m and "x" not in q.replace("times", ""):
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return Fraction({"+": a + b, "-": a - b, "*": a * b}[op])
    for word, fn in (("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b),
                     ("Add", lambda a, b: a + b), ("Multiply", lambda a, b: a * b)):
        if word in q and len(nums) == 2:
            return Fraction(fn(nums[0], nums[1]))
    if q.startswith("Subtract") and len(nums) == 2:
        return Fraction(nums[1] - nums[0])
    eq = re.search(r"(\d*)x(?:\s*([-+])\s*(\d+))?\s*=\s*(\d+)", q)
    if eq:
        a = int(eq.group(1) or 1)
        b = int(eq.group(3) or 0) * (-1 if eq.group(2) == "-" else 1)
        return Fraction(int(eq.group(4)) - b, a)
    pcts = [int(t) for t in re.findall(r"(\d+)%", q)]
    if pcts and "has" not in q:
        p = Fraction(pcts[0], 100)
        x = int(re.findall(r"(\d+)(?![\d%])", q)[0])
        if "more" in q or "Increase" in q or "up by" in q:
            return x * (1 + p)
        if "less" in q or "Decrease" in q or "down by" in q:
            return x * (1 - p)
        return x * p
    return _solve_word(q)


def _solve_word(q: str) -> Fraction | None:
    """Solve the word problems by setting up the relations literally and trying every base size."""
    rel = re.findall(r"([A-Z][a-z]*(?: [A-Z])?) has (\d+)(%?) (more|fewer) \w+ than ([A-Z][a-z]*(?: [A-Z])?)", q)
    known = dict((name, Fraction(int(v))) for name, v in re.findall(r"([A-Z][a-z]*(?: [A-Z])?) has (\d+) \w+\.", q))
    ask = re.search(r"does ([A-Z][a-z]*(?: [A-Z])?) have\?", q)
    total = re.search(r"(?:have|They have) (\d+) \w+ in total|Together they have (\d+)", q)

    def resolve(values: dict[str, Fraction]) -> dict[str, Fraction]:
        changed = True
        while changed:
            changed = False
            for name, v, pct, direction, other in rel:
                if other in values and name not in values:
                    delta = values[other] * Fraction(int(v), 100) if pct else Fraction(int(v))
                    values[name] = values[other] + delta if direction == "more" else values[other] - delta
                    changed = True
        return values

    if "together" in q and known:
        values = resolve(dict(known))
        return sum(values.values(), Fraction(0))
    if known and ask:
        return resolve(dict(known)).get(ask.group(1))
    if total and ask:
        t = int(total.group(1) or total.group(2))
        # The relations are linear in the one quantity nobody is defined from; solve for it exactly.
        names = {r[0] for r in rel} | {r[4] for r in rel}
        roots = [n for n in names if n not in {r[0] for r in rel}]
        if len(roots) != 1:
            return None
        one = resolve({roots[0]: Fraction(1)})
        scale = Fraction(t) / sum(one.values(), Fraction(0))
        return one[ask.group(1)] * scale
    return None
