"""Tokenizer loading (tokenizer.json, vocab+merges, vocab only), chat template, special/stop ids, and
the UTF-8-safe incremental detokenizer."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
from model_helpers import REFERENCE_CHECKPOINT
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tk_decoders

from phi4flash.tokenizer import ChatTokenizer, IncrementalDetokenizer, rebuild_merges

REAL = REFERENCE_CHECKPOINT
needs_real = pytest.mark.skipif(not (REAL / "vocab.json").is_file(), reason="reference checkpoint not present")

SAMPLES = [
    "Hello world! How to solve 3*x^2+4*x+5=1?",
    "日本語のテキストと中文字符 mixed with English.",
    "Emoji: 😀👍🏽🇫🇷 family 👨‍👩‍👧 done",
    "tabs\tand\n\nnewlines   and  spaces",
    "Ünïcödé àccents — dashes “quotes”",
]
CORPUS = SAMPLES * 20 + ["the quick brown fox jumps over the lazy dog " * 5, "def f(x):\n    return x + 1\n" * 5]


def _write_small(folder: Path, *, tokenizer_json: bool, merges: bool) -> Path:
    """Train a tiny byte-level BPE and write a checkpoint-style tokenizer folder around it.

    The special tokens and chat template copy the real checkpoint's, at ids just after the trained vocab.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))  # vocab.json + merges.txt
    if tokenizer_json:
        tok.save(str(folder / "tokenizer.json"))
    if not merges:
        (folder / "merges.txt").unlink()
    n = tok.get_vocab_size()
    real = json.loads((REAL / "tokenizer_config.json").read_text()) if REAL.is_dir() else None
    template = (
        real["chat_template"]
        if real
        else (
            "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
            "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
            "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
            "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
        )
    )
    names = [
        ("<|endoftext|>", True, False),
        ("<|assistant|>", True, True),
        ("<|end|>", True, True),
        ("<|user|>", True, True),
        ("<|system|>", True, True),
        ("<|tool|>", False, True),
        ("<|/tool|>", False, True),
    ]
    decoder = {
        str(n + k): {
            "content": c,
            "lstrip": False,
            "normalized": False,
            "rstrip": r,
            "single_word": False,
            "special": s,
        }
        for k, (c, s, r) in enumerate(names)
    }
    config = {
        "added_tokens_decoder": decoder,
        "chat_template": template,
        "eos_token": "<|endoftext|>",
        "bos_token": "<|endoftext|>",
        "tokenizer_class": "GPT2Tokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizer_small")
    return {
        "json": _write_small(root / "json", tokenizer_json=True, merges=True),
        "merges": _write_small(root / "merges", tokenizer_json=False, merges=True),
        "vocab": _write_small(root / "vocab", tokenizer_json=False, merges=False),
    }


@pytest.fixture(scope="module")
def real_tok() -> ChatTokenizer:
    if not (REAL / "vocab.json").is_file():
        pytest.skip("reference checkpoint not present")
    return ChatTokenizer.from_pretrained(REAL)


# ---------------------------------------------------------------- small trained tokenizer


@pytest.mark.parametrize("kind", ["json", "merges", "vocab"])
def test_small_round_trip_and_special_ids(small_dirs: dict[str, Path], kind: str) -> None:
    tok = ChatTokenizer.from_pretrained(small_dirs[kind], pretokenizer="gpt2" if kind == "vocab" else "auto")
    base = Tokenizer.from_file(str(small_dirs["json"] / "tokenizer.json"))
    n = base.get_vocab_size()
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == base.encode(text).ids  # same BPE whichever files it was loaded from
        assert tok.decode(ids) == text
    assert tok.token_to_id("<|user|>") == n + 3
    assert tok.encode("<|user|>hi<|end|>")[0] == n + 3
    assert tok.stop_token_ids == frozenset({n, n + 2})
    assert tok.eos_token_id == n
    assert tok.vocab_size == n + 7
    assert tok.special_token_ids == frozenset({n, n + 1, n + 2, n + 3, n + 4})


def test_rebuilt_merges_equal_trained_merges(small_dirs: dict[str, Path]) -> None:
    vocab = json.loads((small_dirs["merges"] / "vocab.json").read_text())
    lines = (small_dirs["merges"] / "merges.txt").read_text().splitlines()
    trained = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    assert rebuild_merges(vocab) == trained


def test_rebuild_rejects_unreachable_token() -> None:
    vocab = {"a": 0, "b": 1, "c": 2, "abc": 3}  # "abc" has no two-part split at lower ranks
    with pytest.raises(ValueError, match="abc"):
        rebuild_merges(vocab)


def test_missing_files_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ChatTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pretokenizer"):
        ChatTokenizer.from_pretrained(tmp_path, pretokenizer="bert")


