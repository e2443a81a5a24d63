"""Tokenizer of a checkpoint folder: byte-level BPE, special and stop tokens, chat template, and an
incremental detokenizer that never splits a UTF-8 character.

Loading order (architecture.md §6.1-6.2):

1. ``tokenizer.json`` through the ``tokenizers`` library;
2. else ``vocab.json`` + ``merges.txt`` (byte-level BPE, GPT-2 split regex, as ``GPT2Tokenizer`` does);
3. else ``vocab.json`` alone: the merges are rebuilt from the vocabulary, whose ids are the merge ranks,
   and text is split with the o200k regex of the GPT-4o family the vocabulary comes from.

Special and added tokens always come from ``tokenizer_config.json``'s ``added_tokens_decoder`` (or
``added_tokens.json``), never from ``vocab.json``, which lists some of them one id too high.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# The pre-tokenisation regex of OpenAI's o200k_base (tiktoken), which the GPT-4o-family vocabulary of
# Phi-4-mini-flash was trained with. Under GPT-2's regex many of its tokens (".get", "123") could never form.
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

DEFAULT_STOP_TOKENS = ("<|end|>", "<|endoftext|>")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2's byte-level BPE uses for the bytes 0..255, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def rebuild_merges(vocab: Mapping[str, int], skip: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Rebuild the BPE merges of a vocabulary whose token ids are the merge ranks.

    For every token of two or more byte symbols, BPE restricted to the merges of lower rank ends in
    exactly two parts; those two parts are the token's merge (architecture.md §6.1).

    Args:
        vocab: token (in byte-symbol form) -> id.
        skip: tokens that are not BPE tokens (special and added tokens).

    Returns:
        The merges, ordered by the id of the token each one produces.

    Raises:
        ValueError: if some token cannot be reached by merging two lower-ranked tokens.
    """
    skipped = set(skip)
    alphabet = set(_byte_symbols())
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    for token, token_id in sorted(vocab.items(), key=lambda item: item[1]):
        if token in skipped or len(token) < 2:
            continue
        if not alphabet.issuperset(token):
            raise ValueError(f"token {token!r} (id {token_id}) is not in byte-level form")
        # Fast path: a split whose two halves both exist at a lower rank. When only one exists it must be
        # the merge; with several, BPE decides.
        candidates = []
        for cut in range(1, len(token)):
            left_id = vocab.get(token[:cut])
            right_id = vocab.get(token[cut:])
            if left_id is not None and right_id is not None and left_id < token_id and right_id < token_id:
                candidates.append((token[:cut], token[cut:]))
        if len(candidates) == 1:
            pair = candidates[0]
        else:
            parts = _bpe(list(token), ranks)
            if len(parts) != 2:
                raise ValueError(f"cannot rebuild the merge of token {token!r} (id {token_id}): BPE gives {parts}")
            pair = (parts[0], parts[1])
        ranks[pair] = token_id
        merges.append(pair)
    return merges


