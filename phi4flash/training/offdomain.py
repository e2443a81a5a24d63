"""Questions outside the embedded model's domain, answered honestly (family ``offdomain``).

A greeting, a question about the model, a poem, a fact, a recipe, code, a translation without a tool, or
arithmetic on numbers bigger than the math families' ranges: the reply says, in a few fixed words, that this
is a tiny demo model for arithmetic and algebra and what to ask.
Prompts are built from templates and fillers (numbers included, so that a digit in a question does not
mean arithmetic); the held-out side is decided by a hash of the prompt, and :data:`UNSEEN_PROMPTS` are
hand-written prompts no template produces, for the evaluation only.
"""

from __future__ import annotations

import random

from .steps import Made

HONEST_MARK = "tiny demo model"
EXAMPLES_TEXT = 'for example "What is 15% of 240?" or "Solve 2x^2 + 5x - 3 = 0"'
REPLIES = {
    "greeting": ("A greeting.",
                 f"Hello! I am a {HONEST_MARK} for arithmetic and algebra. Ask me a math problem, {EXAMPLES_TEXT}."),
    "identity": ("A question about me.",
                 f"I am a {HONEST_MARK} of the Phi4Flash architecture, trained only on arithmetic and algebra. "
                 f"Ask me a math problem, {EXAMPLES_TEXT}."),
    "ability": ("A question about what I can do.",
                f"I am a {HONEST_MARK} for arithmetic and algebra: sums, products, percentages, fractions, ratios, "
                f"linear and quadratic equations and small word problems. Try {EXAMPLES_TEXT}."),
    "thanks": ("Thanks from the user.",
               f"You are welcome! I am a {HONEST_MARK} for arithmetic and algebra; ask me another problem any time."),
    "toobig": ("These numbers are bigger than the ones I learned on.",
               f"That is bigger than I can work out reliably: I am a {HONEST_MARK} that adds and subtracts numbers "
               f"of up to 4 digits and multiplies a number up to 99 by one digit. Try a smaller problem, "
               f"{EXAMPLES_TEXT}."),
    "other": ("This is not arithmetic or algebra.",
              f"I am a {HONEST_MARK} for arithmetic and algebra, so I cannot help with that. Ask me a math problem, "
              f"{EXAMPLES_TEXT}."),
}

_TOPICS = ("the sea", "autumn", "my cat", "love", "a robot", "the moon", "coffee", "winter in Paris", "a lost key",
           "friendship", "the city at night", "dragons", "a rainy Monday", "mountains", "the ocean", "old trees",
           "summer", "a dog named Max", "space travel", "pizza", "the number 7", "3 little pigs", "time")
_COUNTRIES = ("France", "Japan", "Kenya", "Brazil", "Canada", "Peru", "Norway", "Egypt", "India", "Australia",
              "Germany", "Vietnam", "Chile", "Italy", "Mexico", "Spain")
_BOOKS = ("Hamlet", "Don Quixote", "1984", "Pride and Prejudice", "War and Peace", "The Hobbit", "Dracula")
_CONCEPTS = ("photosynthesis", "gravity", "democracy", "inflation", "machine learning", "quantum computing",
             "the stock market", "black holes", "DNA", "climate change", "blockchain", "the internet", "a Mamba model")
_TASKS = ("bake bread", "learn to swim", "fix a flat tire", "sleep better", "start running", "cook rice",
          "write a CV", "train a puppy", "learn French", "save money", "grow tomatoes", "tie a tie")
_LANGS = ("Python", "JavaScript", "Rust", "C++", "Java", "Go", "SQL", "Bash")
_CODE_TASKS = ("reverses a list", "sorts numbers", "reads a file", "checks if a word is a palindrome",
               "counts the words in a text", "downloads a web page", "parses JSON")
_PHRASES = ("good morning", "thank you", "where is the station?", "I love you", "see you tomorrow", "cheers")
_TARGETS = ("French", "German", "Spanish", "Japanese", "Italian", "Chinese", "Arabic")
_CITIES = ("London", "Tokyo", "New York", "Paris", "Berlin", "Lagos", "Mumbai", "Sydney", "Rome", "Cairo")
_THINGS = ("color", "movie", "book", "food", "song", "season", "animal", "sport", "city")
_EVENTS = ("the moon landing", "the French Revolution", "World War II", "the fall of the Berlin Wall",
           "the first Olympic Games")

# Operands past the arithmetic families' ranges (products of two numbers of 2-3 digits; sums of 5-6 digits),
# which the first trained model answered with confident nonsense ("12345 * 67" -> "1234 + 67 = 1301").
_FACTORS = tuple(str(n) for n in range(11, 1000, 13))
_HUGE = tuple(str(n) for n in range(10_007, 1_000_000, 7_919))

