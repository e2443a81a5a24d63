"""Second-edition algebra families: ``quadratic`` (rational roots, by factoring, the formula as a check) and
``system`` (two or three quantities tied by percentage relations and a total, every quantity asked, solved
as the Phi-4-mini-flash-reasoning article's sample answer does: define a variable, express the others in
it, add, divide, give every quantity, verify each condition).

Answers with several values box each one: ``x = \\boxed{1/2} or x = \\boxed{-3}``,
``Marketing = \\boxed{60}, Sales = \\boxed{75}, Engineering = \\boxed{45}``.
"""

from __future__ import annotations

import math
import random

from .arith import MAX_PARTS
from .steps import PERCENTS, Made, column, reduce_fraction

# ----------------------------------------------------------------------------------------------------
# Quadratics: a x² + b x + c = 0 with rational roots, by the a×c method.
# ----------------------------------------------------------------------------------------------------

MAX_AC = 72  # |a×c| stays small, so its factor pairs are few and known by heart
LEADING = ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (2, 2), (1, 4), (4, 1), (1, 5), (5, 1), (2, 3), (3, 2), (1, 6),
           (6, 1))
_QUADRATIC_QUESTIONS = (
    "Solve the quadratic equation: {e}", "Solve the quadratic equation {e}.", "Solve {e}.", "Solve {e}",
    "Solve for x: {e}", "Find the roots of {e}.", "What are the solutions of {e}?", "Factor and solve {e}.",
    "Solve by factoring: {e}", "Find x if {e}.",
)


def polynomial(a: int, b: int, c: int, square: str = "²", spaced: bool = True, minus: str = "-") -> str:
    """``2x² + 5x - 3`` (a coefficient of 1 is not written)."""
    terms = [f"{'' if a == 1 else '-' if a == -1 else a}x{square}"]
    for coef, var in ((b, "x"), (c, "")):
        if coef == 0:
            continue
        size = "" if abs(coef) == 1 and var else str(abs(coef))
        sign = "+" if coef > 0 else minus
        terms.append(f" {sign} {size}{var}" if spaced else f"{sign}{size}{var}")
    return "".join(terms)


def _root_text(num: int, a: int) -> str:
    """``x=-6/2=-3``, ``x=1/2``, ``x=-4/6=-2/3``, ``x=5``: the root num/a, reduced in one written step."""
    if a == 1:
        return f"x={num}"
    n, d = reduce_fraction(num, a)
    reduced = str(n) if d == 1 else f"{n}/{d}"
    return f"x={num}/{a}" if (n, d) == (num, a) else f"x={num}/{a}={reduced}"


def _factor_text(n: int, d: int) -> str:
    """The factor of the root n/d: ``(x+3)`` for -3, ``(2x-1)`` for 1/2."""
    head = "x" if d == 1 else f"{d}x"
    return f"({head}{'-' if n > 0 else '+'}{abs(n)})"


def quadratic_steps(a: int, b: int, c: int) -> tuple[list[str], list[str]]:
    """The worked solution (lines) and the two roots as reduced fractions, in the order found."""
    ac = a * c
    size = abs(ac)
    lines = [f"{polynomial(a, b, c, spaced=False)}=0: a={a}, b={b}, c={c}"]
    if a == 1:
        lines.append(f"a×c=1×({c})={ac}" if c < 0 else f"a×c=1×{c}={ac}")
    elif abs(c) < 10:
        lines.append(f"a×c={a}×({c})={ac}" if c < 0 else f"a×c={a}×{c}={ac}")
    else:
        work, _ = column(abs(c), "×", a)
        lines += [*work, f"a×c={a}×({c})={ac}" if c < 0 else f"a×c={a}×{c}={ac}"]
    lines.append(f"Find two numbers with product {ac} and sum {b}.")
    sign = "positive" if b > 0 else "negative"
    if ac < 0:
        lines.append(f"The product is negative: one number is negative, their sizes differ by {abs(b)}.")
    else:
        lines.append(f"The product is positive and the sum is {sign}: both are {sign}, their sizes add to {abs(b)}.")
    pair = None
    for d in range(1, math.isqrt(size) + 1):
        if size % d:
            continue
        e = size // d
        got = e - d if ac < 0 else d + e
        hit = got == abs(b)
        lines.append(f"{d}×{e}: {e}-{d}={got} {'yes' if hit else 'no'}" if ac < 0 else
                     f"{d}×{e}: {d}+{e}={got} {'yes' if hit else 'no'}")
        if hit:
            pair = (d, e)
            break
    if pair is None:
        raise ValueError(f"{a}x²+{b}x+{c} does not factor over the integers")
    d, e = pair
    s = 1 if b > 0 else -1
    u, v = (s * e, -s * d) if ac < 0 else (s * d, s * e)
    lines.append(f"The numbers: {u} and {v}")
    roots = [reduce_fraction(-u, a), reduce_fraction(-v, a)]
    lines.append(f"Roots: {_root_text(-u, a)} and {_root_text(-v, a)}")
    k = a // (roots[0][1] * roots[1][1])
    lines.append(f"Factored: {'' if k == 1 else k}{_factor_text(*roots[0])}{_factor_text(*roots[1])}=0")
    disc = b * b - 4 * ac
    root = math.isqrt(disc)
    lines.append(f"Check with the formula: b²-4ac={b * b}{'+' if ac < 0 else '-'}{4 * size}={disc}={root}²")
    checks = []
    for op, num in (("+", -b + root), ("-", -b - root)):
        n, den = reduce_fraction(num, 2 * a)
        value = str(n) if den == 1 else f"{n}/{den}"
        checks.append(f"x=({-b}{op}{root})/{2 * a}={value}" if (n, den) == (num, 2 * a) else
                      f"x=({-b}{op}{root})/{2 * a}={num}/{2 * a}={value}")
    lines.append(", ".join(checks) + " yes")
    return lines, [str(n) if den == 1 else f"{n}/{den}" for n, den in roots]


