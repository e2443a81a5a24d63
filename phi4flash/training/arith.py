"""The first edition's problem families, unchanged in wording and reasoning: multi-digit ``addition`` and
``subtraction``, ``multiplication`` (2-digit by 1-digit), ``equation`` (one- and two-step linear),
``percentage`` (10, 20, 25, 30, 40, 50, 60 and 75%) and ``word`` problems (two or three quantities, one
of them asked). Numbers are chosen so that every answer is an integer; word problems keep "one part" a
division by at most 12 (:data:`MAX_PARTS`).
"""

from __future__ import annotations

import random

from .steps import PERCENTS, Made, column, percent_steps
from .steps import draw_digits as _digits


def _make_addition(rng: random.Random) -> Made:
    a, b = _digits(rng, 2, 4), _digits(rng, 1, 4)
    if rng.random() < 0.5:
        a, b = b, a
    question = rng.choice(
        ["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "Calculate {a} plus {b}.", "{a} + {b} = ?"]
    ).format(a=a, b=b)
    reasoning = "\n".join(column(a, "+", b)[0])
    return Made(f"addition:{a}+{b}", question, reasoning, f"{a} + {b} = \\boxed{{{a + b}}}", str(a + b))


def _make_subtraction(rng: random.Random) -> Made:
    a, b = _digits(rng, 2, 4), _digits(rng, 1, 4)
    if a < b:
        a, b = b, a
    question = rng.choice(
        ["What is {a} - {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.", "Calculate {a} minus {b}.",
         "{a} - {b} = ?"]
    ).format(a=a, b=b)
    reasoning = "\n".join(column(a, "-", b)[0])
    return Made(f"subtraction:{a}-{b}", question, reasoning, f"{a} - {b} = \\boxed{{{a - b}}}", str(a - b))


def _make_multiplication(rng: random.Random) -> Made:
    a, m = rng.randint(10, 99), rng.randint(2, 9)
    question = rng.choice(
        ["What is {a} × {m}?", "What is {a} * {m}?", "Compute {a} × {m}.", "Multiply {a} by {m}.",
         "Calculate {a} times {m}."]
    ).format(a=a, m=m)
    reasoning = "\n".join(column(a, "×", m)[0])
    return Made(f"multiplication:{a}*{m}", question, reasoning, f"{a} × {m} = \\boxed{{{a * m}}}", str(a * m))


def _lin(a: int, op: str, b: int) -> str:
    """``3x + 5``, ``x - 4``, ``7x`` in the spelling used by the questions."""
    head = "x" if a == 1 else f"{a}x"
    return head if b == 0 else f"{head} {op} {b}"


def _make_equation(rng: random.Random) -> Made:
    kind = rng.choice(["add", "sub", "mul", "two_add", "two_sub", "two_add", "two_sub"])
    x = rng.randint(1, 12) if kind in ("mul", "two_add", "two_sub") else rng.randint(1, 60)
    a = rng.randint(2, 9) if kind in ("mul", "two_add", "two_sub") else 1
    b = 0 if kind == "mul" else rng.randint(1, 30)
    op = "-" if kind in ("sub", "two_sub") else "+"
    if op == "-" and a * x - b < 1:
        b = rng.randint(0, a * x - 1) or 0
        if b == 0:
            op, kind = "+", kind.replace("sub", "add")
            b = rng.randint(1, 30)
    c = a * x + b if op == "+" else a * x - b
    lhs = _lin(a, op, b)
    question = rng.choice(["Solve {e}.", "Solve for x: {e}.", "Find x if {e}.", "What is x if {e}?"]).format(
        e=f"{lhs} = {c}"
    )
    ax = "x" if a == 1 else f"{a}x"
    steps = [f"{lhs.replace(' ', '')}={c}"]
    if b:
        # Both sides change by b; the sum or difference is worked digit by digit like the addition family.
        inverse = "-" if op == "+" else "+"
        steps.append(f"{'Subtract' if op == '+' else 'Add'} {b} on both sides: {ax}={c}{inverse}{b}")
        work, value = column(c, inverse, b)
        steps += [*work, f"{ax}={value}"]
    if a != 1:
        steps += [f"Divide by {a} on both sides: x={a * x}/{a}", *column(a * x, "/", a)[0], f"x={x}"]
    return Made(f"equation:{a},{op},{b},{c}", question, "\n".join(steps), f"x = \\boxed{{{x}}}", str(x))


def _make_percentage(rng: random.Random) -> Made:
    p = rng.choice(list(PERCENTS))
    n, d = PERCENTS[p]
    x = d * rng.randint(1, max(2, 120 // d))
    kind = rng.choice(["of", "more", "less"])
    if kind == "of":
        question = rng.choice(["What is {p}% of {x}?", "Compute {p}% of {x}.", "Find {p}% of {x}."])
    elif kind == "more":
        question = rng.choice(["What is {p}% more than {x}?", "Increase {x} by {p}%.",
                               "A price of {x} goes up by {p}%. What is the new price?"])
    else:
        question = rng.choice(["What is {p}% less than {x}?", "Decrease {x} by {p}%.",
                               "A price of {x} goes down by {p}%. What is the new price?"])
    lines, part = percent_steps(p, x)
    value = part if kind == "of" else x + part if kind == "more" else x - part
    if kind != "of":
        lines += column(x, "+" if kind == "more" else "-", part)[0]
    return Made(f"percentage:{kind},{p},{x}", question.format(p=p, x=x), "\n".join(lines), f"\\boxed{{{value}}}",
                str(value), split=f"pct:{p},{x}")


# Groups for word problems: (plural noun of what is counted, the three holders, how a question asks).
GROUPS: tuple[tuple[str, tuple[str, str, str]], ...] = (
    ("employees", ("Sales", "Marketing", "Engineering")),
    ("employees", ("Support", "Finance", "Research")),
    ("students", ("Class A", "Class B", "Class C")),
    ("books", ("Anna", "Ben", "Carl")),
    ("apples", ("Mia", "Leo", "Zoe")),
)


def _relation_parts(base: int, p: int, more: bool) -> int:
    """Parts of a quantity that is p% more/fewer than a quantity of ``base`` parts (an exact integer)."""
    n, d = PERCENTS[p]
    return base + base * n // d if more else base - base * n // d


def _make_word(rng: random.Random) -> Made:
    noun, (x, y, z) = rng.choice(GROUPS)
    kind = rng.choice(["more_of", "add", "total2", "total3"])
    few = "fewer"
    if kind == "add":
        # Two quantities, an absolute difference, then the total.
        b, k, more = rng.randint(5, 60), rng.randint(2, 30), rng.random() < 0.6
        if not more and k >= b:
            more = True
        a = b + k if more else b - k
        rel = "more" if more else few
        question = (f"{y} has {b} {noun}. {x} has {k} {rel} {noun} than {y}. "
                    f"How many {noun} do {x} and {y} have together?")
        lines = [*column(b, "+" if more else "-", k)[0], f"{x}: {a}", *column(b, "+", a)[0], f"Together: {a + b}"]
        return Made(f"word:add,{b},{k},{rel}", question, "\n".join(lines), f"\\boxed{{{a + b}}}", str(a + b))
    if kind == "more_of":
        p, more = rng.choice(list(PERCENTS)), rng.random() < 0.6
        n, d = PERCENTS[p]
        b = d * rng.randint(1, max(2, 100 // d))
        rel = "more" if more else few
        question = f"{y} has {b} {noun}. {x} has {p}% {rel} {noun} than {y}. How many {noun} does {x} have?"
        lines, part = percent_steps(p, b)
        value = b + part if more else b - part
        lines += [*column(b, "+" if more else "-", part)[0], f"{x}: {value}"]
        return Made(f"word:pct,{p},{b},{rel}", question, "\n".join(lines), f"\\boxed{{{value}}}", str(value),
                    split=f"pct:{p},{b}")
    if kind == "total2":
        while True:  # redraw within the kind, so that the kinds keep their shares
            p, more = rng.choice(list(PERCENTS)), rng.random() < 0.6
            made = _total2(noun, (x, y), p, more, rng.randint(2, 30), rng.random() < 0.5)
            if made is not None:
                return made
    # total3: the departments problem (Sales p1% more than Marketing, Engineering p2% fewer than Sales).
    while True:  # redraw within the kind, so that the kinds keep their shares
        p1, p2 = rng.choice(list(PERCENTS)), rng.choice(list(PERCENTS))
        more1, more2 = rng.random() < 0.7, rng.random() < 0.3
        made = _total3(noun, (x, y, z), p1, more1, p2, more2, rng.randint(2, 30), rng.randrange(3))
        if made is not None:
            return made


MAX_PARTS = 12  # word problems keep "one part = total / parts" a small division


def _unit_and_answer(total: int, parts: int, ask: str, ask_parts: int) -> list[str]:
    """One part = total / parts (long division), then the asked quantity = its parts × one part."""
    work, unit = column(total, "/", parts)
    lines = [*work, f"One part: {unit}", f"{ask} has {ask_parts} parts"]
    if ask_parts == 1:
        lines.append(f"{ask}: 1 part = {unit}")
    elif ask_parts < 10:
        lines += [*column(unit, "×", ask_parts)[0], f"{ask}: {ask_parts * unit}"]
    else:
        lines.append(f"{ask}: {ask_parts}×{unit}={ask_parts * unit}")
    return lines


def _total2(noun: str, names: tuple[str, str], p: int, more: bool, unit: int, ask_first: bool) -> Made | None:
    """The two-quantity problem (names[0] has p% more/fewer than names[1], a total), or None when the parts
    do not stay small (more than MAX_PARTS)."""
    x, y = names
    n, d = PERCENTS[p]
    py = d
    px = _relation_parts(py, p, more)
    parts = px + py
    if parts > MAX_PARTS:
        return None
    total = parts * unit
    rel = "more" if more else "fewer"
    ask = x if ask_first else y
    question = (f"{x} has {p}% {rel} {noun} than {y}. Together they have {total} {noun}. "
                f"How many {noun} does {ask} have?")
    ask_parts = px if ask == x else py
    lines = [
        f"Find {ask}.",
        f"{y}: {py} parts",
        f"{p}% of {py} is {py * n // d}, so {x}: {py}{'+' if more else '-'}{py * n // d}={px} parts",
        f"Total: {py}+{px}={parts} parts = {total}",
        *_unit_and_answer(total, parts, ask, ask_parts),
    ]
    value = ask_parts * unit
    return Made(f"word:total2,{p},{rel},{total},{ask == x}", question, "\n".join(lines), f"\\boxed{{{value}}}",
                str(value), split=f"rel2:{p},{rel},{total}")


def _total3(noun: str, names: tuple[str, str, str], p1: int, more1: bool, p2: int, more2: bool, unit: int,
            ask_index: int) -> Made | None:
    """The three-quantity problem, or None when its parts do not stay small (more than MAX_PARTS)."""
    x, y, z = names
    n1, d1 = PERCENTS[p1]
    n2, d2 = PERCENTS[p2]
    py = d1
    while (_relation_parts(py, p1, more1) * n2) % d2:
        py += d1
    px = _relation_parts(py, p1, more1)
    pz = _relation_parts(px, p2, more2)
    parts = px + py + pz
    if parts > MAX_PARTS or pz <= 0:
        return None
    total = parts * unit
    rel1, rel2 = ("more" if more1 else "fewer"), ("more" if more2 else "fewer")
    ask = names[ask_index]
    question = (f"{x} has {p1}% {rel1} {noun} than {y}. {z} has {p2}% {rel2} {noun} than {x}. "
                f"The three have {total} {noun} in total. How many {noun} does {ask} have?")
    if noun == "employees":
        question = question.replace("The three have", "The three departments have")
    ask_parts = {x: px, y: py, z: pz}[ask]
    lines = [
        f"Find {ask}.",
        f"{y}: {py} parts",
        f"{p1}% of {py} is {py * n1 // d1}, so {x}: {py}{'+' if more1 else '-'}{py * n1 // d1}={px} parts",
        f"{p2}% of {px} is {px * n2 // d2}, so {z}: {px}{'+' if more2 else '-'}{px * n2 // d2}={pz} parts",
        f"Total: {py}+{px}+{pz}={parts} parts = {total}",
        *_unit_and_answer(total, parts, ask, ask_parts),
    ]
    value = ask_parts * unit
    key = f"word:total3,{p1},{rel1},{p2},{rel2},{total},{ask_index}"
    return Made(key, question, "\n".join(lines), f"\\boxed{{{value}}}", str(value),
                split=f"rel3:{p1},{rel1},{p2},{rel2},{total}")
