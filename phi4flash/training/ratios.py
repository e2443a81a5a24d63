"""Second-edition families on parts of a whole: ``percent`` (any whole percentage of a number, increase and
decrease by a percentage, "what percent is a of b", percentage change) and ``fraction`` (a fraction of a
number, sums and differences of fractions, splitting in a ratio, scaling a ratio). Every result is exact.

A percentage p goes through p/100 in lowest terms (``15% = 15/100 = 3/20``), so "p% of x" is x divided by a
divisor of 100 (:func:`~.steps.divide_steps`), then multiplied by a small numerator. The percentages of the
first edition's ``percentage`` family (10, 20, 25, ...) keep that family's shorter wording and are not drawn
here, so each percentage is always worked the same way.
"""

from __future__ import annotations

import random
from math import gcd, lcm

from .steps import PERCENTS, Made, column, divide_steps, fraction_text, reduce_fraction, times_steps

# ----------------------------------------------------------------------------------------------------
# Percentages.
# ----------------------------------------------------------------------------------------------------

NEW_PERCENTS = tuple(p for p in range(1, 100) if p not in PERCENTS)


def percent_of_steps(p: int, x: int) -> tuple[list[str], int]:
    """``p% of x`` through p/100 in lowest terms: ``15% = 15/100 = 3/20``, x/20, then ×3."""
    n, d = reduce_fraction(p, 100)
    lines = [f"{p}% = {p}/100" if d == 100 else f"{p}% = {p}/100 = {n}/{d}"]
    work, q = divide_steps(x, d)
    lines += work
    work, value = times_steps(q, n)
    lines += work
    lines.append(f"{p}% of {x} is {value}")
    return lines, value


