"""The embedded model's synthetic chats: the families, the train / held-out split, and the mix.

Every example is a chat (a question, or a longer prompt with tools, earlier calls and their results), then
an assistant turn of the form ``<think>\\n{reasoning}\\n</think>\\n{answer}``. The reasoning is written in the
small, regular steps of :mod:`.steps`; the answer boxes its value (``\\boxed{36}``), boxes each value when
there are several (``x = \\boxed{1/2} or x = \\boxed{-3}``), is a tool call, or is an honest reply.

Families:

- first edition (:mod:`.arith`): ``addition``, ``subtraction``, ``multiplication``, ``equation``,
  ``percentage``, ``word``;
- second edition: ``quadratic`` and ``system`` (:mod:`.algebra`), ``percent`` and ``fraction``
  (:mod:`.ratios`), ``tool`` (:mod:`.toolchat`: tool calls, and answers without a tool when none fits) and
  ``offdomain`` (:mod:`.offdomain`: the honest reply).

The split is decided by a hash of each problem's split key: its numbers, shared by every family and
wording that asks about the same numbers, so a held-out problem is never seen in training in any wording.
Tool chats are split by tool name (held-out requests use names never seen in training), off-domain chats by
prompt. The web chat's example problems (:data:`DEMO_SPLITS`) are always training problems.

Some training chats end their reasoning early (:data:`TRUNCATE_RATE`): the reasoning stops at a random
point (half of them at the end of a line, where ``AnswerGuard(close_at="line")`` closes it), ``</think>``
follows at once, then the usual answer, so that a reasoning budget which forces ``</think>`` still gets an
answer, not more reasoning.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from . import algebra, arith, offdomain, ratios, toolchat
from .solver import exact_value
from .steps import Made, addition_steps, column, division_steps, multiplication_steps, subtraction_steps

__all__ = [
    "DEMO_SPLITS", "FAMILIES", "MATH_FAMILIES", "Example", "addition_steps", "column", "demo_examples",
    "division_steps", "exact_value", "extract_all_boxed", "extract_boxed", "generate", "is_held_out",
    "make_example", "multiplication_steps", "render_message", "render_prompt", "subtraction_steps",
]

FIRST_EDITION = ("addition", "subtraction", "multiplication", "equation", "percentage", "word")
SECOND_EDITION = ("quadratic", "system", "percent", "fraction")
MATH_FAMILIES = (*FIRST_EDITION, *SECOND_EDITION)
FAMILIES = (*MATH_FAMILIES, "tool", "offdomain")

# Share of each family in the training mix: the long, many-step families get the most.
DEFAULT_WEIGHTS: dict[str, float] = {
    "addition": 0.05,
    "subtraction": 0.05,
    "multiplication": 0.05,
    "equation": 0.06,
    "percentage": 0.06,
    "word": 0.09,
    "quadratic": 0.13,
    "system": 0.11,
    "percent": 0.11,
    "fraction": 0.11,
    "tool": 0.15,
    "offdomain": 0.03,
}

HELD_OUT_PERCENT = 10  # share of split keys reserved for evaluation
DEMO_RATE = 0.004  # share of training chats that are one of the web chat's own problems (demo_examples)
MULTI_TURN_RATE = 0.04  # share of training chats that carry an earlier exchange before the question
SYSTEM_RATE = 0.04  # share of training chats that start with a system message
# share of training chats whose reasoning is cut short (see the module docstring); at 4% the first trained model
# wrote a clean answer after a forced </think> in 5-14 of 60 chats
TRUNCATE_RATE = 0.10
NO_TOOL_RATE = 0.25  # share of tool chats in which no tool fits the question
# tools that would answer an off-domain question (a fact, a translation, the weather), kept out of its tool list
OFFDOMAIN_TOOL_KINDS = frozenset({"weather", "search", "translate", "time", "email", "stock", "reminder"})

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
        key: Canonical key (family and numbers).
        messages: The conversation up to the assistant turn to write (plain role/content dicts; a system
            message may carry ``tools``).
        reasoning: The worked steps that go between ``<think>`` and ``</think>``.
        answer: The text after ``</think>``: an answer with ``\\boxed{...}``, a tool call, or a reply.
        value: The true answer (see :class:`~.steps.Made`); "" where nothing is graded.
        split: The key whose hash decides the split.
        cut: The reasoning was cut short: ``</think>`` follows it directly.
        trained_history: The earlier assistant turns in ``messages`` are trained too, not only the completion
            (a session of several tool requests, :func:`~.toolchat.session_chat`).
    """

    family: str
    key: str
    messages: tuple[dict[str, str], ...]
    reasoning: str
    answer: str
    value: str
    split: str = ""
    cut: bool = False
    trained_history: bool = False

    @property
    def question(self) -> str:
        """The last user message."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    @property
    def completion(self) -> str:
        """The assistant turn exactly as the model should write it (without the closing ``<|end|>``)."""
        if self.cut:
            return f"<think>\n{self.reasoning}</think>\n{self.answer}"
        return f"<think>\n{self.reasoning}\n</think>\n{self.answer}"

    def message_dicts(self) -> list[dict[str, str]]:
        """The prompt messages as a fresh list of dicts (what ``engine.generate`` takes)."""
        return [dict(m) for m in self.messages]


def render_message(m: dict[str, str]) -> str:
    """One message as the chat template of the real model (tokenizer_config.json) writes it."""
    tools = f"<|tool|>{m['tools']}<|/tool|>" if m["role"] == "system" and m.get("tools") is not None else ""
    return f"<|{m['role']}|>{m['content']}{tools}<|end|>"


def render_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The chat template of the real model (tokenizer_config.json) with ``add_generation_prompt=True``."""
    return "".join(render_message(m) for m in messages) + "<|assistant|>"


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (stripped), or None when there is none."""
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


def extract_all_boxed(text: str) -> list[tuple[str | None, str]]:
    """Every boxed value of an answer with the label written before it (``Sales = \\boxed{75}``), in order.

    The label is the name right before ``=`` or ``:`` (None for a bare box or ``x = ``), so that answers with
    several values can be graded value by value.
    """
    out: list[tuple[str | None, str]] = []
    for m in _BOXED.finditer(text):
        head = re.search(r"([A-Za-z][\w ]*?)\s*[=:]\s*$", text[:m.start()].split(",")[-1].split(" or ")[-1])
        label = head.group(1).strip() if head else None
        out.append((None if label in (None, "x") else label, m.group(1).strip()))
    return out


def is_held_out(split: str) -> bool:
    """Whether a split key belongs to the held-out side (a stable hash, not Python's).

    The web chat's example problems (:data:`DEMO_SPLITS`) are always on the training side.
    """
    if split in DEMO_SPLITS:
        return False
    digest = hashlib.sha256(split.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELD_OUT_PERCENT


# ----------------------------------------------------------------------------------------------------
# The web chat's example problems.
# ----------------------------------------------------------------------------------------------------

ARTICLE_QUADRATIC = (
    "Solve the quadratic equation: 2x^2 + 5x - 3 = 0", "Solve the quadratic equation: 2x² + 5x - 3 = 0",
    "Solve 2x² + 5x - 3 = 0", "Solve 2x^2 + 5x - 3 = 0",
)
ARTICLE_DEPARTMENTS = (
    "Sales has 25% more employees than Marketing, and Engineering has 40% fewer employees than Sales. "
    "If the three departments have 180 employees in total, how many employees does each department have?",
    "A company has 3 departments: Sales, Marketing, and Engineering.\n- Sales has 25% more employees than "
    "Marketing\n- Engineering has 40% fewer employees than Sales\n- The total number of employees across all "
    "departments is 180\n\nHow many employees are in each department?",
)
DEMO_SPLITS = frozenset({"quadratic:2,5,-3", "rel3:25,more,40,fewer,180", "rel2:25,more,180", "equation:3,+,5,20"})


def demo_examples() -> list[Example]:
    """The web chat's example problems, worded as on its cards and as in the Phi-4-mini-flash-reasoning article.

    The quadratic 2x² + 5x - 3 = 0, the departments problem (Sales 25% more than Marketing, Engineering 40%
    fewer than Sales, 180 in total: every department asked, or one), the two-department problem and
    ``Solve 3x + 5 = 20``. They are always in the training split, so the demo shows them solved; held-out
    accuracy is measured on other problems.
    """
    rng = random.Random(0)
    out = []
    for question in ARTICLE_QUADRATIC:
        out.append(_example("quadratic", algebra.make_quadratic(2, 5, -3, rng, question)))
    for style, question in enumerate(ARTICLE_DEPARTMENTS):
        made = algebra.system_problem(("Marketing", "Sales", "Engineering"), ((25, True), (40, False)), 15,
                                      "employees", "departments", "department", 0)
        assert made is not None
        out.append(_example("system", made._replace(question=question, key=f"{made.key}:{style}")))
    for ask in range(3):
        made = arith._total3("employees", ("Sales", "Marketing", "Engineering"), 25, True, 40, False, 15, ask)
        assert made is not None
        out.append(_example("word", made))
    made = arith._total2("employees", ("Sales", "Marketing"), 25, True, 20, False)
    assert made is not None
    out.append(_example("word", made))
    for made in _draws(arith._make_equation, lambda m: m.key == "equation:3,+,5,20", rng):
        out.append(_example("equation", made._replace(question="Solve 3x + 5 = 20.")))
        out.append(_example("equation", made._replace(question="Solve 3x + 5 = 20")))
    return out


def _draws(maker: Callable[[random.Random], Made], wanted: Callable[[Made], bool], rng: random.Random) -> list[Made]:
    """Draw from ``maker`` until it makes the wanted problem (the makers draw their own numbers)."""
    for _ in range(2_000_000):
        made = maker(rng)
        if wanted(made):
            return [made]
    raise RuntimeError("the demo problem was never drawn")


# ----------------------------------------------------------------------------------------------------
# Drawing examples.
# ----------------------------------------------------------------------------------------------------

_MAKERS: dict[str, Callable[[random.Random], Made]] = {
    "addition": arith._make_addition,
    "subtraction": arith._make_subtraction,
    "multiplication": arith._make_multiplication,
    "equation": arith._make_equation,
    "percentage": arith._make_percentage,
    "word": arith._make_word,
    "quadratic": algebra._make_quadratic,
    "system": algebra._make_system,
    "percent": ratios._make_percent,
    "fraction": ratios._make_fraction,
    "offdomain": offdomain._make_offdomain,
}


def _example(family: str, made: Made) -> Example:
    messages = made.messages or ({"role": "user", "content": made.question},)
    return Example(family, made.key, tuple(messages), made.reasoning, made.answer, made.value, made.split or made.key)


def make_example(family: str, rng: random.Random) -> Example:
    """One example of ``family`` drawn from ``rng`` (either split; tool chats on the training side)."""
    if family == "tool":
        return _tool_example(rng, held_out=False)
    return _example(family, _MAKERS[family](rng))


def _draw(family: str, rng: random.Random, held_out: bool, tool_sessions: float = 0.0) -> Example:
    """Draw examples of ``family`` until one falls on the requested side of the split."""
    if family == "tool":
        return _tool_example(rng, held_out, tool_sessions)
    while True:
        ex = make_example(family, rng)
        if is_held_out(ex.split) == held_out:
            return ex


def _tool_example(rng: random.Random, held_out: bool, tool_sessions: float = 0.0) -> Example:
    """A tool chat: a call, a report after a result, or (training only) a question no tool fits or, a share
    ``tool_sessions`` of the time, a session of several requests with every reply trained."""
    if not held_out and tool_sessions and rng.random() < tool_sessions:
        made = toolchat.session_chat(rng, _direct_question)
        return replace(_example("tool", made._replace(split=f"tool:train:{made.key}")), trained_history=True)
    if not held_out and rng.random() < NO_TOOL_RATE:
        return _no_tool_fits(rng)
    maker = toolchat.intent_chat if rng.random() < 0.5 else toolchat.arithmetic_chat
    made = maker(rng, held_out)
    # Held-out tool chats are requests for a call; the tool names decide their side.
    return _example("tool", made._replace(split=f"tool:{'held-out' if held_out else 'train'}:{made.key}"))


def _unfit_question(rng: random.Random) -> tuple[Example, frozenset[str]]:
    """A training question to ask with tools that do not fit it, and the tool kinds (intents and operations)
    that would fit it."""
    if rng.random() < 0.6:
        family = rng.choice(MATH_FAMILIES)
        # Arithmetic tools that do not do what the question needs, or other tools.
        return _draw(family, rng, False), frozenset({"+", "-", "*", "/"} if family != "addition" else {"+"})
    return _draw("offdomain", rng, False), OFFDOMAIN_TOOL_KINDS


def _direct_question(rng: random.Random) -> toolchat.DirectQuestion:
    """A session's request that no tool fits (:func:`~.toolchat.session_chat`), answered as without tools."""
    base, fits = _unfit_question(rng)
    return toolchat.DirectQuestion(base.question, base.reasoning, base.answer, base.value, fits)


def _no_tool_fits(rng: random.Random) -> Example:
    """A question asked with tools that do not fit it, answered as without tools."""
    base, exclude = _unfit_question(rng)
    tools = toolchat.unrelated_tools(rng, False, set(exclude))
    made = toolchat.with_tools(Made(base.key, base.question, base.reasoning, base.answer, base.value), tools, rng)
    return Example("tool", f"notool:{base.key}", made.messages or (), base.reasoning, base.answer, base.value,
                   base.split)


def generate(
    n: int,
    seed: int = 0,
    split: str = "train",
    families: Sequence[str] | None = None,
    weights: dict[str, float] | None = None,
    extras: bool = True,
    tool_sessions: float = 0.0,
    multi_turn: float = MULTI_TURN_RATE,
) -> list[Example]:
    """Generate ``n`` examples, deterministically for a given ``seed``.

    Args:
        n: Number of examples.
        seed: Seed of the private random generator; the same arguments always give the same examples.
        split: ``"train"`` (never a held-out key) or ``"heldout"`` (only held-out keys, no system message or
            earlier exchange, no cut reasoning).
        families: Families to draw from (default: all for train, :data:`MATH_FAMILIES` for heldout).
        weights: Mix of the families (default :data:`DEFAULT_WEIGHTS`); for heldout, families rotate evenly.
        extras: For train, add the occasional system message, earlier exchange or cut reasoning.
        tool_sessions: For train, the share of tool chats that are sessions of several requests on one tool
            list with every reply trained (:func:`~.toolchat.session_chat`); 0 keeps the data of older runs.
        multi_turn: For train with extras, the share of chats without tools that carry an earlier exchange
            before the question (the default keeps the data of older runs).

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
            ex = _draw(family, rng, held_out, tool_sessions)
        if not held_out and extras:
            ex = _decorate(ex, rng, multi_turn)
        out.append(ex)
    return out


def _decorate(ex: Example, rng: random.Random, multi_turn: float = MULTI_TURN_RATE) -> Example:
    """Sometimes put a system message or an earlier exchange before the question, as the web chat does, or
    cut the reasoning short."""
    messages = list(ex.messages)
    if messages[0]["role"] != "system":  # tool chats have their system turn already
        if rng.random() < multi_turn:
            prev = _draw(rng.choice(["addition", "equation", "percent", "quadratic", "offdomain"]), rng, False)
            # Chat UIs keep either the whole earlier turn or only its answer; both should work.
            reply = prev.completion if rng.random() < 0.5 else prev.answer
            messages = [*prev.messages, {"role": "assistant", "content": reply}, *messages]
        if rng.random() < SYSTEM_RATE:
            messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *messages]
    ex = replace(ex, messages=tuple(messages))
    if rng.random() < TRUNCATE_RATE and len(ex.reasoning) > 2:
        ends = [i + 1 for i, char in enumerate(ex.reasoning[:-1]) if char == "\n"]
        if ends and rng.random() < 0.5:  # after a whole line, as a budget closed at the end of the line
            end = rng.choice(ends)
        else:  # mid-line, as a budget closed at its cap
            end = rng.randrange(1, len(ex.reasoning))
        ex = replace(ex, reasoning=ex.reasoning[:end], cut=True)
    return ex
