"""A small byte-level BPE tokenizer for the embedded model, with the real model's special tokens.

Digits are always single tokens (so the model sees every digit on its own, as the reasoning templates
expect). Apart from digits, text is not split into words before BPE, so frequent phrases of the
reasoning templates (", carry ", ", so far ") become single tokens and sequences stay short.

The special and added tokens, their flags and the chat template are those of the real checkpoint
(architecture.md §6.2-6.3); they sit at the end of the vocabulary, in the real model's order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

# (content, special, rstrip) in the real model's id order (tokenizer_config.json's added_tokens_decoder).
SPECIAL_TOKENS: tuple[tuple[str, bool, bool], ...] = (
    ("<|endoftext|>", True, False),
    ("<|endofprompt|>", True, False),
    ("<|assistant|>", True, True),
    ("<|end|>", True, True),
    ("<|user|>", True, True),
    ("<|system|>", True, True),
    ("<|tool|>", False, True),
    ("<|/tool|>", False, True),
    ("<|tool_call|>", False, True),
    ("<|/tool_call|>", False, True),
    ("<|tool_response|>", False, True),
    ("<|tag|>", True, True),
)

# Copied verbatim from the real checkpoint's tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

EOS = "<|endoftext|>"
END = "<|end|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; the result has exactly ``vocab_size`` tokens.

    Args:
        texts: Training text (whole rendered chats are fine; special tokens in them are not learned as BPE).
        vocab_size: Total size including the 256 byte symbols and the 12 special tokens at the end.

    Returns:
        The tokenizer, ready to save.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    specials = [t for t, _, _ in SPECIAL_TOKENS]

    split = re.compile("|".join(re.escape(s) for s in specials))

    def plain() -> Iterable[str]:
        # Special tokens split the text when encoding, so no merge may span one: learn from the pieces.
        for text in texts:
            yield from (piece for piece in split.split(text) if piece)

    tok.train_from_iterator(plain(), trainer)
    # One at a time, so the ids follow SPECIAL_TOKENS' order exactly.
    for content, special, rstrip in SPECIAL_TOKENS:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=rstrip, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"trained vocabulary has {tok.get_vocab_size()} tokens, wanted {vocab_size} "
                         "(too little training text?)")
    return tok


def _token_entry(content: str, special: bool, rstrip: bool) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip, "single_word": False,
            "special": special}


def save_tokenizer_files(tok: Tokenizer, out_dir: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and added_tokens.json.

    The files follow the real checkpoint's, with this tokenizer's ids. ``tokenizer_class`` is
    ``PreTrainedTokenizerFast`` because the split rules live only in tokenizer.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    ids = {content: tok.token_to_id(content) for content, _, _ in SPECIAL_TOKENS}
    decoder = {str(ids[c]): _token_entry(c, s, r) for c, s, r in SPECIAL_TOKENS}
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": EOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": 65536,
        "pad_token": EOS,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": EOS,
    }
    plain = {"content": EOS, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special_map = {name: dict(plain) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    # Like the real added_tokens.json: the ten tokens after <|endofprompt|>.
    added = {c: ids[c] for c, _, _ in SPECIAL_TOKENS[2:]}
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special_map)
    _write_json(out / "added_tokens.json", added)


def generation_config(tok: Tokenizer) -> dict[str, Any]:
    """generation_config.json: stop on ``<|end|>`` or ``<|endoftext|>``, as the real model does."""
    eos = tok.token_to_id(EOS)
    return {"_from_model_config": True, "bos_token_id": eos, "eos_token_id": [tok.token_to_id(END), eos],
            "pad_token_id": eos, "transformers_version": "4.45.0"}


def model_config(tok: Tokenizer, **sizes: Any) -> dict[str, Any]:
    """config.json with the real checkpoint's keys (plus explicit ``mamba_*`` keys) and the given sizes.

    Args:
        tok: The tokenizer (for the special ids; the vocabulary is padded up to a multiple of 64).
        **sizes: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
            num_key_value_heads, sliding_window, mamba_d_state (any subset; the rest keep small defaults).
    """
    eos = tok.token_to_id(EOS)
    vocab = -(-tok.get_vocab_size() // 64) * 64
    cfg: dict[str, Any] = {
        "architectures": ["Phi4FlashForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_phi4flash.Phi4FlashConfig",
            "AutoModelForCausalLM": "modeling_phi4flash.Phi4FlashForCausalLM",
            "AutoTokenizer": "Xenova/gpt-4o",
        },
        "pad_token_id": eos,
        "bos_token_id": eos,
        "embd_pdrop": 0.0,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": 128,
        "initializer_range": 0.02,
        "intermediate_size": 512,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 262144,
        "_attn_implementation": "flash_attention_2",
        "mb_per_layer": 2,
        "model_type": "phi4flash",
        "num_attention_heads": 4,
        "num_hidden_layers": 8,
        "num_key_value_heads": 2,
        "resid_pdrop": 0.0,
        "sliding_window": 64,
        "torch_dtype": "float32",
        "tie_word_embeddings": True,
        "transformers_version": "4.46.1",
        "use_cache": True,
        "mlp_bias": False,
        "lm_head_bias": False,
        "vocab_size": vocab,
        "mamba_d_state": 16,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
        "mamba_dt_rank": "auto",
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
    }
    unknown = set(sizes) - set(cfg)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}")
    cfg.update(sizes)
    return cfg


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented UTF-8 JSON with a trailing newline."""
    _write_json(Path(path), data)
