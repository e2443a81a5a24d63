"""The prefill arithmetic count behind docs/benchmarks.md's bound on `phi4flash bench`'s 8K prefill ratio."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import prefill_flops  # noqa: E402

from phi4flash.bench import baseline_model  # noqa: E402


def test_the_counter_sees_every_dense_product_of_the_baseline() -> None:
    """Prefill FLOPs per token = 2 x every weight but the embedding's (the tied LM head runs for one token of
    1,024), so a product the counter missed would show."""
    pytest.importorskip("transformers")
    hidden, layers, vocab = 64, 8, 300
    _, baseline = prefill_flops.dense_flops_per_token(hidden, layers, vocab, window=16)
    model = baseline_model(hidden, layers, vocab, dtype=torch.float32)
    weights = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name)
    assert baseline == pytest.approx(2 * weights + 2 * vocab * hidden / prefill_flops.COUNTED_AT, rel=1e-3)


def test_attention_is_counted_per_key_seen() -> None:
    """The baseline's causal layers see half the prompt on average; ours see the window in each sliding layer
    (eight of the self-decoder's eighteen at 32 layers) and the prompt in the one full layer."""
    ours, baseline = prefill_flops.attention_flops_per_token(hidden=384, layers=32, window=512, length=8192)
    assert baseline == pytest.approx(32 * 2 * 6 * 128 * 8193 / 2)
    seen_window = (512 * 513 / 2 + (8192 - 512) * 512) / 8192
    assert ours == pytest.approx(2 * 6 * 192 * (8 * seen_window + 8193 / 2))