def percent_of_base(p: int, x: int) -> bool:
    """Whether ``p% of x`` is a whole number this family can work (one factor of the product has one digit)."""
    n, d = reduce_fraction(p, 100)
    return x % d == 0 and (x // d < 10 or n < 10)


def _draw_percent_of(rng: random.Random) -> tuple[int, int]:
    while True:
        p = rng.choice(NEW_PERCENTS)
        _, d = reduce_fraction(p, 100)
        x = d * rng.randint(1, max(2, 1000 // d))
        if percent_of_base(p, x):
            return p, x


def whole_over(a: int, b: int) -> tuple[list[str], int]:
    """``a`` as a percentage of ``b`` (b a one-digit number times 1, 10 or 100): a×100/b with zeros cancelled."""
    zeros = len(str(b)) - len(str(b).rstrip("0"))
    lead = b // 10**zeros
    top = a * 10 ** (2 - min(zeros, 2))
    lines = [f"{a}/{b} as a percentage: {a}×100/{b}", f"{a}×100={a * 100}"]
    if zeros:
        lines.append(f"{a * 100}/{b}={top}" if lead == 1 else f"{a * 100}/{b}={top}/{lead}")
    if lead == 1:
        return lines, top
    work, value = column(top, "/", lead)
    return lines + work, value


def _percent_denominators() -> list[int]:
    """The bases "what percent of b" uses: a one-digit number times 1, 10 or 100."""
    return sorted({m * 10**z for m in range(1, 10) for z in range(3)} - {1})


def _make_percent(rng: random.Random) -> Made:
    kind = rng.choice(["of", "of", "more", "less", "what", "what", "change"])
    if kind in ("of", "more", "less"):
        p, x = _draw_percent_of(rng)
        lines, part = percent_of_steps(p, x)
        if kind == "of":
            question = rng.choice(["What is {p}% of {x}?", "Compute {p}% of {x}.", "Find {p}% of {x}.",
                                   "Calculate {p} percent of {x}."])
            value = part
        else:
            more = kind == "more"
            up = "up" if more else "down"
            question = rng.choice([f"What is {{p}}% {'more' if more else 'less'} than {{x}}?",
                                   f"{'Increase' if more else 'Decrease'} {{x}} by {{p}}%.",
                                   f"A price of {{x}} goes {up} by {{p}}%. What is the new price?"])
            work, value = column(x, "+" if more else "-", part)
            lines += work
        return Made(f"percent:{kind},{p},{x}", question.format(p=p, x=x), "\n".join(lines), f"\\boxed{{{value}}}",
                    str(value), split=f"pct:{p},{x}")
    b = rng.choice(_percent_denominators())
    if kind == "what":
        step = b // gcd(b, 100)  # a must be a multiple of this for a whole percentage
        choices = [a for a in range(step, b, step)]
        if not choices:
            return _make_percent(rng)
        a = rng.choice(choices)
        lines, p = whole_over(a, b)
        question = rng.choice(["What percent of {b} is {a}?", "{a} is what percent of {b}?",
                               "What percentage of {b} is {a}?", "Express {a} as a percentage of {b}."])
        lines.append(f"{a} is {p}% of {b}")
        return Made(f"percent:what,{a},{b}", question.format(a=a, b=b), "\n".join(lines), f"\\boxed{{{p}\\%}}",
                    str(p), split=f"pct:{p},{b}")
    # change: from b to c, as a percentage of b
    step = b // gcd(b, 100)
    up = rng.random() < 0.5
    sizes = [k for k in range(step, b + 1 if up else b, step)]
    if not sizes:
        return _make_percent(rng)
    diff = rng.choice(sizes)
    c = b + diff if up else b - diff
    work, _ = column(c, "-", b) if up else column(b, "-", c)
    lines, p = whole_over(diff, b)
    word = "increase" if up else "decrease"
    lines = [f"Change: {c}-{b}" if up else f"Change: {b}-{c}", *work, *lines, f"The {word} is {p}%"]
    question = rng.choice([f"A price goes from {{b}} to {{c}}. What is the percentage {word}?",
                           f"What is the percent {word} from {{b}} to {{c}}?",
                           f"By what percent does {{b}} {word} to {{c}}?"])
    return Made(f"percent:change,{b},{c}", question.format(b=b, c=c), "\n".join(lines), f"\\boxed{{{p}\\%}}", str(p),
                split=f"pct:{p},{b}")


# ----------------------------------------------------------------------------------------------------
# Fractions and ratios.
# ----------------------------------------------------------------------------------------------------

DENOMINATORS = (2, 3, 4, 5, 6, 8, 9, 10, 12)
OWNERS = ("Ann", "Bob", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana")
THINGS = ("sweets", "coins", "stickers", "marbles", "cards", "euros", "dollars", "points")


def _fraction_of(rng: random.Random) -> Made:
    d = rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 10])
    n = rng.choice([k for k in range(1, d) if gcd(k, d) == 1])
    x = d * rng.randint(1, 120 // d + 5)
    question = rng.choice(["What is {n}/{d} of {x}?", "Find {n}/{d} of {x}.", "Compute {n}/{d} of {x}."])
    work, q = ([f"{x}/10={x // 10}"], x // 10) if d == 10 else column(x, "/", d)
    more, value = times_steps(q, n)
    lines = [*work, *more, f"{n}/{d} of {x} is {value}"]
    return Made(f"fraction:of,{n},{d},{x}", question.format(n=n, d=d, x=x), "\n".join(lines), f"\\boxed{{{value}}}",
                str(value))


def _fraction_sum(rng: random.Random) -> Made:
    while True:
        b, d = rng.choice(DENOMINATORS), rng.choice(DENOMINATORS)
        common = lcm(b, d)
        a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
        x, y = a * common // b, c * common // d
        if common > 24 or gcd(a, b) != 1 or gcd(c, d) != 1:
            continue
        op = rng.choice("+-")
        if op == "-" and x <= y:
            continue
        break
    # The denominators side by side first: the model decided "same" or "different" from the question alone,
    # and went looking for a common multiple of 4 and 4.
    lines = [f"Denominators {b} and {d}: {'the same' if b == d else 'different'}"]
    if b != d:
        # worked, not recalled: the first edition's wrong answers were mostly a wrong common denominator
        big, small = max(b, d), min(b, d)
        multiples = ", ".join(str(big * k) for k in range(1, common // big + 1))
        lines.append(f"Multiples of {big}: {multiples}; {common} = {small}×{common // small}")
        lines.append(f"Common denominator of {b} and {d}: {common}")
        for num, den, new in ((a, b, x), (c, d, y)):
            if den != common:
                lines.append(f"{num}/{den} = {num}×{common // den}/{common} = {new}/{common}")
    # worked digit by digit even for one-digit numerators: recalled, 4 + 1 came out as 7
    work, s = column(x, op, y)
    lines += [*work, f"{x}/{common} {op} {y}/{common} = {s}/{common}"]
    n, den = reduce_fraction(s, common)
    g = common // den
    if g > 1:
        lines.append(f"{s}/{common}: divide both by {g}: {fraction_text(n, den)}")
    else:
        lines.append(f"{s}/{common} is in lowest terms")
    result = fraction_text(n, den)
    question = rng.choice(["What is {a}/{b} {op} {c}/{d}?", "Compute {a}/{b} {op} {c}/{d}.",
                           "Calculate {a}/{b} {op} {c}/{d}."] + (["Add {a}/{b} and {c}/{d}."] if op == "+" else []))
    return Made(f"fraction:{op},{a},{b},{c},{d}", question.format(a=a, b=b, op=op, c=c, d=d), "\n".join(lines),
                f"\\boxed{{{result}}}", result)


def _ratio_split(rng: random.Random) -> Made:
    while True:
        ratio = [rng.randint(1, 7) for _ in range(3 if rng.random() < 0.3 else 2)]
        if sum(ratio) <= 12 and gcd(*ratio) == 1:
            break
    parts = sum(ratio)
    unit = rng.randint(2, 40)
    total = parts * unit
    text = ":".join(map(str, ratio))
    named = rng.random() < 0.6
    names = rng.sample(OWNERS, len(ratio)) if named else [f"Share {i + 1}" for i in range(len(ratio))]
    thing = rng.choice(THINGS)
    if named:
        who = ", ".join(names[:-1]) + f" and {names[-1]}"
        question = rng.choice([f"Share {total} {thing} between {who} in the ratio {text}. How many does each get?",
                               f"{who} split {total} {thing} in the ratio {text}. How many {thing} does each get?"])
    else:
        question = rng.choice([f"Divide {total} in the ratio {text}.", f"Split {total} in the ratio {text}.",
                               f"Share {total} in the ratio {text}."])
    lines = [f"Parts: {'+'.join(map(str, ratio))}={parts}", *column(total, "/", parts)[0], f"One part: {unit}"]
    values = []
    for name, r in zip(names, ratio, strict=True):
        work, v = times_steps(unit, r)
        lines += [*work, f"{name}: {r}×{unit}={v}"]
        values.append(v)
    if named:
        answer = ", ".join(f"{n} = \\boxed{{{v}}}" for n, v in zip(names, values, strict=True))
        value = "; ".join(f"{n}={v}" for n, v in zip(names, values, strict=True))
    else:
        answer = " and ".join(f"\\boxed{{{v}}}" for v in values)
        value = "; ".join(map(str, values))
    return Made(f"fraction:split,{text},{total}", question, "\n".join(lines), answer, value)


def _ratio_scale(rng: random.Random) -> Made:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if a == b or gcd(a, b) != 1:
        return _ratio_scale(rng)
    unit = rng.randint(2, 30)
    first, second = rng.choice([("boys", "girls"), ("cats", "dogs"), ("red balls", "blue balls"),
                                ("adults", "children"), ("apples", "pears"), ("cars", "bikes")])
    known = a * unit
    question = rng.choice([f"The ratio of {first} to {second} is {a}:{b}. There are {known} {first}. "
                           f"How many {second} are there?",
                           f"{first.capitalize()} and {second} are in the ratio {a}:{b}. If there are {known} {first}, "
                           f"how many {second} are there?"])
    work, _ = ([], unit) if a == 1 else column(known, "/", a)
    more, value = times_steps(unit, b)
    lines = [f"{a} parts are {known}", *work, f"One part: {unit}", *more, f"{second.capitalize()}: {b}×{unit}={value}"]
    return Made(f"fraction:scale,{a},{b},{known}", question, "\n".join(lines), f"\\boxed{{{value}}}", str(value))


def _make_fraction(rng: random.Random) -> Made:
    return rng.choice([_fraction_of, _fraction_of, _fraction_sum, _fraction_sum, _ratio_split, _ratio_scale])(rng)
