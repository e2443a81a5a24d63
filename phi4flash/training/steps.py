"""The worked-arithmetic vocabulary of the embedded model's reasoning: every multi-digit step, written
as the lines the model learns to produce, and the record a problem maker returns.

Three rules make these lines learnable by a model of a few million parameters:

- **One small step per line, always in the same words.** Every sum, difference and product of
  several digits is worked digit by digit from the right (:func:`column`); each line peels the last
  digit off the numbers it works on and restates what is left (``left 472+39``), so the next line
  only ever reads the line above it, never a far-away digit. Division by a small number is long
  division from the left, in the same shape (``13/4=3 r1, so far 03, left 6``).
- **The partial result is carried along** (``so far 123``), so the final answer is a copy, not a
  reversal of digits scattered over the reasoning.
- **Only one-digit facts are ever recalled** (8+5+1=14, 4×9=36, 13/4=3 r1): the first training runs
  showed a tiny model gets a two-digit step such as 63-27=36 or 36+6=42 wrong far too often.
"""

from __future__ import annotations

import random
from math import gcd
from typing import NamedTuple


class Made(NamedTuple):
    """What a problem maker returns.

    Attributes:
        key: Canonical key of the problem (family and numbers).
        question: The user's question (ignored when ``messages`` is given).
        reasoning: The worked steps that go between ``<think>`` and ``</think>``.
        answer: The text after ``</think>``.
        value: The true answer: one value (``"36"``), or several joined by ``"; "`` (``"1/2; -3"``,
            ``"Marketing=60; Sales=75"``); for tool calls the expected call as JSON; "" for chat.
        split: The key whose hash decides the train / held-out side (default ``key``): problems that share
            their numbers share it, so a held-out problem is not seen in training in another family's wording.
        messages: The whole prompt (system with tools, earlier turns, tool results), when more than one question.
    """

    key: str
    question: str
    reasoning: str
    answer: str
    value: str
    split: str | None = None
    messages: tuple[dict[str, str], ...] | None = None


# ----------------------------------------------------------------------------------------------------
# Digit-by-digit arithmetic, written as the reasoning lines the model learns to produce.
# ----------------------------------------------------------------------------------------------------


def addition_steps(a: int, b: int) -> list[str]:
    """Lines of column addition from the right: ``8+5+0=13, carry 1, so far 3, left 472+39``."""
    lines, carry, so_far = [], 0, ""
    while True:
        da, db = a % 10, b % 10
        total = da + db + carry
        carry, digit = divmod(total, 10)
        so_far = f"{digit}{so_far}"
        a, b = a // 10, b // 10
        lines.append(f"{da}+{db}+{total - da - db}={total}, carry {carry}, so far {so_far}, left {a}+{b}")
        if a == 0 and b == 0 and carry == 0:
            return lines


def subtraction_steps(a: int, b: int) -> list[str]:
    """Lines of column subtraction from the right (``a >= b``), borrows written out."""
    if a < b:
        raise ValueError("subtraction_steps needs a >= b")
    lines, borrow, so_far = [], 0, ""
    while True:
        da, db, bin_ = a % 10, b % 10, borrow
        a, b = a // 10, b // 10
        diff = da - db - bin_
        if diff < 0:
            borrow, digit = 1, diff + 10
            step = f"{da}-{db}-{bin_}<0, {da + 10}-{db}-{bin_}={digit}, borrow 1"
        else:
            borrow, digit = 0, diff
            step = f"{da}-{db}-{bin_}={digit}, borrow 0"
        so_far = f"{digit}{so_far}"
        lines.append(f"{step}, so far {so_far}, left {a}-{b}")
        if a == 0 and b == 0:
            return lines


def multiplication_steps(a: int, m: int) -> list[str]:
    """Lines of multiplying ``a`` by the one-digit ``m`` from the right: ``4×9=36, 6+6=12, carry 3+1=4, ...``.

    Every fact is a one-digit one: the table fact (4×9=36), then the product's ones digit plus the carry
    in (6+6=12), then the product's tens digit plus that sum's carry (3+1=4) as the carry out. A combined
    ``36+6=42`` is exactly the step a tiny model gets wrong.
    """
    lines, carry, so_far = [], 0, ""
    while True:
        da = a % 10
        tens, ones = divmod(da * m, 10)
        low = ones + carry
        carry = tens + low // 10
        so_far = f"{low % 10}{so_far}"
        a //= 10
        lines.append(f"{da}×{m}={da * m}, {ones}+{low - ones}={low}, carry {tens}+{low // 10}={carry}, "
                     f"so far {so_far}, left {a}")
        if a == 0 and carry == 0:
            return lines