def _bpe(parts: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """Apply the lowest-ranked known merge until none applies (the HF ``tokenizers`` order)."""
    while len(parts) > 1:
        best_rank, best = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get((parts[i], parts[i + 1]))
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best = rank, i
        if best_rank is None:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


@lru_cache(maxsize=4)
def _rebuilt_merges_cached(vocab_path: str, mtime_ns: int, size: int, skip: frozenset[str]) -> tuple:
    # Keyed by file identity so that an edited vocab.json is rebuilt; cached in memory only (the folder
    # may be read-only and nothing may be written elsewhere).
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    vocab = {t: i for t, i in vocab.items() if t not in skip}
    return tuple(rebuild_merges(vocab))


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """``bos_token`` etc. may be a string or an AddedToken-like dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content")
    return None


class ChatTokenizer:
    """A checkpoint's tokenizer plus its chat template and special/stop tokens.

    Build it with :meth:`from_pretrained`; the constructor takes already-loaded parts.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        added_tokens: Mapping[int, Mapping[str, Any]],
        chat_template: str | None,
        eos_token: str,
        extra_stop_ids: Iterable[int] = (),
    ) -> None:
        """Wrap a ``tokenizers.Tokenizer``.

        Args:
            tokenizer: the BPE tokenizer; the added tokens are registered on it here.
            added_tokens: id -> {"content", "special", "lstrip", "rstrip", "normalized", "single_word"}.
            chat_template: a jinja2 template (as in ``tokenizer_config.json``), or None.
            eos_token: the end-of-sequence token text (the template's ``eos_token``).
            extra_stop_ids: more ids that end generation (``generation_config.json``'s ``eos_token_id``).
        """
        self._tok = tokenizer
        self.chat_template = chat_template
        self.eos_token = eos_token
        self._added: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in added_tokens.items()}
        to_register = []
        for _, info in sorted(self._added.items()):
            to_register.append(
                AddedToken(
                    info["content"],
                    single_word=bool(info.get("single_word", False)),
                    lstrip=bool(info.get("lstrip", False)),
                    rstrip=bool(info.get("rstrip", False)),
                    normalized=bool(info.get("normalized", False)),
                    special=bool(info.get("special", False)),
                )
            )
        if to_register:
            tokenizer.add_tokens(to_register)
        for token_id, info in self._added.items():
            actual = tokenizer.token_to_id(info["content"])
            if actual != token_id:
                raise ValueError(
                    f"added token {info['content']!r} should have id {token_id}, the tokenizer gives {actual}"
                )
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"eos token {eos_token!r} is not in the vocabulary")
        self._eos_id = eos_id
        stops = {tokenizer.token_to_id(t) for t in DEFAULT_STOP_TOKENS} | {eos_id} | {int(i) for i in extra_stop_ids}
        self._stop_ids = frozenset(i for i in stops if i is not None)
        self._special_ids = frozenset(i for i, info in self._added.items() if info.get("special", False))
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        self._template = None
        self._token_bytes: list[bytes | None] | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, pretokenizer: str = "auto") -> ChatTokenizer:
        """Load the tokenizer shipped in a checkpoint folder.

        Args:
            path: the folder (with ``tokenizer_config.json`` and ``tokenizer.json`` or ``vocab.json``).
            pretokenizer: for folders without ``tokenizer.json``: "gpt2" or "o200k" split regex; "auto"
                uses GPT-2's with ``merges.txt`` (what ``GPT2Tokenizer`` does) and o200k when the merges
                are rebuilt from ``vocab.json`` (the o200k-family vocabulary of the real checkpoint).

        Returns:
            The tokenizer.

        Raises:
            FileNotFoundError: if the folder has no tokenizer files.
            ValueError: on inconsistent special tokens or an unknown ``pretokenizer``.
        """
        if pretokenizer not in ("auto", "gpt2", "o200k"):
            raise ValueError(f"invalid pretokenizer={pretokenizer!r}: must be 'auto', 'gpt2' or 'o200k'")
        folder = Path(path)
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            config = _read_json(folder / "tokenizer_config.json")
        added = _added_tokens(folder, config)

        if (folder / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").is_file():
            vocab = _read_json(folder / "vocab.json")
            added_contents = {info["content"] for info in added.values()}
            # vocab.json can list added tokens at wrong ids; drop them and put the right ids back.
            vocab = {t: i for t, i in vocab.items() if t not in added_contents}
            if (folder / "merges.txt").is_file():
                merges = _read_merges(folder / "merges.txt")
                use_o200k = pretokenizer == "o200k"
            else:
                vocab_path = (folder / "vocab.json").resolve()
                stat = vocab_path.stat()
                key = (str(vocab_path), stat.st_mtime_ns, stat.st_size, frozenset(added_contents))
                merges = list(_rebuilt_merges_cached(*key))
                use_o200k = pretokenizer != "gpt2"
            for token_id, info in added.items():
                vocab[info["content"]] = token_id
            tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
            if use_o200k:
                tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                    [
                        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                    ]
                )
            else:
                tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
                    add_prefix_space=bool(config.get("add_prefix_space", False)), use_regex=True
                )
            tokenizer.decoder = decoders.ByteLevel()
        else:
            raise FileNotFoundError(f"no tokenizer.json or vocab.json in {folder}")

        eos_token = _token_content(config.get("eos_token")) or "<|endoftext|>"
        extra_stops: list[int] = []
        if (folder / "generation_config.json").is_file():
            eos = _read_json(folder / "generation_config.json").get("eos_token_id")
            if isinstance(eos, int):
                extra_stops.append(eos)
            elif isinstance(eos, list):
                extra_stops.extend(int(i) for i in eos)
        chat_template = config.get("chat_template")
        if chat_template is None and (folder / "chat_template.jinja").is_file():
            # transformers 5 saves the template in its own file beside tokenizer_config.json
            chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tokenizer, added, chat_template, eos_token, extra_stops)

    # ------------------------------------------------------------------ ids and text

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def eos_token_id(self) -> int:
        """Id of the eos token (``<|endoftext|>`` for Phi-4-mini-flash)."""
        return self._eos_id

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end a generation: ``<|end|>``, ``<|endoftext|>`` and generation_config's eos ids."""
        return self._stop_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (dropped by ``skip_special_tokens``)."""
        return self._special_ids

    @property
    def added_tokens(self) -> dict[int, str]:
        """Id -> text of every added token, special or not (the tool tokens are not special)."""
        return {i: info["content"] for i, info in self._added.items()}

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce: the largest id plus one."""
        return self._vocab_size

    @property
    def unused_ids(self) -> list[int]:
        """Ids below :attr:`vocab_size` that have no token (never worth sampling)."""
        return [i for i in range(self._vocab_size) if self._tok.id_to_token(i) is None]

    def token_bytes(self) -> list[bytes | None]:
        """The bytes each id writes into the text, by id (built once); None for ids that never stand for text:
        added tokens (``<|end|>``, ``<|tool_call|>``) and ids without a token."""
        if self._token_bytes is None:
            symbols = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
            table: list[bytes | None] = []
            for i in range(self._vocab_size):
                piece = None if i in self._added else self._tok.id_to_token(i)
                if piece is not None and all(c in symbols for c in piece):
                    table.append(bytes(symbols[c] for c in piece))
                else:
                    table.append(None if piece is None else piece.encode())
            self._token_bytes = table
        return self._token_bytes

    def token_to_id(self, token: str) -> int | None:
        """The id of a token (byte-symbol form for BPE tokens), or None."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token of an id, or None for ids with no token."""
        return self._tok.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; added tokens written in the text (``<|user|>``) become their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ids with no token decode to nothing."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render messages with the checkpoint's chat template.

        ``content`` None becomes ""; a list of content blocks is joined from its text blocks; a system
        message's ``tools`` list or dict is JSON-dumped (the template concatenates it as text).

        Args:
            messages: ``{"role": ..., "content": ...}`` dicts.
            add_generation_prompt: end with ``<|assistant|>`` (else with the eos token).

        Returns:
            The prompt text.

        Raises:
            ValueError: if the folder has no chat template or a message is malformed.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        rendered = [_normalise_message(m) for m in messages]
        return self._template.render(
            messages=rendered, add_generation_prompt=add_generation_prompt, eos_token=self.eos_token
        )

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of :meth:`apply_chat_template`."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))