TEMPLATES: tuple[tuple[str, tuple[str, ...], tuple[tuple[str, ...], ...]], ...] = (
    ("toobig", ("What is {0} × {1}?", "What is {0} * {1}?", "Multiply {0} by {1}.", "Compute {0} × {1}.",
                "Calculate {0} times {1}."), (_FACTORS, _FACTORS)),
    ("toobig", ("What is {0} + {1}?", "Add {0} and {1}.", "What is {0} - {1}?", "Compute {0} + {1}."),
     (_HUGE, _HUGE)),
    ("greeting", ("Hi", "Hello", "Hey", "Hi!", "Hello!", "Good morning", "Good evening!", "Hey there",
                  "Hi, how are you?", "Hello, anyone there?", "Yo", "Howdy", "Hi there!", "Good afternoon",
                  "Hi, I'm {0}.", "Hello from {1}!"), (("Sam", "Lea", "Ravi", "Ana", "Kenji"), _CITIES)),
    ("identity", ("Who are you?", "What are you?", "What is your name?", "Are you ChatGPT?", "Which model are you?",
                  "Who made you?", "Are you a human?", "Are you an AI?", "What kind of model are you?",
                  "Tell me about yourself.", "How big are you?"), ()),
    ("ability", ("What can you do?", "Help", "How can you help me?", "What should I ask you?",
                 "What are you good at?", "What do you know?", "Can you help me?", "What can I ask?"), ()),
    ("thanks", ("Thanks", "Thank you", "Thanks!", "Great, thanks", "Thank you so much!", "Cheers",
                "Thanks for the help"), ()),
    ("other", ("Write a poem about {0}.", "Write a haiku about {0}.", "Tell me a story about {0}.",
               "Tell me a joke about {0}.", "Write a song about {0}.", "Compose a limerick about {0}.",
               "Write 3 lines about {0}.", "Describe {0} in 5 words."), (_TOPICS,)),
    ("other", ("What is the capital of {0}?", "What language do they speak in {0}?", "How many people live in {0}?",
               "Tell me 3 facts about {0}.", "What is the weather like in {0}?", "Plan a 7 day trip to {0}."),
     (_COUNTRIES,)),
    ("other", ("Who wrote {0}?", "Summarize {0}.", "Is {0} a good book?", "What is {0} about?"), (_BOOKS,)),
    ("other", ("What is {0}?", "Explain {0}.", "Explain {0} to a 5 year old.", "Why does {0} matter?",
               "Give me a short history of {0}."), (_CONCEPTS,)),
    ("other", ("How do I {0}?", "Give me tips to {0}.", "What is the best way to {0}?", "Can you help me {0}?"),
     (_TASKS,)),
    ("other", ("Write a {0} function that {1}.", "How do I write a {0} program that {1}?",
               "Show me {0} code that {1}."), (_LANGS, _CODE_TASKS)),
    ("other", ("Translate '{0}' into {1}.", "How do you say '{0}' in {1}?"), (_PHRASES, _TARGETS)),
    ("other", ("What time is it in {0}?", "What is the news in {0} today?", "Recommend a restaurant in {0}.",
               "What should I see in {0}?"), (_CITIES,)),
    ("other", ("What is your favorite {0}?", "Do you have a favorite {0}?", "Recommend a {0}."), (_THINGS,)),
    ("other", ("When did {0} happen?", "Who started {0}?", "What caused {0}?"), (_EVENTS,)),
    ("other", ("What happened in {0}?", "Who won the World Cup in {0}?", "What was popular in {0}?"),
     (("1969", "1989", "2004", "1998", "2010", "1914", "1850"),)),
    ("other", ("I'm bored.", "Tell me something interesting.", "What is the meaning of life?", "Do you dream?",
               "What should I eat for dinner?", "Sing me a song.", "Can you keep a secret?", "I feel sad today.",
               "What's up?", "Let's play a game.", "Why is the sky blue?", "How far away is the moon?",
               "What is the derivative of x^3?", "Integrate sin(x) from 0 to pi.", "Prove that 2 is prime.",
               "What is the speed of light?", "How many legs does a spider have?", "Who is the president?",
               "Write an email to my boss.", "Summarize this: the meeting is at 4 pm."), ()),
)

# Hand-written prompts for the evaluation only: no template above produces them.
UNSEEN_PROMPTS = (
    "Good night!", "Can you book me a table for two?", "What's your opinion on modern art?",
    "Write a short speech for my sister's wedding.", "Which phone should I buy?", "Explain how vaccines work.",
    "Give me a recipe for pancakes.", "Who discovered penicillin?", "Describe the color blue to a blind person.",
    "What is the tallest building in the world?", "Can you draw a cat?", "Let's talk about football.",
    "How do airplanes fly?", "Write a cover letter for a job at a bank.", "What are the rules of tennis?",
    "Tell me about the Roman Empire.", "Can you recommend a podcast?", "Hola, ¿cómo estás?",
    "Bonjour !", "What is 2 + 2 in binary? Just kidding, tell me a fun fact.", "Is it going to snow tomorrow?",
    "Hey, what's new?", "Write a tweet about climate action.", "Who painted the Mona Lisa?",
    "What do pandas eat?", "Explain the offside rule.", "How do I reset my password?",
    "Create a workout plan for 4 weeks.", "What's the difference between a virus and a bacterium?",
    "Name 5 famous scientists.", "Can you speak German?", "Thank you, that was helpful!",
    "What year is it?", "Please summarize the plot of Star Wars.", "Are you smarter than me?",
    "Good morning! Ready to work?", "Write a SQL query that selects all users.", "What is love?",
    "Recommend three books about history.", "How do I make my plants grow faster?",
)


def draw_prompt(rng: random.Random) -> tuple[str, str]:
    """(kind, prompt) from the templates."""
    kind, texts, fillers = rng.choice(TEMPLATES)
    text = rng.choice(texts)
    return kind, text.format(*(rng.choice(f) for f in fillers)) if fillers else text


def honest_made(prompt: str, kind: str = "other") -> Made:
    """The honest reply to ``prompt`` as a training example."""
    thought, reply = REPLIES[kind]
    return Made(f"offdomain:{prompt}", prompt, thought, reply, "")


def _make_offdomain(rng: random.Random) -> Made:
    kind, prompt = draw_prompt(rng)
    return honest_made(prompt, kind)
