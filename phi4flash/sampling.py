"""Next-token selection: greedy, repetition penalty, temperature, top-k, top-p, min-p, seeded sampling.

Order of the steps (the Hugging Face order): mask ids the tokenizer cannot produce, repetition penalty,
then greedy argmax, or temperature -> top-k -> top-p -> min-p -> sample. Sampling uses the
exponential-race trick (argmax of p / Exp(1) noise, as gpt-fast does): it draws from the same
distribution as ``torch.multinomial`` and needs no host synchronisation. ``config.logits_processor`` is
applied by the engine, which knows the generated ids, before calling :func:`sample_next`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .protocol import GenerationConfig

__all__ = [
    "GenerationConfig",
    "Sampler",
    "default_generation_config",
    "generation_config_defaults",
    "make_generator",
    "sample_next",
]

# Model card defaults for Phi-4-mini-flash-reasoning (architecture.md §6.4).
CARD_DEFAULTS: dict[str, Any] = {"temperature": 0.6, "top_p": 0.95}
_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def generation_config_defaults(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Generation defaults of a checkpoint: the model card's sampling settings plus generation_config.json.

    Args:
        checkpoint_dir: a folder that may contain ``generation_config.json``.

    Returns:
        A dict with ``temperature`` and ``top_p`` (card defaults unless the file sets them; a file with
        ``do_sample: false`` gives temperature 0), any other :class:`GenerationConfig` field the file sets,
        and ``eos_token_id`` / ``bos_token_id`` / ``pad_token_id`` (lists / ints) when present.
    """
    out: dict[str, Any] = dict(CARD_DEFAULTS)
    path = Path(checkpoint_dir) / "generation_config.json"
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    for key in _CONFIG_KEYS:
        if key in raw and raw[key] is not None:
            out[key] = raw[key]
    if raw.get("do_sample") is False:
        out["temperature"] = 0.0
    eos = raw.get("eos_token_id")
    if eos is not None:
        out["eos_token_id"] = [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]
    for key in ("bos_token_id", "pad_token_id"):
        if isinstance(raw.get(key), int):
            out[key] = raw[key]
    return out


def default_generation_config(checkpoint_dir: str | os.PathLike[str], **overrides: Any) -> GenerationConfig:
    """A validated :class:`GenerationConfig` from :func:`generation_config_defaults` plus ``overrides``."""
    values = {k: v for k, v in generation_config_defaults(checkpoint_dir).items() if k in _CONFIG_KEYS}
    values.update(overrides)
    return GenerationConfig(**values).validate()


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device``, seeded with ``seed`` (a fresh random seed when None)."""
    generator = torch.Generator(device=torch.device(device))
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: Sequence[Sequence[int]], penalty: float) -> None:
    """CTRL-style penalty in place: seen tokens' positive logits are divided by ``penalty``, negative multiplied.

    Args:
        logits: ``[B, V]`` float logits, modified in place.
        previous_ids: per row, the ids seen so far (prompt and generated); ids outside ``[0, V)`` are ignored.
        penalty: the penalty (> 0; 1 does nothing).
    """
    vocab = logits.shape[-1]
    for row, ids in enumerate(previous_ids):
        seen = sorted({int(i) for i in ids if 0 <= int(i) < vocab})
        if not seen:
            continue
        index = torch.tensor(seen, dtype=torch.long, device=logits.device)
        scores = logits[row].index_select(0, index)
        logits[row].index_copy_(0, index, torch.where(scores > 0, scores / penalty, scores * penalty))


def _filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    # Scatter the k best back into -inf rather than threshold at the k-th value, so ties keep exactly k.
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the tokens before it already reach top_p: keeps the smallest such set, never empty.
    drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
    drop[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    config: GenerationConfig,
    generator: torch.Generator | None = None,
    previous_ids: Sequence[Sequence[int]] | None = None,
    vocab_limit: int | None = None,
    suppress_ids: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick the next token of each row.

    Args:
        logits: ``[B, V]`` logits of the last position (any float dtype; computed in float32, not modified).
        config: the sampling settings; validated here (raises ``ValueError`` naming a bad field).
        generator: the random source (see :func:`make_generator`); None uses torch's global one.
        previous_ids: per row, prompt plus generated ids, for the repetition penalty.
        vocab_limit: ids ``>= vocab_limit`` (padding rows of the embedding) are never chosen.
        suppress_ids: more ids never chosen (for example ids that have no token); a tensor must hold ids < V.

    Returns:
        ``[B]`` int64 token ids, on the device of ``logits``.
    """
    config.validate()
    return _sample(logits, config, generator, previous_ids, vocab_limit, suppress_ids)


def _sample(
    logits: torch.Tensor,
    config: GenerationConfig,
    generator: torch.Generator | None,
    previous_ids: Sequence[Sequence[int]] | None,
    vocab_limit: int | None,
    suppress_ids: Sequence[int] | torch.Tensor | None,
) -> torch.Tensor:
    if logits.dim() != 2:
        raise ValueError(f"invalid logits shape {tuple(logits.shape)}: must be [batch, vocab]")
    logits = logits.to(torch.float32, copy=True)
    vocab = logits.shape[-1]
    if vocab_limit is not None:
        if not 0 < vocab_limit:
            raise ValueError(f"invalid vocab_limit={vocab_limit!r}: must be > 0")
        if vocab_limit < vocab:
            logits[:, vocab_limit:] = float("-inf")
    if suppress_ids is not None and len(suppress_ids) > 0:
        if isinstance(suppress_ids, torch.Tensor):
            index = suppress_ids.to(device=logits.device, dtype=torch.long)  # trusted to be < V: no sync
        else:
            index = torch.tensor([i for i in suppress_ids if 0 <= i < vocab], dtype=torch.long, device=logits.device)
        logits.index_fill_(1, index, float("-inf"))
    if config.repetition_penalty != 1.0 and previous_ids is not None:
        apply_repetition_penalty(logits, previous_ids, config.repetition_penalty)

    if config.temperature == 0.0:
        return logits.argmax(dim=-1)

    logits = logits / config.temperature
    if 0 < config.top_k < vocab:
        logits = _filter_top_k(logits, config.top_k)
    if config.top_p < 1.0:
        logits = _filter_top_p(logits, config.top_p)
    if config.min_p > 0.0:
        logits = _filter_min_p(logits, config.min_p)
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


class Sampler:
    """Holds one generation's settings and random generator; call it with each step's logits."""

    def __init__(
        self,
        config: GenerationConfig,
        device: str | torch.device = "cpu",
        vocab_limit: int | None = None,
        suppress_ids: Sequence[int] | None = None,
    ) -> None:
        """Validate ``config`` and seed a generator on ``device`` from ``config.seed``.

        Args:
            config: the sampling settings (raises ``ValueError`` naming a bad field).
            device: where the logits will live.
            vocab_limit: ids ``>= vocab_limit`` are never chosen.
            suppress_ids: more ids never chosen.
        """
        self.config = config.validate()
        self.device = torch.device(device)
        self.vocab_limit = vocab_limit
        self.generator = make_generator(config.seed, self.device)
        self._suppress = (
            torch.as_tensor(list(suppress_ids), dtype=torch.long, device=self.device) if suppress_ids else None
        )

    def __call__(self, logits: torch.Tensor, previous_ids: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """Next token ids ``[B]`` for ``[B, V]`` logits (see :func:`sample_next`)."""
        return _sample(logits, self.config, self.generator, previous_ids, self.vocab_limit, self._suppress)