def quadratic_from_roots(rng: random.Random) -> tuple[int, int, int]:
    """Coefficients (m x + n)(k x + l) expanded, with distinct rational roots, b and c not zero, |a c| <= MAX_AC."""
    while True:
        m, k = rng.choice(LEADING)
        n, l_ = rng.choice([i for i in range(-9, 10) if i]), rng.choice([i for i in range(-9, 10) if i])
        a, b, c = m * k, m * l_ + n * k, n * l_
        if b and n * k != l_ * m and abs(a * c) <= MAX_AC:
            return a, b, c


def _make_quadratic(rng: random.Random) -> Made:
    a, b, c = quadratic_from_roots(rng)
    return make_quadratic(a, b, c, rng)


def make_quadratic(a: int, b: int, c: int, rng: random.Random, question: str | None = None) -> Made:
    """The quadratic problem for given coefficients (its question drawn from ``rng`` unless given)."""
    square = rng.choice(["²", "^2"])
    spaced = rng.random() < 0.85
    minus = "−" if rng.random() < 0.1 else "-"
    if question is None:
        equation = polynomial(a, b, c, square, spaced, minus) + (" = 0" if spaced else "=0")
        question = rng.choice(_QUADRATIC_QUESTIONS).format(e=equation)
    lines, roots = quadratic_steps(a, b, c)
    answer = f"x = \\boxed{{{roots[0]}}} or x = \\boxed{{{roots[1]}}}"
    return Made(f"quadratic:{a},{b},{c}", question, "\n".join(lines), answer, "; ".join(roots))


# ----------------------------------------------------------------------------------------------------
# Systems: two or three quantities from percentage relations and a total; every quantity asked.
# ----------------------------------------------------------------------------------------------------

DEPARTMENTS = ("Sales", "Marketing", "Engineering", "Support", "Finance", "Research", "Design", "Legal", "Operations",
               "Training")
PEOPLE = ("Anna", "Ben", "Carl", "Mia", "Leo", "Zoe", "Omar", "Priya", "Yuki", "Sara", "Tom", "Ines")
# (what is counted, who holds it, how the holders are called together, one of them)
SYSTEM_GROUPS = (
    ("employees", DEPARTMENTS, "departments", "department"),
    ("books", PEOPLE, "friends", "friend"),
    ("apples", PEOPLE, "children", "child"),
    ("students", ("Class A", "Class B", "Class C", "Class D"), "classes", "class"),
    ("points", ("Team Red", "Team Blue", "Team Green", "Team Gold"), "teams", "team"),
    ("members", ("Chess Club", "Art Club", "Music Club", "Drama Club"), "clubs", "club"),
)


def _relation(pct: int, more: bool, base: int) -> tuple[int, int]:
    """(p% of base, base ± that): both integers because base is a multiple of the percentage's denominator."""
    n, d = PERCENTS[pct]
    part = base * n // d
    return part, base + part if more else base - part


def _times_line(name: str, parts: int, unit: int) -> list[str]:
    """``Marketing: 4×15=60`` after the digit-by-digit product (parts below 10; 10 to 12 are recalled)."""
    if 1 < parts < 10:
        return [*column(unit, "×", parts)[0], f"{name}: {parts}×{unit}={parts * unit}"]
    return [f"{name}: {parts}×{unit}={parts * unit}"]