def division_steps(x: int, d: int) -> list[str]:
    """Lines of long division by the one-digit ``d`` from the left: ``13/4=3 r1, so far 03, left 6``."""
    digits, rem, so_far, lines = str(x), 0, "", []
    for i, ch in enumerate(digits):
        n = rem * 10 + int(ch)
        q, rem = divmod(n, d)
        so_far += str(q)
        lines.append(f"{n}/{d}={q} r{rem}, so far {so_far}, left {digits[i + 1:] or 'none'}")
    return lines


def column(a: int, op: str, b: int) -> tuple[list[str], int]:
    """``a op b`` worked digit by digit (op is ``+``, ``-`` or ``×`` with a one-digit b, or ``/`` by a
    one-digit b), with a header line and a closing ``a op b = value`` line; returns (lines, value)."""
    if op == "+":
        steps, value = addition_steps(a, b), a + b
    elif op == "-":
        steps, value = subtraction_steps(a, b), a - b
    elif op == "×":
        steps, value = multiplication_steps(a, b), a * b
    elif op == "/":
        if a % b:
            raise ValueError(f"{a}/{b} is not exact")
        steps, value = division_steps(a, b), a // b
    else:
        raise ValueError(f"unknown operation {op!r}")
    return [f"Work out {a}{op}{b}:", *steps, f"{a}{op}{b}={value}"], value


def draw_digits(rng: random.Random, lo: int, hi: int) -> int:
    """A random integer with between ``lo`` and ``hi`` digits, roughly uniform over the digit count."""
    n = rng.randint(lo, hi)
    return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)


# Percentages of the first edition's percentage family, each with its fraction (n/d): "p% of X" is X/d×n.
# Other percentages go through p/100 in lowest terms (ratios.py).
PERCENTS: dict[int, tuple[int, int]] = {
    10: (1, 10), 20: (1, 5), 25: (1, 4), 30: (3, 10), 40: (2, 5), 50: (1, 2), 60: (3, 5), 75: (3, 4),
}


def percent_steps(p: int, x: int) -> tuple[list[str], int]:
    """Lines computing p% of x through its fraction (x/d, then ×n, each digit by digit); returns (lines, value)."""
    n, d = PERCENTS[p]
    lines = [f"{p}% = {n}/{d}"]
    if d == 10:
        q = x // 10
        lines.append(f"{x}/10={q}")  # dropping the last zero needs no working
    else:
        work, q = column(x, "/", d)
        lines += work
    if n > 1:
        work, _ = column(q, "×", n)
        lines += work
    lines.append(f"{p}% of {x} is {q * n}")
    return lines, q * n



def divide_steps(x: int, d: int) -> tuple[list[str], int]:
    """``x/d`` for a divisor of 100 (2, 4, 5, 10, 20, 25, 50, 100), by one-digit long divisions and dropped zeros."""
    if x % d:
        raise ValueError(f"{x}/{d} is not exact")
    if d in (2, 4, 5):
        return column(x, "/", d)
    if d in (10, 100):
        return [f"{x}/{d}={x // d}"], x // d  # dropping zeros needs no working
    if d == 25:
        first, y = column(x, "/", 5)
        second, q = column(y, "/", 5)
        return [f"{x}/25 is {x}/5/5", *first, *second], q
    if d in (20, 50):
        y = x // 10
        work, q = column(y, "/", d // 10)
        return [f"{x}/{d} is {x}/10/{d // 10}", f"{x}/10={y}", *work], q
    raise ValueError(f"cannot divide by {d} in steps")


def times_steps(a: int, b: int) -> tuple[list[str], int]:
    """``a×b`` where one factor has one digit: by :func:`column` with the one-digit factor second; nothing for ×1."""
    if b == 1 or a == 1:
        return [], a * b
    if b > 9:
        a, b = b, a
    if b > 9:
        raise ValueError(f"{a}×{b} needs a one-digit factor")
    return column(a, "×", b)


def reduce_fraction(n: int, d: int) -> tuple[int, int]:
    """``n/d`` in lowest terms (the sign goes to the numerator)."""
    g = gcd(n, d)
    n, d = n // g, d // g
    return (-n, -d) if d < 0 else (n, d)


def fraction_text(n: int, d: int) -> str:
    """``n/d`` in lowest terms as text: ``"3/4"``, ``"-2"``."""
    n, d = reduce_fraction(n, d)
    return str(n) if d == 1 else f"{n}/{d}"
