"""Tiny random models for the tests: configs covering every layer kind, and the shared/ paths."""

from __future__ import annotations

from pathlib import Path

import torch

from phi4flash.config import Phi4FlashConfig
from phi4flash.model import Phi4FlashForCausalLM

# Copies of the project's shared/ test vectors: the official implementation's outputs on a tiny config
# (golden/tiny8) and the real checkpoint's metadata files (no weights).
DATA = Path(__file__).resolve().parent / "data"
GOLDEN = DATA / "golden" / "tiny8"
REFERENCE_CHECKPOINT = DATA / "checkpoint"


def tiny_config(**overrides: object) -> Phi4FlashConfig:
    """8 layers (every kind), hidden 64, 4 heads / 2 kv heads, window 8, vocab 101."""
    values: dict[str, object] = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=8,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                     mamba_d_state=4, context_length=512, bos_token_id=100, eos_token_id=100,
                                     pad_token_id=100, torch_dtype="float32")
    values.update(overrides)
    return Phi4FlashConfig(**values)  # type: ignore[arg-type]


def tiny_model(seed: int = 0, **overrides: object) -> Phi4FlashForCausalLM:
    """A random-weight model of :func:`tiny_config`, initialised so that every parameter matters."""
    torch.manual_seed(seed)
    model = Phi4FlashForCausalLM(tiny_config(**overrides))
    model.init_weights(std=0.1)
    with torch.no_grad():  # non-trivial norms and biases, so that tests can see them
        for name, param in model.named_parameters():
            if name.endswith(("layernorm.bias", "Wqkv.bias", "out_proj.bias")):
                param.normal_(0, 0.1)
    return model.eval()


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                               scale: float) -> torch.Tensor:
    """Both head groups' attention of one query per row, in float64, head by head from the definition.

    q (B, H, Dh); k, v (B, S, Hkv, Dh); valid (B, S) or None -> (B, 2, H/2, 2Dh): query head h (group h % 2,
    pair-index h // 2) scores kv head 2p + h % 2 with p = (h // 2) // (H / Hkv) and sums [V_2p || V_2p+1]."""
    batch, heads, dh = q.shape
    length, kv_heads = k.shape[1], k.shape[2]
    per_kv = heads // kv_heads
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(batch, 2, heads // 2, 2 * dh, dtype=torch.float64)
    for h in range(heads):
        group, index = h % 2, h // 2
        pair = index // per_kv
        scores = torch.einsum("bd,bsd->bs", q[:, h], k[:, :, 2 * pair + group]) * scale
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
        values = v[:, :, 2 * pair:2 * pair + 2].reshape(batch, length, 2 * dh)
        out[:, group, index] = torch.einsum("bs,bsd->bd", scores.softmax(-1), values)
    return out
