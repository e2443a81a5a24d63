"""Synthetic math problems with short, very regular worked reasoning, for the embedded tiny model.

Every example is a chat: a user question, then an assistant turn of the form
``<think>\\n{reasoning}\\n</think>\\n{answer with \\boxed{...}}``. The reasoning templates are built for
a model of a few million parameters, so they follow three rules:

- **One small step per line, always in the same words.** Every sum, difference and product of
  several digits is worked digit by digit from the right (:func:`column`); each line peels the last
  digit off the numbers it works on and restates what is left (``left 472+39``), so the next line
  only ever reads the line above it, never a far-away digit. Division by a small number is long
  division from the left, in the same shape (``13/4=3 r1, so far 03, left 6``).
- **The partial result is carried along** (``so far 123``), so the final answer is a copy, not a
  reversal of digits scattered over the reasoning.
- **Only one-digit facts are ever recalled** (8+5+1=14, 4×9=36, 13/4=3 r1): the first training runs
  showed a tiny model gets a two-digit step such as 63-27=36 or 36+6=42 wrong far too often.
- **Numbers are chosen so that every answer is an integer**; word problems keep "one part" a division
  by at most 12 (:data:`MAX_PARTS`).

Families: ``addition``, ``subtraction``, ``multiplication`` (2-digit by 1-digit), ``equation`` (one- and
two-step linear), ``percentage`` and ``word`` (two or three quantities, including the departments
problem of the demo), plus a little ``chat`` (greetings) so the web chat answers "Hi" sensibly.

The train / held-out split is decided by a hash of each problem's canonical key (its family and
numbers, not its wording), so a held-out problem is never seen in training in any phrasing.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

MATH_FAMILIES = ("addition", "subtraction", "multiplication", "equation", "percentage", "word")
FAMILIES = (*MATH_FAMILIES, "chat")

# Share of each family in the training mix. Every family works its sums digit by digit with the same
# lines as addition and subtraction, so those two also get practice inside the others; word problems
# combine the most steps and get the largest share; chat is only there so that "Hi" gets a sensible reply.
DEFAULT_WEIGHTS: dict[str, float] = {
    "addition": 0.14,
    "subtraction": 0.14,
    "multiplication": 0.14,
    "equation": 0.16,
    "percentage": 0.17,
    "word": 0.22,
    "chat": 0.03,
}

HELD_OUT_PERCENT = 10  # share of canonical keys reserved for evaluation
DEMO_RATE = 0.002  # share of training chats that are one of the demo's own problems (see DEMO_KEYS)
MULTI_TURN_RATE = 0.04  # share of training chats that carry an earlier exchange before the question
SYSTEM_RATE = 0.04  # share of training chats that start with a system message

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "You are a tiny math tutor. Think step by step.",
)

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class Example:
    """One training or evaluation chat.

    Attributes:
        family: One of :data:`FAMILIES`.
        key: Canonical key (family and numbers); its hash decides the train / held-out split.
        messages: The conversation up to and including the user question (plain role/content dicts).
        reasoning: The worked steps that go between ``<think>`` and ``</think>``.
        answer: The text after ``</think>``; for math it contains ``\\boxed{value}``.
        value: The true final answer as a string ("" for chat).
    """

    family: str
    key: str
    messages: tuple[dict[str, str], ...]
    reasoning: str
    answer: str
    value: str

    @property
    def question(self) -> str:
        """The last user message."""
        return self.messages[-1]["content"]

    @property
    def completion(self) -> str:
        """The assistant turn exactly as the model should write it (without the closing ``<|end|>``)."""
        return f"<think>\n{self.reasoning}\n</think>\n{self.answer}"

    def message_dicts(self) -> list[dict[str, str]]:
        """The prompt messages as a fresh list of dicts (what ``engine.generate`` takes)."""
        return [dict(m) for m in self.messages]


def render_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The chat template of the real model (tokenizer_config.json) with ``add_generation_prompt=True``."""
    parts = []
    for m in messages:
        tools = f"<|tool|>{m['tools']}<|/tool|>" if m["role"] == "system" and m.get("tools") is not None else ""
        parts.append(f"<|{m['role']}|>{m['content']}{tools}<|end|>")
    return "".join(parts) + "<|assistant|>"


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (stripped), or None when there is none."""
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


def is_held_out(key: str) -> bool:
    """Whether the canonical problem key belongs to the held-out split (a stable hash, not Python's).

    The web chat's example problems (:data:`DEMO_KEYS`) are always on the training side.
    """
    if key in DEMO_KEYS:
        return False
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELD_OUT_PERCENT


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


# ----------------------------------------------------------------------------------------------------
# Families. Each maker draws numbers from ``rng`` and returns (key, question, reasoning, answer, value).
# ----------------------------------------------------------------------------------------------------

_Made = tuple[str, str, str, str, str]


def _digits(rng: random.Random, lo: int, hi: int) -> int:
    """A random integer with between ``lo`` and ``hi`` digits, roughly uniform over the digit count."""
    n = rng.randint(lo, hi)
    return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)


def _make_addition(rng: random.Random) -> _Made:
    a, b = _digits(rng, 2, 4), _digits(rng, 1, 4)
    if rng.random() < 0.5:
        a, b = b, a
    question = rng.choice(
        ["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "Calculate {a} plus {b}.", "{a} + {b} = ?"]
    ).format(a=a, b=b)
    reasoning = "\n".join(column(a, "+", b)[0])
    return f"addition:{a}+{b}", question, reasoning, f"{a} + {b} = \\boxed{{{a + b}}}", str(a + b)


def _make_subtraction(rng: random.Random) -> _Made:
    a, b = _digits(rng, 2, 4), _digits(rng, 1, 4)
    if a < b:
        a, b = b, a
    question = rng.choice(
        ["What is {a} - {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.", "Calculate {a} minus {b}.",
         "{a} - {b} = ?"]
    ).format(a=a, b=b)
    reasoning = "\n".join(column(a, "-", b)[0])
    return f"subtraction:{a}-{b}", question, reasoning, f"{a} - {b} = \\boxed{{{a - b}}}", str(a - b)


def _make_multiplication(rng: random.Random) -> _Made:
    a, m = rng.randint(10, 99), rng.randint(2, 9)
    question = rng.choice(
        ["What is {a} × {m}?", "What is {a} * {m}?", "Compute {a} × {m}.", "Multiply {a} by {m}.",
         "Calculate {a} times {m}."]
    ).format(a=a, m=m)
    reasoning = "\n".join(column(a, "×", m)[0])
    return f"multiplication:{a}*{m}", question, reasoning, f"{a} × {m} = \\boxed{{{a * m}}}", str(a * m)


def _lin(a: int, op: str, b: int) -> str:
    """``3x + 5``, ``x - 4``, ``7x`` in the spelling used by the questions."""
    head = "x" if a == 1 else f"{a}x"
    return head if b == 0 else f"{head} {op} {b}"


def _make_equation(rng: random.Random) -> _Made:
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
    return f"equation:{a},{op},{b},{c}", question, "\n".join(steps), f"x = \\boxed{{{x}}}", str(x)


# Percentages the model meets, each with its fraction (n/d) so that "p% of X" is X/d×n.
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


def _make_percentage(rng: random.Random) -> _Made:
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
    return f"percentage:{kind},{p},{x}", question.format(p=p, x=x), "\n".join(lines), f"\\boxed{{{value}}}", str(value)


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


def _make_word(rng: random.Random) -> _Made:
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
        return f"word:add,{b},{k},{rel}", question, "\n".join(lines), f"\\boxed{{{a + b}}}", str(a + b)
    if kind == "more_of":
        p, more = rng.choice(list(PERCENTS)), rng.random() < 0.6
        n, d = PERCENTS[p]
        b = d * rng.randint(1, max(2, 100 // d))
        rel = "more" if more else few
        question = f"{y} has {b} {noun}. {x} has {p}% {rel} {noun} than {y}. How many {noun} does {x} have?"
        lines, part = percent_steps(p, b)
        value = b + part if more else b - part
        lines += [*column(b, "+" if more else "-", part)[0], f"{x}: {value}"]
        return f"word:pct,{p},{b},{rel}", question, "\n".join(lines), f"\\boxed{{{value}}}", str(value)
    if kind == "total2":
        while True:  # redraw within the kind, so that the kinds keep their shares
            p, more = rng.choice(list(PERCENTS)), rng.random() < 0.6
            n, d = PERCENTS[p]
            py = d
            px = _relation_parts(py, p, more)
            parts = px + py
            if parts <= MAX_PARTS:
                break
        unit = rng.randint(2, 30)
        total = parts * unit
        rel = "more" if more else few
        ask = rng.choice([x, y])
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
        return (f"word:total2,{p},{rel},{total},{ask == x}", question, "\n".join(lines), f"\\boxed{{{value}}}",
                str(value))
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


def _total3(noun: str, names: tuple[str, str, str], p1: int, more1: bool, p2: int, more2: bool, unit: int,
            ask_index: int) -> _Made | None:
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
    return key, question, "\n".join(lines), f"\\boxed{{{value}}}", str(value)


def demo_examples() -> list[Example]:
    """The web chat's example problems, in the generator's own wording.

    The departments problem (Sales 25% more than Marketing, Engineering 40% fewer than Sales, 180 in
    total; asked for each department) and ``Solve 3x + 5 = 20.``. They are always in the training split,
    so the demo shows them solved; held-out accuracy is measured on other problems.
    """
    out = []
    for ask in range(3):
        made = _total3("employees", ("Sales", "Marketing", "Engineering"), 25, True, 40, False, 15, ask)
        assert made is not None
        out.append(Example("word", made[0], ({"role": "user", "content": made[1]},), made[2], made[3], made[4]))
    rng = random.Random(0)
    while True:  # the equation maker draws its numbers; draw until it makes the demo's equation
        ex = make_example("equation", rng)
        if ex.key == "equation:3,+,5,20":
            out.append(Example("equation", ex.key, ({"role": "user", "content": "Solve 3x + 5 = 20."},),
                               ex.reasoning, ex.answer, ex.value))
            return out


DEMO_KEYS = frozenset(
    [f"word:total3,25,more,40,fewer,180,{i}" for i in range(3)] + ["equation:3,+,5,20"]
)


_CHAT: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("Hi", "Hello", "Hey", "Hi!", "Hello!", "Good morning"), "A greeting. I greet back and offer help.",
     "Hello! I am a tiny Phi4Flash model. Ask me a math problem, for example: What is 47 × 6?"),
    (("Who are you?", "What are you?", "What is your name?"), "A question about me.",
     "I am a tiny Phi4Flash model, trained to solve small math problems step by step."),
    (("What can you do?", "Help", "How can you help me?"), "A question about what I can do.",
     "I can add, subtract and multiply numbers, solve linear equations like 3x + 5 = 20, and work out "
     "percentages and small word problems."),
    (("Thanks", "Thank you", "Thanks!", "Great, thanks"), "Thanks from the user.",
     "You are welcome! Ask me another math problem any time."),
)


def _make_chat(rng: random.Random) -> _Made:
    i = rng.randrange(len(_CHAT))
    prompts, thought, reply = _CHAT[i]
    question = rng.choice(prompts)
    return f"chat:{question}", question, thought, reply, ""


_MAKERS = {
    "addition": _make_addition,
    "subtraction": _make_subtraction,
    "multiplication": _make_multiplication,
    "equation": _make_equation,
    "percentage": _make_percentage,
    "word": _make_word,
    "chat": _make_chat,
}


def make_example(family: str, rng: random.Random) -> Example:
    """One single-turn example of ``family`` drawn from ``rng`` (either split)."""
    key, question, reasoning, answer, value = _MAKERS[family](rng)
    return Example(family, key, ({"role": "user", "content": question},), reasoning, answer, value)


def _draw(family: str, rng: random.Random, held_out: bool) -> Example:
    """Draw examples of ``family`` until one falls on the requested side of the split."""
    while True:
        ex = make_example(family, rng)
        # Chat is not evaluated, so it has no held-out side.
        if family == "chat" or is_held_out(ex.key) == held_out:
            return ex


def generate(
    n: int,
    seed: int = 0,
    split: str = "train",
    families: Sequence[str] | None = None,
    weights: dict[str, float] | None = None,
    extras: bool = True,
) -> list[Example]:
    """Generate ``n`` examples, deterministically for a given ``seed``.

    Args:
        n: Number of examples.
        seed: Seed of the private random generator; the same arguments always give the same examples.
        split: ``"train"`` (never a held-out key) or ``"heldout"`` (only held-out keys, single turn, no
            system message, no chat family).
        families: Families to draw from (default: all for train, :data:`MATH_FAMILIES` for heldout).
        weights: Mix of the families (default :data:`DEFAULT_WEIGHTS`); for heldout, families rotate evenly.
        extras: For train, add the occasional system message or earlier exchange (see module constants).

    Returns:
        The examples, in generation order.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    held_out = split == "heldout"
    fams = list(families) if families else list(MATH_FAMILIES if held_out else FAMILIES)
    unknown = set(fams) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; known: {FAMILIES}")
    if held_out and "chat" in fams:
        raise ValueError("the chat family has no held-out split")
    rng = random.Random(f"phi4flash-data:{seed}:{split}")
    w = weights or DEFAULT_WEIGHTS
    probs = [w.get(f, 0.0) for f in fams]
    out = []
    demos = [] if held_out else [d for d in demo_examples() if d.family in fams]
    for i in range(n):
        family = fams[i % len(fams)] if held_out else rng.choices(fams, probs)[0]
        if demos and rng.random() < DEMO_RATE:
            ex = rng.choice(demos)
        else:
            ex = _draw(family, rng, held_out)
        if not held_out and extras:
            ex = _decorate(ex, rng)
        out.append(ex)
    return out


def _decorate(ex: Example, rng: random.Random) -> Example:
    """Sometimes put a system message or an earlier exchange before the question, as the web chat does."""
    messages = list(ex.messages)
    if rng.random() < MULTI_TURN_RATE:
        prev = _draw(rng.choice(["addition", "equation", "percentage", "chat"]), rng, False)
        # Chat UIs keep either the whole earlier turn or only its answer; both should work.
        reply = prev.completion if rng.random() < 0.5 else prev.answer
        messages = [*prev.messages, {"role": "assistant", "content": reply}, *messages]
    if rng.random() < SYSTEM_RATE:
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *messages]
    if len(messages) == len(ex.messages):
        return ex
    return Example(ex.family, ex.key, tuple(messages), ex.reasoning, ex.answer, ex.value)


def exact_value(question: str) -> Fraction | None:
    """Solve a generated question from its text alone, independently of the generator.

    Used by the tests and by the evaluator as a second opinion; returns None for text it cannot parse.
    """
    q = question.replace("×", "*")
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