def _added_tokens(folder: Path, config: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    added: dict[int, dict[str, Any]] = {}
    for key, info in (config.get("added_tokens_decoder") or {}).items():
        added[int(key)] = dict(info)
    if (folder / "added_tokens.json").is_file():
        for content, token_id in _read_json(folder / "added_tokens.json").items():
            # added_tokens.json carries no flags; tokenizer_config.json wins where both exist.
            added.setdefault(int(token_id), {"content": content, "special": True})
    return added


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#version"):
                continue
            left, right = line.split(" ")
            merges.append((left, right))
    return merges


def _compile_template(source: str) -> Any:
    # Sandboxed like transformers: templates ship with downloaded checkpoints and must not reach Python.
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _normalise_message(message: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(message, Mapping) or "role" not in message:
        raise ValueError(f"invalid message {message!r}: must be a dict with a 'role'")
    out = dict(message)
    content = out.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        texts = []
        for block in content:
            if isinstance(block, str):
                texts.append(block)
            elif isinstance(block, Mapping) and block.get("type") == "text":
                texts.append(str(block.get("text", "")))
            else:
                raise ValueError(f"invalid content block {block!r}: only text is supported")
        content = "".join(texts)
    elif not isinstance(content, str):
        raise ValueError(f"invalid content {content!r}: must be a string, a list of text blocks or None")
    out["content"] = content
    tools = out.get("tools")
    if isinstance(tools, (list, dict)):
        out["tools"] = json.dumps(tools, ensure_ascii=False)
    return out


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas without ever emitting a broken UTF-8 character.

    A character can span several byte-level tokens; while the undecided tail decodes to U+FFFD the text
    is held back. Each push decodes only a short window (from the last emitted boundary), so the cost
    per token does not grow with the length of the output. The concatenation of all deltas plus
    :meth:`flush` equals ``tokenizer.decode(all_ids, skip_special_tokens)``.
    """

    def __init__(self, tokenizer: ChatTokenizer, skip_special_tokens: bool = True) -> None:
        """Start an empty stream.

        Args:
            tokenizer: the tokenizer whose ids are pushed.
            skip_special_tokens: drop special tokens such as ``<|end|>`` (the engine handles stops).
        """
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window: one emitted token of context before _read
        self._read = 0  # ids before this index have been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly "")."""
        self._ids.append(int(token_id))
        prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read], self._skip)
        new_text = self._tokenizer.decode(self._ids[self._prefix :], self._skip)
        if new_text.endswith("\ufffd") or not new_text.startswith(prefix_text):
            return ""
        delta = new_text[len(prefix_text) :]
        # Keep the last emitted token as left context: decoders such as SentencePiece's drop a leading space.
        self._prefix = self._read
        self._read = len(self._ids)
        return delta

    def flush(self) -> str:
        """Return whatever is still held back (a trailing broken character decodes to U+FFFD)."""
        prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read], self._skip)
        new_text = self._tokenizer.decode(self._ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else new_text

    @property
    def token_ids(self) -> list[int]:
        """All ids pushed so far."""
        return list(self._ids)