def system_problem(names: tuple[str, ...], relations: tuple[tuple[int, bool], ...], unit: int, noun: str,
                   together: str, one: str, style: int) -> Made | None:
    """The problem "names[1] has p1% more than names[0], names[2] has p2% fewer than names[1], total T".

    ``names[0]`` is the quantity the others are defined from; ``relations`` has one (p, more) per later name,
    each relative to the name before it. Returns None when the parts do not stay small.
    """
    parts = [PERCENTS[relations[0][0]][1]]
    while True:  # the smallest whole number of parts for the first quantity that keeps every relation exact
        chain = [parts[0]]
        ok = True
        for pct, more in relations:
            n, d = PERCENTS[pct]
            if chain[-1] * n % d:
                ok = False
                break
            chain.append(_relation(pct, more, chain[-1])[1])
        if ok:
            parts = chain
            break
        parts = [parts[0] + PERCENTS[relations[0][0]][1]]
        if parts[0] > MAX_PARTS:
            return None
    total_parts = sum(parts)
    if total_parts > MAX_PARTS or min(parts) <= 0:
        return None
    total = total_parts * unit
    values = [p * unit for p in parts]
    rels = [("more" if more else "fewer", pct) for pct, more in relations]
    question = _system_question(names, rels, total, noun, together, one, style)
    lines = [f"Let {names[0]} = {parts[0]}u."]
    for i, (pct, more) in enumerate(relations):
        delta, _ = _relation(pct, more, parts[i])
        word = "more" if more else "fewer"
        lines.append(f"{names[i + 1]}: {pct}% {word} than {names[i]}: {pct}% of {parts[i]} is {delta}, so "
                     f"{parts[i]}u{'+' if more else '-'}{delta}u={parts[i + 1]}u")
    lines.append(f"Total: {'+'.join(f'{p}u' for p in parts)}={total_parts}u={total}")
    work, _ = column(total, "/", total_parts)
    lines += [*work, f"u={unit}"]
    for name, p in zip(names, parts, strict=True):
        lines += _times_line(name, p, unit)
    lines.append(f"Check: {'+'.join(map(str, values))}={total} yes")
    for i, (pct, more) in enumerate(relations):
        delta, _ = _relation(pct, more, values[i])
        lines.append(f"Check: {pct}% of {values[i]} is {delta}, {values[i]}{'+' if more else '-'}{delta}="
                     f"{values[i + 1]} yes")
    answer = ", ".join(f"{name} = \\boxed{{{v}}}" for name, v in zip(names, values, strict=True))
    key_rel = ",".join(f"{pct},{'more' if more else 'fewer'}" for pct, more in relations)
    split = f"rel{len(names)}:{key_rel},{total}"
    value = "; ".join(f"{name}={v}" for name, v in zip(names, values, strict=True))
    return Made(f"system:{key_rel},{total},{style}", question, "\n".join(lines), answer, value, split=split)


def _system_question(names: tuple[str, ...], rels: list[tuple[str, int]], total: int, noun: str, together: str,
                     one: str, style: int) -> str:
    """The question in one of several wordings (the web chat's card and the article's among them)."""
    sentences = [f"{names[i + 1]} has {pct}% {word} {noun} than {names[i]}" for i, (word, pct) in enumerate(rels)]
    if len(names) == 2:
        return [
            f"{sentences[0]}. Together they have {total} {noun}. How many {noun} does each have?",
            f"{sentences[0]}. Together they have {total} {noun}. How many {noun} do {names[1]} and {names[0]} "
            "each have?",
            f"{sentences[0]}. If the two {together} have {total} {noun} in total, how many {noun} does each {one} "
            "have?",
        ][style % 3]
    listed = [names[1], names[0], names[2]]
    if style % 4 == 0:  # the web chat's card
        return (f"{sentences[0]}, and {sentences[1]}. If the three {together} have {total} {noun} in total, "
                f"how many {noun} does each {one} have?")
    if style % 4 == 1:  # the article's
        if noun == "employees":
            head = f"A company has 3 departments: {listed[0]}, {listed[1]}, and {listed[2]}."
            tail = f"The total number of employees across all departments is {total}"
            ask = "How many employees are in each department?"
        else:
            head = f"There are 3 {together}: {listed[0]}, {listed[1]}, and {listed[2]}."
            tail = f"The total number of {noun} across all {together} is {total}"
            ask = f"How many {noun} does each {one} have?"
        return f"{head}\n- {sentences[0]}\n- {sentences[1]}\n- {tail}\n\n{ask}"
    if style % 4 == 2:
        return f"{sentences[0]}. {sentences[1]}. Together they have {total} {noun}. How many {noun} does each have?"
    return (f"{sentences[0]}. {sentences[1]}. The three {together} have {total} {noun} in total. "
            f"How many {noun} does each {one} have?")


def _make_system(rng: random.Random) -> Made:
    noun, pool, together, one = rng.choice(SYSTEM_GROUPS)
    count = 3 if rng.random() < 0.6 else 2
    while True:  # redraw until the parts stay small
        names = tuple(rng.sample(pool, count))
        relations = tuple((rng.choice(list(PERCENTS)), rng.random() < (0.7 if i == 0 else 0.35))
                          for i in range(count - 1))
        made = system_problem(names, relations, rng.randint(2, 30), noun, together, one,
                              rng.randrange(4 if count == 3 else 3))
        if made is not None:
            return made
