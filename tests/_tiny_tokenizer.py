"""A small byte-level BPE chat tokenizer trained in-process, with the Phi-4 special and tool tokens
(for the tool and constrained-decoding tests: no download and no checkpoint needed)."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from phi4flash.tokenizer import ChatTokenizer

# (text, special) in the checkpoint's order; ids follow the trained vocabulary.
SPECIAL = [
    ("<|endoftext|>", True),
    ("<|assistant|>", True),
    ("<|end|>", True),
    ("<|user|>", True),
    ("<|system|>", True),
    ("<|tool|>", False),
    ("<|/tool|>", False),
    ("<|tool_call|>", False),
    ("<|/tool_call|>", False),
    ("<|tool_response|>", False),
]

CORPUS = [
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "<think>Let me think about this step by step.</think>The answer is 42.",
    "The quick brown fox jumps over the lazy dog. 0123456789 3.14 -7 1e5",
    '{"setup": "Why did the chicken cross the road?", "punchline": "To get to the other side!"}',
    "日本語のテキスト 中文文本 émoji 🎉 naïve café",
    '[1, 2, 3] {"a": true, "b": false, "c": null} "quoted \\"escape\\" \\n \\u00e9"\n\n',
]

TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


@functools.lru_cache(maxsize=1)
def tiny_chat_tokenizer() -> ChatTokenizer:
    """A ~600-token byte-level BPE ChatTokenizer with Phi's chat template and added tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    first = tok.get_vocab_size()
    added = {first + k: {"content": text, "special": special} for k, (text, special) in enumerate(SPECIAL)}
    return ChatTokenizer(tok, added, TEMPLATE, "<|endoftext|>")