def test_wrong_special_id_is_rejected(small_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(small_dirs["json"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # Claim an id already held by a regular BPE token.
    config["added_tokens_decoder"]["5"] = config["added_tokens_decoder"].popitem()[1]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="should have id"):
        ChatTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_utf8(small_dirs: dict[str, Path], skip: bool) -> None:
    tok = ChatTokenizer.from_pretrained(small_dirs["merges"])
    text = "<|user|>" + "".join(SAMPLES) + " 🧪漢字🤖 end<|end|>"
    ids = tok.encode(text)
    # The tiny vocab must really split characters across tokens, or the test proves nothing.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|end|>" in "".join(pieces)) is (not skip)


def test_incremental_detokenizer_invalid_bytes_flush(small_dirs: dict[str, Path]) -> None:
    tok = ChatTokenizer.from_pretrained(small_dirs["merges"])
    lead_byte = tok.token_to_id("ð")  # byte 0xF0 alone: the start of a 4-byte character that never completes
    ids = tok.encode("ok ") + [lead_byte]
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.push(i) for i in ids)
    assert streamed == "ok "  # the broken tail is held back
    assert streamed + detok.flush() == tok.decode(ids) == "ok \ufffd"


# ---------------------------------------------------------------- the real checkpoint


@needs_real
def test_real_load_time_and_special_ids(real_tok: ChatTokenizer) -> None:
    expected = {
        "<|endoftext|>": 199999,
        "<|endofprompt|>": 200018,
        "<|assistant|>": 200019,
        "<|end|>": 200020,
        "<|user|>": 200021,
        "<|system|>": 200022,
        "<|tool|>": 200023,
        "<|/tool|>": 200024,
        "<|tool_call|>": 200025,
        "<|/tool_call|>": 200026,
        "<|tool_response|>": 200027,
        "<|tag|>": 200028,
    }
    for token, token_id in expected.items():
        assert real_tok.token_to_id(token) == token_id
        assert real_tok.id_to_token(token_id) == token
        assert real_tok.encode(token) == [token_id]
    assert real_tok.eos_token_id == 199999
    assert real_tok.stop_token_ids == frozenset({200020, 199999})
    assert real_tok.vocab_size == 200029
    assert 200023 not in real_tok.special_token_ids and 200021 in real_tok.special_token_ids
    assert real_tok.id_to_token(200029) is None  # vocab.json's wrong entry for <|tag|> is gone
    assert set(real_tok.unused_ids) == {199998, *range(200000, 200018)}


@needs_real
def test_real_merges_rebuild_count_and_time() -> None:
    vocab = json.loads((REAL / "vocab.json").read_text())
    added = json.loads((REAL / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    contents = {info["content"] for info in added.values()}
    started = time.perf_counter()
    merges = rebuild_merges({t: i for t, i in vocab.items() if t not in contents})
    assert time.perf_counter() - started < 60  # about 2 s on a 2-core CPU
    assert len(merges) == 199_742  # architecture.md §6.1


@needs_real
def test_real_round_trip_and_tokens_encode_to_themselves(real_tok: ChatTokenizer) -> None:
    for text in SAMPLES + [".getElementById('x') 12345678 don't  I'M"]:
        assert real_tok.decode(real_tok.encode(text)) == text
    assert real_tok.encode("Hello world!") == [13225, 2375, 0]  # o200k ids
    vocab = json.loads((REAL / "vocab.json").read_text())
    model = real_tok.backend.model
    rng = random.Random(0)
    sample = rng.sample([t for t, i in vocab.items() if i < 199998], 3000)
    for token in sample:
        assert [t.value for t in model.tokenize(token)] == [token]


@needs_real
def test_real_chat_template(real_tok: ChatTokenizer) -> None:
    tools = [{"name": "f", "parameters": {}}]
    messages = [
        {"role": "system", "content": "S", "tools": tools},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "tool", "content": "R"},
    ]
    assert real_tok.apply_chat_template(messages) == (
        '<|system|>S<|tool|>[{"name": "f", "parameters": {}}]<|/tool|><|end|><|user|>U<|end|>'
        "<|assistant|>A<|end|><|tool|>R<|end|><|assistant|>"
    )
    assert real_tok.apply_chat_template([{"role": "system", "content": "S", "tools": '[{"a": 1}]'}], False) == (
        '<|system|>S<|tool|>[{"a": 1}]<|/tool|><|end|><|endoftext|>'
    )
    assert real_tok.apply_chat_template([{"role": "system", "content": "S", "tools": None}]) == (
        "<|system|>S<|end|><|assistant|>"
    )
    assert real_tok.apply_chat_template([{"role": "assistant", "content": None}], add_generation_prompt=False) == (
        "<|assistant|><|end|><|endoftext|>"
    )
    blocks = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert real_tok.apply_chat_template([{"role": "user", "content": blocks}]) == "<|user|>ab<|end|><|assistant|>"
    card = [{"role": "user", "content": "How to solve 3*x^2+4*x+5=1?"}]
    ids = real_tok.encode_chat(card)
    assert ids[0] == 200021 and ids[-2:] == [200020, 200019]
    assert real_tok.decode(ids) == "<|user|>How to solve 3*x^2+4*x+5=1?<|end|><|assistant|>"
    with pytest.raises(ValueError, match="content"):
        real_tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url"}]}])


def test_template_is_sandboxed(small_dirs: dict[str, Path]) -> None:
    from jinja2.exceptions import SecurityError

    def make(template: str | None) -> ChatTokenizer:
        backend = Tokenizer.from_file(str(small_dirs["json"] / "tokenizer.json"))
        eos = {backend.get_vocab_size(): {"content": "<|endoftext|>", "special": True}}
        return ChatTokenizer(backend, eos, template, "<|endoftext|>")

    assert make("{{ messages[0].content }}{{ eos_token }}").apply_chat_template([{"role": "user"}]) == "<|endoftext|>"
    with pytest.raises(SecurityError):
        make("{{ messages.__class__.__mro__[1].__subclasses__() }}").apply_chat_template([{"role": "user"}])
    with pytest.raises(ValueError, match="chat_template"):
        make(None).apply_chat_template([{"role": "user", "content": "x"}])


@needs_real
def test_real_detokenizer_emoji_cjk(real_tok: ChatTokenizer) -> None:
    text = "思考中… 🧑🏾‍🚀 ok 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 한국어"
    ids = real_tok.encode(text)
    assert len(ids) > 5
    detok = IncrementalDetokenizer(real_tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
