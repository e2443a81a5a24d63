"""Tool-calling chats in the Phi-4-mini format, on generated tool sets (family ``tool``).

The tool definitions sit in the system turn (``<|tool|>[...]<|/tool|>``, rendered by :mod:`phi4flash.tools`
exactly as the LangChain model and the server render them); a call is
``<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>``; results come back as ``tool`` turns, and
earlier calls are written back as :func:`phi4flash.tools.assistant_message` writes them (without reasoning).

Conversations:

- **a request a tool fulfils** (weather, a named function, creating a record, search, e-mail, currency,
  translation, time, stock price, reminders): call it with the arguments copied from the question, then
  report the result once it comes back;
- **arithmetic with arithmetic tools**, one call per operation: ``(3 + 4) * 5`` calls add, then multiply with
  add's result, then answers 35;
- **no tool fits** (a math question with unrelated tools, or a question no tool answers): answer directly;
- **sessions** (training only, when asked for): several requests on one tool list, each for another of its
  tools, every reply trained, so that the list is read once for several calls.

Tool names and argument names are drawn from large pools built from parts (``get_weather``,
``fetchForecast``, ``weather_lookup``, ...); a name's hash decides its side of the split, so the held-out
requests use tool names never seen in training. ``add`` and ``multiply`` (the README's agent) are always
training names.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from .. import tools as tool_format
from .steps import Made

HELD_OUT_NAME_PERCENT = 20
TRAIN_NAMES = frozenset({"add", "multiply", "subtract", "divide", "get_weather", "magic_function",
                         "unicode_customer"})


def name_is_held_out(name: str) -> bool:
    """Whether a tool name belongs to the held-out side (stable hash; the README's names are always training)."""
    if name in TRAIN_NAMES:
        return False
    digest = hashlib.sha256(f"tool-name:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELD_OUT_NAME_PERCENT


def _styled(words: list[str], rng: random.Random) -> str:
    style = rng.random()
    if style < 0.6:
        return "_".join(words)
    if style < 0.85:
        return words[0] + "".join(w.capitalize() for w in words[1:])
    return "".join(w.capitalize() for w in words)


# Share of training tools named letter by letter: a name no part of which means anything can only be got right
# by copying it from the tool list, which is what an unseen name needs (built from parts alone, the first
# trained model wrote names after the parts it knew: `values_sub` for a tool listed as `difference`).
SPELLED_NAME_PERCENT = 60
_CONSONANTS = "bcdfghjklmnprstvwxz"
_VOWELS = "aeiouy"


def spelled_name(rng: random.Random) -> str:
    """A tool name of one to three made-up words drawn letter by letter (``vokel``, ``zarim_tus``, ``quoFen2``)."""
    words = []
    for _ in range(rng.choice((1, 2, 2, 3))):
        start = rng.randint(0, 1)  # consonant and vowel in turns: pronounceable, still meaningless
        letters = [rng.choice(_CONSONANTS if (i + start) % 2 == 0 else _VOWELS) for i in range(rng.randint(2, 7))]
        words.append("".join(letters))
    name = _styled(words, rng)
    return name + str(rng.randint(0, 9)) if rng.random() < 0.15 else name


def make_name(verbs: tuple[str, ...], nouns: tuple[str, ...], rng: random.Random, held_out: bool) -> str:
    """A tool name from parts (``get_weather``, ``weatherLookup``), on the requested side of the split; on the
    training side, :data:`SPELLED_NAME_PERCENT` of them are spelled letter by letter instead."""
    spelled = not held_out and rng.randrange(100) < SPELLED_NAME_PERCENT
    for _ in range(1000):
        if spelled:
            name = spelled_name(rng)
        else:
            verb, noun = rng.choice(verbs), rng.choice(nouns)
            words = [w for w in (verb, noun) if w] if rng.random() < 0.7 else [w for w in (noun, verb) if w]
            name = _styled(" ".join(words).split(), rng)
        if name and name_is_held_out(name) == held_out:
            return name
    raise RuntimeError("no tool name on the requested side of the split")


# ----------------------------------------------------------------------------------------------------
# Values the arguments take (copied from the question into the call).
# ----------------------------------------------------------------------------------------------------

CITIES = ("San Francisco, CA", "Paris", "Tokyo", "New York", "Berlin", "Lagos", "São Paulo", "Zürich", "Mumbai",
          "Cairo", "Sydney", "Toronto", "Reykjavík", "Lima", "Seoul", "Nairobi", "Oslo", "Madrid", "Kraków",
          "Hanoi", "Boston, MA", "Austin, TX", "Québec", "Dubai", "Auckland", "北京", "東京", "Москва")
_CJK = "".join(chr(c) for c in range(0x4E00, 0x9FA6))  # CJK unified ideographs
_KANA = "".join(chr(c) for c in (*range(0x3041, 0x3094), *range(0x30A1, 0x30F4)))  # hiragana and katakana
_CYRILLIC = "абвгдежзийклмнопрстуфхцчшщыэюя"
_LATIN = "abcdefghijklmnopqrstuvwxyzéèüöñ"
_SUFFIXES = ("集团", "株式会社", " Ltd", " GmbH", " Inc.", " ООО", " & Co", " SA")


def random_name(rng: random.Random) -> str:
    """A company or person name in one of several scripts, to be copied verbatim into a call."""
    script = rng.random()
    if script < 0.3:
        core = "".join(rng.choice(_CJK) for _ in range(rng.randint(2, 4)))
    elif script < 0.45:
        core = "".join(rng.choice(_KANA) for _ in range(rng.randint(3, 5)))
    elif script < 0.6:
        core = "".join(rng.choice(_CYRILLIC) for _ in range(rng.randint(4, 8))).capitalize()
    else:
        core = "".join(rng.choice(_LATIN) for _ in range(rng.randint(4, 9))).capitalize()
    return core + (rng.choice(_SUFFIXES) if rng.random() < 0.5 else "")


_TOPICS = ("the history of tea", "cheap flights to Rome", "Python list comprehensions", "the tallest mountain",
           "vegan lasagna recipes", "electric cars", "the rules of chess", "solar panels", "jazz in the 1950s",
           "how bees make honey", "the best hiking boots", "black holes", "Mamba state space models")
_PEOPLE = ("alice@example.com", "bob@example.org", "team@acme.io", "Dr. Chen", "Maria", "the support team")
_FIRST_NAMES = ("Alice", "Bob", "Maria", "Kenji", "Amara", "Lucas", "Priya", "Olga", "Tom", "Fatima", "Wei", "Sara")
_DOMAINS = ("example.com", "example.org", "acme.io", "mail.net")
_MESSAGES = ("the meeting moved to 3 pm", "I will be late", "the report is ready", "thanks for your help",
             "lunch on Friday?", "the build is green")
_LANGS = ("French", "German", "Spanish", "Japanese", "Italian", "Swahili", "Korean", "Portuguese", "Dutch", "Turkish",
          "Hindi", "Polish", "Greek", "Vietnamese", "Arabic", "Finnish")
_PHRASES = ("good morning", "where is the station?", "thank you very much", "see you tomorrow", "I love tea")
_TICKERS = ("MSFT", "AAPL", "NVDA", "TSLA", "AMZN", "GOOG", "IBM", "SAP")
_CURRENCIES = ("USD", "EUR", "JPY", "GBP", "CHF", "INR", "BRL")
_TASKS = ("call mom", "water the plants", "send the invoice", "book a dentist", "buy milk", "stretch")
_TIMES = ("9 am", "noon", "5:30 pm", "tomorrow at 8", "Monday morning", "in 20 minutes")
_NATIONALITIES = ("Chinese", "Japanese", "German", "Brazilian", "Russian", "Kenyan", "French", "Indian", "Mexican",
                  "Korean", "Italian", "Egyptian", "Canadian", "Vietnamese", "Polish", "Argentine")
_TRADES = ("technology company", "company", "bakery", "car maker", "bookshop", "coffee farm", "software studio",
           "design agency", "shipping firm", "law office", "flower shop", "bank", "hotel chain", "toy maker",
           "tea house", "game studio")
_SIZES = ("small", "large", "family-run", "new", "local", "growing")


def _with_article(words: str) -> str:
    return ("an " if words[0] in "AEIOUaeiou" else "a ") + words


def recipient(rng: random.Random) -> str:
    """Whom an e-mail goes to: a name, an address, or a team."""
    shape = rng.random()
    if shape < 0.3:
        return rng.choice(_PEOPLE)
    first = rng.choice(_FIRST_NAMES)
    return first if shape < 0.6 else f"{first.lower()}@{rng.choice(_DOMAINS)}"


def company_description(rng: random.Random) -> str:
    """A customer's short description ("a Japanese company", "a small bakery in Lima"), drawn from thousands so
    that only copying it from the question gets it right."""
    trade = rng.choice(_TRADES)
    shape = rng.randrange(4)
    if shape == 0:
        return _with_article(f"{rng.choice(_NATIONALITIES)} {trade}")
    if shape == 1:
        return _with_article(f"{rng.choice(_SIZES)} {trade}")
    if shape == 2:
        return _with_article(f"{rng.choice(_SIZES)} {rng.choice(_NATIONALITIES)} {trade}")
    return f"{_with_article(trade)} in {rng.choice(CITIES)}"


@dataclass(frozen=True)
class Param:
    """One argument of an intent: its possible names, JSON type, and how a value is drawn."""

    names: tuple[str, ...]
    type: str
    draw: Callable[[random.Random], Any]
    description: str = ""


@dataclass(frozen=True)
class Intent:
    """A kind of tool: what a thought calls its requests, name parts, descriptions, parameters, questions, and a
    result it may return."""

    kind: str
    # What a thought calls the request before it names the tool ("Weather: call get_weather."). The tool is
    # picked at its name's first token; written just before it, the kind of request is what the tool list is
    # searched for (the eleventh run, which named the tool at once, picked another kind's tool in 9 of 400
    # held-out requests; the twelfth, which names the kind first, in 2).
    request: str
    verbs: tuple[str, ...]
    nouns: tuple[str, ...]
    descriptions: tuple[str, ...]
    params: tuple[Param, ...]
    questions: tuple[str, ...]  # fields {0}, {1}, ... are the argument values; {name} the tool's name
    results: tuple[str, ...]


INTENTS: tuple[Intent, ...] = (
    Intent("weather", "Weather",
           ("get", "fetch", "lookup", "check", "current", "read", "query", ""),
           ("weather", "forecast", "weather report", "conditions"),
           ("Get the weather at a location.", "Get the current weather for a city.",
            "Return today's weather forecast for a place.", "Look up the weather conditions somewhere."),
           (Param(("location", "city", "place", "where"), "string", lambda r: r.choice(CITIES), "The city"),),
           ("What is the weather in {0}?", "What's the weather like in {0}?", "Is it raining in {0}?",
            "Tell me the weather in {0}.", "How is the weather in {0} today?", "Weather in {0}, please."),
           ("It's sunny.", "Cloudy, 18°C", '{"temp": 21, "sky": "clear"}', "Light rain, 12°C", "Snow, -3°C")),
    Intent("function", "Function",
           ("magic", "mystery", "special", "secret", "apply", "compute", "blend", "twist"),
           ("function", "fn", "op", "transform", "value", ""),
           ("Apply a magic function to an input.", "Compute a special function of a number.",
            "Apply the transform to an integer.", "Return the mystery value of a number."),
           (Param(("input", "x", "n", "value", "number", "arg"), "integer", lambda r: r.randint(-20, 999)),),
           ("What is the value of {name}({0})? Use the tool.", "Call {name} with {0}.", "Use {name} on {0}.",
            "What does {name} return for {0}?", "Compute {name}({0}) with the tool."),
           ("5", "42", "-7", "1000", "3.5")),
    Intent("customer", "New customer",
           ("create", "add", "new", "register", "make", ""),
           ("customer", "client", "company", "account", "unicode customer"),
           ("Tool for creating a customer with Unicode name.\n\n    Args:\n        {0}: The customer's name in "
            "their native language.\n        {1}: Description of the customer.\n\n    Returns:\n        A "
            "confirmation message about the customer creation.", "Create a new customer record.",
            "Register a client by name with a short description."),
           (Param(("customer_name", "name", "client_name", "company_name"), "string", random_name),
            Param(("description", "details", "about", "note"), "string", company_description)),
           ("Create a customer named '{0}' - {1}", "Create a customer named '{0}' (a customer) - {1}",
            "Please register the client '{0}', {1}.", "Add a customer called '{0}': {1}."),
           ("Created customer.", "OK", '{"id": 1042}', "Customer created.")),
    Intent("search", "Web search",
           ("search", "find", "lookup", "query", "web"), ("web", "internet", "docs", "search", ""),
           ("Search the web for a query.", "Find pages about a topic.", "Run a web search and return results."),
           (Param(("query", "q", "topic", "text"), "string", lambda r: r.choice(_TOPICS)),),
           ("Search for {0}.", "Look up {0} on the web.", "Find information about {0}.", "Search the web: {0}"),
           ("3 results found.", '["Result one", "Result two"]', "Top hit: an encyclopedia article.")),
    Intent("email", "E-mail",
           ("send", "write", "post", "notify", ""), ("email", "mail", "message", "note"),
           ("Send an email to someone.", "Send a short message to a person.", "Deliver an e-mail."),
           (Param(("to", "recipient", "address"), "string", recipient),
            Param(("body", "text", "message", "content"), "string", lambda r: r.choice(_MESSAGES))),
           ("Send an email to {0} saying {1}.", "Tell {0} that {1}.", "Message {0}: {1}"),
           ("Sent.", "OK", '{"status": "sent"}')),
    Intent("currency", "Currency conversion",
           ("convert", "exchange", "fx", ""), ("currency", "money", "rate", "currencies"),
           ("Convert an amount between currencies.", "Exchange money from one currency to another."),
           (Param(("amount", "value", "sum"), "integer", lambda r: r.choice([5, 10, 20, 50, 100, 250, 1200])),
            Param(("from_currency", "source", "from_code"), "string", lambda r: r.choice(_CURRENCIES)),
            Param(("to_currency", "target", "to_code"), "string", lambda r: r.choice(_CURRENCIES))),
           ("Convert {0} {1} to {2}.", "How much is {0} {1} in {2}?", "Exchange {0} {1} into {2}."),
           ("92.5", "1 = 0.91", '{"converted": 118.2}')),
    Intent("translate", "Translation",
           ("translate", "convert", ""), ("text", "phrase", "language", "translator"),
           ("Translate text into another language.", "Translate a phrase.", "Machine translation of text."),
           (Param(("text", "phrase", "source_text"), "string", lambda r: r.choice(_PHRASES)),
            Param(("target_language", "language", "lang", "to"), "string", lambda r: r.choice(_LANGS))),
           ("Translate '{0}' into {1}.", "How do you say '{0}' in {1}?", "Translate '{0}' to {1}, please."),
           ("Bonjour", "Guten Morgen", "ありがとう", "Hola")),
    Intent("time", "Local time",
           ("get", "current", "local", "lookup", ""), ("time", "clock", "local time", "time now"),
           ("Get the current local time in a city.", "Return the time of day somewhere."),
           (Param(("city", "location", "timezone", "place"), "string", lambda r: r.choice(CITIES)),),
           ("What time is it in {0}?", "Current time in {0}?", "Tell me the local time in {0}."),
           ("14:05", "9:30 am", "23:12")),
    Intent("stock", "Stock price",
           ("get", "fetch", "lookup", "quote", ""), ("stock price", "quote", "share price", "ticker"),
           ("Get the latest stock price for a ticker symbol.", "Return a share price."),
           (Param(("ticker", "symbol", "stock"), "string", lambda r: r.choice(_TICKERS)),),
           ("What is the stock price of {0}?", "How much is {0} trading at?", "Get me a quote for {0}."),
           ("412.30", "$188.10", '{"price": 97.5}')),
    Intent("reminder", "Reminder",
           ("set", "create", "add", "schedule", ""), ("reminder", "alarm", "todo", "task"),
           ("Set a reminder for a task at a time.", "Schedule a reminder."),
           (Param(("task", "what", "title"), "string", lambda r: r.choice(_TASKS)),
            Param(("time", "when", "at"), "string", lambda r: r.choice(_TIMES))),
           ("Remind me to {0} at {1}.", "Set a reminder: {0}, {1}.", "Please remind me to {0} {1}."),
           ("Reminder set.", "OK", '{"id": 7}')),
)

# What a thought calls an operation after its operands, before it names the tool ("first 3 + 4, a sum, with
# add."), as ``Intent.request`` does for a request.
OPERATION_NAMES = {"+": "a sum", "-": "a difference", "*": "a product", "/": "a quotient"}

# Arithmetic tools: (operation symbol, name parts, descriptions, how the question may spell the operation).
ARITHMETIC: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "+": (("add", "sum", "plus", "addition"), ("", "numbers", "two", "ints", "values"),
          ("Add two integers.", "Return the sum of two numbers.", "Adds two numbers together.")),
    "-": (("subtract", "minus", "difference", "sub"), ("", "numbers", "two", "ints", "values"),
          ("Subtract the second integer from the first.", "Return the difference of two numbers.")),
    "*": (("multiply", "times", "product", "mul"), ("", "numbers", "two", "ints", "values"),
          ("Multiply two integers.", "Return the product of two numbers.", "Multiplies two numbers.")),
    "/": (("divide", "quotient", "div"), ("", "numbers", "two", "ints"),
          ("Divide the first integer by the second.", "Return the quotient of two numbers.")),
}
PLAIN_DESCRIPTIONS = {"+": "Add two integers.", "-": "Subtract two integers.", "*": "Multiply two integers.",
                      "/": "Divide two integers."}
ARG_PAIRS = (("a", "b"), ("x", "y"), ("first", "second"), ("left", "right"), ("num1", "num2"), ("m", "n"),
             ("lhs", "rhs"), ("p", "q"), ("value1", "value2"), ("n1", "n2"))
SYSTEM_PROMPTS = (None, "Use the tools for arithmetic.", "You are a helpful assistant.",
                  "Use the tools when they help.", "You are a helpful assistant with some tools.",
                  "Answer with the help of the tools.")


def _schema(params: list[tuple[str, str, str]], rng: random.Random) -> dict[str, Any]:
    """A JSON schema in one of the shapes LangChain or an OpenAI client send."""
    props = {}
    for name, typ, desc in params:
        prop: dict[str, Any] = {"type": typ}
        if desc and rng.random() < 0.3:
            prop = {"description": desc, "type": typ} if rng.random() < 0.5 else {"type": typ, "description": desc}
        props[name] = prop
    required = [name for name, _, _ in params]
    if rng.random() < 0.6:  # LangChain's order
        return {"properties": props, "required": required, "type": "object"}
    return {"type": "object", "properties": props, "required": required}


@dataclass
class Tool:
    """A generated tool: its definition, and (for arithmetic) the operation it performs."""

    name: str
    description: str
    arg_names: list[str]
    schema: dict[str, Any]
    intent: Intent | None = None
    op: str | None = None

    def definition(self) -> dict[str, Any]:
        """The ``{"type": "function", ...}`` dict the LangChain model and the server pass on."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.schema}}


def intent_tool(intent: Intent, rng: random.Random, held_out: bool) -> Tool:
    """A tool of ``intent`` with a freshly drawn name, argument names and schema."""
    name = make_name(intent.verbs, intent.nouns, rng, held_out)
    args = []
    for p in intent.params:
        choice = rng.choice(p.names)
        while choice in args:
            choice = rng.choice(p.names)
        args.append(choice)
    description = rng.choice(intent.descriptions).format(*args)
    schema = _schema([(a, p.type, p.description) for a, p in zip(args, intent.params, strict=True)], rng)
    return Tool(name, description, args, schema, intent=intent)


def arithmetic_tool(op: str, rng: random.Random, held_out: bool, plain: bool = False) -> Tool:
    """An arithmetic tool for ``op``; ``plain`` gives the README's spelling (``add(a, b)``, ``multiply(a, b)``)."""
    verbs, nouns, descriptions = ARITHMETIC[op]
    if plain:
        name, args = verbs[0], ["a", "b"]
        description = PLAIN_DESCRIPTIONS[op]
    else:
        name = make_name(verbs, nouns, rng, held_out)
        args = list(rng.choice(ARG_PAIRS))
        description = rng.choice(descriptions)
    schema = _schema([(a, "integer", "") for a in args], rng)
    return Tool(name, description, args, schema, op=op)


def system_message(tools: list[Tool], rng: random.Random) -> dict[str, str]:
    """The system turn carrying the tools, as :func:`phi4flash.tools.attach_tools` writes it."""
    prompt = rng.choice(SYSTEM_PROMPTS)
    messages = [{"role": "system", "content": prompt}] if prompt else []
    return tool_format.attach_tools(messages, [t.definition() for t in tools])[0]


def call_thought(tool: Tool) -> str:
    """The thought before a request's call of ``tool``: the kind of request, then the tool it picks."""
    assert tool.intent is not None
    return f"{tool.intent.request}: call {tool.name}."


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """The call as the model writes it: ``<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>``."""
    payload = json.dumps([{"name": name, "arguments": arguments}], ensure_ascii=False)
    return f"{tool_format.TOOL_CALL_OPEN}{payload}{tool_format.TOOL_CALL_CLOSE}"


def expected_call(name: str, arguments: dict[str, Any]) -> str:
    """The canonical value of a call example (what the evaluator compares the parsed call with)."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, sort_keys=True)


# ----------------------------------------------------------------------------------------------------
# Conversations.
# ----------------------------------------------------------------------------------------------------


def _distractors(rng: random.Random, held_out: bool, avoid: set[str], count: int) -> list[Tool]:
    """Other tools in the set: intents and arithmetic operations the request does not need."""
    out: list[Tool] = []
    kinds = [i for i in INTENTS if i.kind not in avoid]
    ops = [op for op in ARITHMETIC if op not in avoid]
    for _ in range(count):
        if ops and rng.random() < 0.3:
            op = rng.choice(ops)
            ops.remove(op)
            out.append(arithmetic_tool(op, rng, held_out))
        elif kinds:
            intent = rng.choice(kinds)
            kinds.remove(intent)
            out.append(intent_tool(intent, rng, held_out))
    return out


def _history(calls: list[tuple[str, dict[str, Any], str]]) -> list[dict[str, str]]:
    """Earlier calls and their results, as the LangChain model and the server send them back."""
    out: list[dict[str, str]] = []
    for name, args, result in calls:
        out.append(tool_format.assistant_message("", [(name, args)]))
        out.append(tool_format.tool_result_message(result))
    return out


def intent_chat(rng: random.Random, held_out: bool, answer_turn: bool | None = None) -> Made:
    """A request one tool of the set fulfils: the call (or, after its result, the report)."""
    intent = rng.choice(INTENTS)
    target = intent_tool(intent, rng, held_out)
    tools = [target, *_distractors(rng, held_out, {intent.kind}, rng.choice([0, 0, 1, 1, 2]))]
    rng.shuffle(tools)
    values = [p.draw(rng) for p in intent.params]
    question = rng.choice(intent.questions).format(*values, name=target.name)
    args = dict(zip(target.arg_names, values, strict=True))
    prompt = [system_message(tools, rng), {"role": "user", "content": question}]
    if answer_turn is None:
        answer_turn = not held_out and rng.random() < 0.25
    if answer_turn:
        result = rng.choice(intent.results)
        messages = (*prompt, *_history([(target.name, args, result)]))
        return Made(f"tool:{target.name}:answer", question, f"{target.name} returned a result.",
                    f"{target.name} returned: {result}", "", messages=messages)
    return Made(f"tool:{target.name}:{question}", question, call_thought(target), call_text(target.name, args),
                expected_call(target.name, args), messages=tuple(prompt))


_SYMBOLS = {"+": ("+",), "-": ("-",), "*": ("*", "×"), "/": ("/",)}


def apply_op(op: str, a: int, b: int) -> int:
    """``a op b`` for the four operations (division is exact in the generated expressions)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b


def _operands(op: str, rng: random.Random) -> tuple[int, int]:
    """The two operands of a first operation ``op``: an exact division, a small product, no negative difference."""
    if op == "/":
        b = rng.randint(2, 12)
        return b * rng.randint(1, 20), b
    if op == "*":
        return rng.randint(2, 30), rng.randint(2, 12)
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    return (b, a) if op == "-" and a < b else (a, b)


def draw_expression(rng: random.Random) -> tuple[str, list[tuple[str, int | None, int | None]]]:
    """An expression and its steps: (op, left, right), where None stands for the previous step's result."""
    ops = list(ARITHMETIC)
    op1 = rng.choice(ops)
    sym = {op: rng.choice(_SYMBOLS[op]) for op in ops}
    a, b = _operands(op1, rng)
    form = rng.random()
    if form < 0.35:
        return f"{a} {sym[op1]} {b}", [(op1, a, b)]
    op2 = rng.choice([op for op in ops if op != "/"])
    c = rng.randint(2, 9) if op2 == "*" else rng.randint(1, 60)
    first = apply_op(op1, a, b)
    if op2 == "-" and first < c:
        c = rng.randint(0, max(0, first)) or 1
        if first < c:
            op2 = "+"
    if form < 0.8:
        return f"({a} {sym[op1]} {b}) {sym[op2]} {c}", [(op1, a, b), (op2, None, c)]
    # c op2 (a op1 b): the bracket first, then the result on the right
    if op2 == "-" and c < first:
        c = first + rng.randint(0, 40)
    return f"{c} {sym[op2]} ({a} {sym[op1]} {b})", [(op1, a, b), (op2, c, None)]


def _substituted(expr: str, value: int) -> str:
    """``expr`` with its bracketed part (the first step; expressions have two at most) replaced by its ``value``:
    ``(3 + 4) * 5`` -> ``7 * 5``."""
    start, end = expr.find("("), expr.find(")")
    return expr if start < 0 else f"{expr[:start]}{value}{expr[end + 1:]}"


_ARITH_QUESTIONS = ("What is {e}?", "Compute {e}.", "Use the tools to work out {e}.", "Calculate {e} with the tools.",
                    "What is {e}? Use the tools.", "{e} = ?")
_WORDED = {"+": ("Add {a} and {b}.", "What is the sum of {a} and {b}?"),
           "-": ("Subtract {b} from {a}.", "What is {a} minus {b}?"),
           "*": ("Multiply {a} by {b}.", "What is the product of {a} and {b}?", "What is {a} times {b}?"),
           "/": ("Divide {a} by {b}.", "What is {a} divided by {b}?")}


@dataclass(frozen=True)
class Reply:
    """One assistant turn of a request: the thought, the text after it (a call or an answer), the value it is
    graded against, and for a call the tool, its arguments and the result that comes back."""

    thought: str
    text: str
    value: str
    tool: str = ""
    arguments: dict[str, Any] | None = None
    result: str | None = None


def _calculation(expr: str, steps: list[tuple[str, int | None, int | None]], tools_by_op: dict[str, Tool],
                 rng: random.Random, upto: int) -> list[Reply]:
    """The replies of a calculation with arithmetic tools up to step ``upto``: each step's call (the ones before
    ``upto`` with their results), or at ``upto == len(steps)`` every call and then the boxed answer."""
    replies: list[Reply] = []
    results: list[int] = []
    for i, (op, left, right) in enumerate(steps[:upto + 1]):
        lhs = results[-1] if left is None else left
        rhs = results[-1] if right is None else right
        tool = tools_by_op[op]
        args = {tool.arg_names[0]: lhs, tool.arg_names[1]: rhs}
        if i == 0:
            thought = f"{expr}: first {lhs} {op} {rhs}, {OPERATION_NAMES[op]}, with {tool.name}."
        else:  # the expression restated with the result in place, so the next operation is read off it
            thought = (f"{replies[-1].tool} gave {results[-1]}, so {expr} = {_substituted(expr, results[-1])}. "
                       f"Next {lhs} {op} {rhs}, {OPERATION_NAMES[op]}, with {tool.name}.")
        call = Reply(thought, call_text(tool.name, args), expected_call(tool.name, args), tool.name, args)
        if i == upto:
            return [*replies, call]
        results.append(apply_op(op, lhs, rhs))
        result = str(results[-1]) if rng.random() < 0.85 else json.dumps({"result": results[-1]})
        replies.append(replace(call, result=result))
    return [*replies, Reply(f"{replies[-1].tool} gave {results[-1]}, the last step.",
                            f"{expr} = \\boxed{{{results[-1]}}}", str(results[-1]))]


def _calls_written_back(replies: list[Reply]) -> list[dict[str, str]]:
    """Earlier calls of a request and their results, as the LangChain model and the server send them back."""
    return _history([(r.tool, r.arguments or {}, r.result or "") for r in replies])


def arithmetic_chat(rng: random.Random, held_out: bool, stage: int | None = None) -> Made:
    """Arithmetic with arithmetic tools: the call of step ``stage`` (after the earlier ones), or the answer."""
    expr, steps = draw_expression(rng)
    needed = list(dict.fromkeys(op for op, _, _ in steps))
    plain = not held_out and rng.random() < 0.35
    tools_by_op = {op: arithmetic_tool(op, rng, held_out, plain) for op in needed}
    tools = [*tools_by_op.values(), *_distractors(rng, held_out, set(needed), rng.choice([0, 1, 1, 2]))]
    rng.shuffle(tools)
    if len(steps) == 1 and rng.random() < 0.3:
        op, a, b = steps[0]
        question = rng.choice(_WORDED[op]).format(a=a, b=b)
    else:
        question = rng.choice(_ARITH_QUESTIONS).format(e=expr)
    if stage is None:
        stage = rng.randrange(len(steps) + (0 if held_out else 1))
    *done, last = _calculation(expr, steps, tools_by_op, rng, stage)
    messages = (system_message(tools, rng), {"role": "user", "content": question}, *_calls_written_back(done))
    key = f"tool:{expr}:{stage if stage < len(steps) else 'answer'}"
    return Made(key, question, last.thought, last.text, last.value, messages=messages)


def _single_operation(op: str, rng: random.Random) -> tuple[str, str, int, int]:
    """A request for one operation: its question, the expression, and the two operands."""
    a, b = _operands(op, rng)
    expr = f"{a} {rng.choice(_SYMBOLS[op])} {b}"
    if rng.random() < 0.3:
        return rng.choice(_WORDED[op]).format(a=a, b=b), expr, a, b
    return rng.choice(_ARITH_QUESTIONS).format(e=expr), expr, a, b


def _turn(reasoning: str, answer: str) -> dict[str, str]:
    """An assistant turn written whole, reasoning included (as the completion of a chat is)."""
    return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n{answer}"}


SESSION_REQUESTS = (2, 3, 3, 4)
# Share of a session's arithmetic requests that are calculations of two steps (the first call's result is the
# next call's argument), and share of sessions with one request that no tool of the list fits: without them,
# a large session share took those two lessons, which only the single tool chats teach, away from the model
# (the ninth run: agent chains 23 of 30, no tool fits 86%).
SESSION_CALCULATION_PERCENT = 40
SESSION_DIRECT_PERCENT = 30


class DirectQuestion(NamedTuple):
    """A question no tool of a list fits, answered as without tools, and the tool kinds (intents and
    operations) that would fit it."""

    question: str
    reasoning: str
    answer: str
    value: str
    fits: frozenset[str]


Plan = Callable[[], tuple[str, list[Reply]]]
"""A request of a session, written when its turn comes (after the tool list): its question and replies."""


def _two_step_expression(op: str, rng: random.Random) -> tuple[str, list[tuple[str, int | None, int | None]]]:
    """An expression of two operations, one of them ``op`` (a single operation if none is drawn in 200 tries)."""
    for _ in range(200):
        expr, steps = draw_expression(rng)
        if len(steps) == 2 and op in (steps[0][0], steps[1][0]):
            return expr, steps
    _, expr, a, b = _single_operation(op, rng)
    return expr, [(op, a, b)]


def _session_plan(kind: Intent | str, tool: Tool, rng: random.Random, tools_by_op: dict[str, Tool]) -> Plan:
    """How one request of a session for ``tool`` is written: tools a calculation needs join ``tools_by_op``
    now (the tool list is written before the requests), the request itself later."""
    if isinstance(kind, str) and rng.randrange(100) < SESSION_CALCULATION_PERCENT:
        expr, steps = _two_step_expression(kind, rng)
        for op, _, _ in steps:
            tools_by_op.setdefault(op, arithmetic_tool(op, rng, False))
        question = rng.choice(_ARITH_QUESTIONS).format(e=expr)
        return lambda: (question, _calculation(expr, steps, tools_by_op, rng, len(steps)))
    return lambda: _session_request(tool, rng)


def _session_request(tool: Tool, rng: random.Random) -> tuple[str, list[Reply]]:
    """One request of a session for ``tool`` alone: the question, the call (with the tool's result) and the
    report written after it."""
    if tool.op is not None:
        question, expr, a, b = _single_operation(tool.op, rng)
        return question, _calculation(expr, [(tool.op, a, b)], {tool.op: tool}, rng, 1)
    assert tool.intent is not None
    values = [p.draw(rng) for p in tool.intent.params]
    question = rng.choice(tool.intent.questions).format(*values, name=tool.name)
    result = rng.choice(tool.intent.results)
    args = dict(zip(tool.arg_names, values, strict=True))
    return question, [Reply(call_thought(tool), call_text(tool.name, args), expected_call(tool.name, args),
                            tool.name, args, result),
                      Reply(f"{tool.name} returned a result.", f"{tool.name} returned: {result}", "")]


def _answered_directly(unfit: DirectQuestion) -> Plan:
    """The request that no tool of the session's list fits, answered without a call."""
    return lambda: (unfit.question, [Reply(unfit.reasoning, unfit.answer, unfit.value)])


def _kind_name(kind: Intent | str) -> str:
    """An intent's kind or an operation's symbol: what ``_distractors`` and ``DirectQuestion.fits`` name."""
    return kind if isinstance(kind, str) else kind.kind


def _written_out(replies: list[Reply]) -> list[dict[str, str]]:
    """A session's replies as its turns: each reply whole (reasoning included), each call followed by its
    result."""
    turns = []
    for reply in replies:
        turns.append(_turn(reply.thought, reply.text))
        if reply.result is not None:
            turns.append(tool_format.tool_result_message(reply.result))
    return turns


def session_chat(rng: random.Random, direct: Callable[[random.Random], DirectQuestion] | None = None) -> Made:
    """Several requests on one tool list (training side only): each for a different tool of the list (or, for
    an arithmetic tool, at times a calculation of two steps with it), and in some sessions one request that no
    tool fits (drawn by ``direct``), answered without a call. Every reply of the earlier requests is written
    out; of the last request, the turn to write is one of its calls (or, at times, its report).

    Every assistant turn of a session is meant to be trained (``Example.trained_history``): the tool list, the
    longest part of a tool chat, is then read once for several calls, so a minute of training sees more of
    what an unseen tool name needs, finding the tool that fits a request in the list.
    """
    n = rng.choice(SESSION_REQUESTS)
    unfit = direct(rng) if direct is not None and rng.randrange(100) < SESSION_DIRECT_PERCENT else None
    pool: list[Intent | str] = [*INTENTS, *ARITHMETIC]
    if unfit is not None:
        pool = [k for k in pool if _kind_name(k) not in unfit.fits]
    kinds = rng.sample(pool, n - (unfit is not None))
    targets = [arithmetic_tool(k, rng, False) if isinstance(k, str) else intent_tool(k, rng, False) for k in kinds]
    tools_by_op = {t.op: t for t in targets if t.op is not None}
    plans = [_session_plan(k, t, rng, tools_by_op) for k, t in zip(kinds, targets, strict=True)]
    if unfit is not None:
        plans.insert(rng.randint(0, len(plans)), _answered_directly(unfit))
    avoid = {_kind_name(k) for k in kinds} | set(tools_by_op) | (unfit.fits if unfit else set())
    tools = [*tools_by_op.values(), *(t for t in targets if t.op is None),
             *_distractors(rng, False, avoid, rng.choice([0, 0, 1]))]
    rng.shuffle(tools)
    messages: list[dict[str, str]] = [system_message(tools, rng)]
    for plan in plans[:-1]:
        question, replies = plan()
        messages += [{"role": "user", "content": question}, *_written_out(replies)]
    question, replies = plans[-1]()
    if len(replies) == 1 or rng.random() < 0.8:  # one of the calls, else the report
        cut = rng.randrange(max(1, len(replies) - 1))
    else:
        cut = len(replies) - 1
    messages += [{"role": "user", "content": question}, *_written_out(replies[:cut])]
    last = replies[cut]
    key = f"session:{last.tool or 'answer'}:{question}"
    return Made(key, question, last.thought, last.text, last.value, messages=tuple(messages))


def unrelated_tools(rng: random.Random, held_out: bool, exclude: set[str]) -> list[Tool]:
    """One to three tools that do not fit a request (``exclude`` names the intents and operations that would)."""
    return _distractors(rng, held_out, exclude, rng.randint(1, 2))


def with_tools(made: Made, tools: list[Tool], rng: random.Random) -> Made:
    """``made`` (a question answered without tools) asked with ``tools`` in the system turn."""
    messages = (system_message(tools, rng), {"role": "user", "content": made.question})
    return made._replace(messages=messages)
