"""The training loop of the embedded model, end to end on a tiny budget, and its fast scan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from phi4flash import native, ops
from phi4flash.config import Phi4FlashConfig
from phi4flash.training import data
from phi4flash.training.train import TrainConfig, lr_at, make_batches, train, training_scan

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 8,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "sliding_window": 16,
    "mamba_d_state": 4,
}


@pytest.mark.parametrize("native_kernels", [True, False])
def test_training_scan_matches_the_reference_values_and_gradients(native_kernels: bool, monkeypatch) -> None:
    if native_kernels and not native.ready():
        pytest.skip("phi4flash's C++ kernels could not be built here")
    if not native_kernels:  # the PyTorch recurrence, which runs where there is no compiler
        monkeypatch.setattr(ops, "native_scan", lambda *args: None)
    g = torch.Generator().manual_seed(0)
    b, e, t, n = 2, 6, 9, 3
    leaves = [
        torch.randn(b, e, t, generator=g),
        torch.rand(b, e, t, generator=g) * 0.5,
        -torch.rand(e, n, generator=g) - 0.1,
        torch.randn(b, n, t, generator=g),
        torch.randn(b, n, t, generator=g),
        torch.randn(e, generator=g),
    ]
    state = torch.randn(b, e, n, generator=g)
    outs = []
    for fn in (ops.selective_scan_reference, training_scan):
        args = [x.clone().requires_grad_() for x in leaves]
        y, last = fn(*args, state=state)
        (y.square().sum() + last.sum()).backward()
        outs.append((y.detach(), last.detach(), [a.grad for a in args]))
    (y0, s0, g0), (y1, s1, g1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-5)
    for a, b_ in zip(g0, g1, strict=True):
        torch.testing.assert_close(b_, a, rtol=1e-4, atol=1e-4)


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) < lr_at(9, cfg) == 1e-3
    assert lr_at(50, cfg) < 1e-3
    assert abs(lr_at(100, cfg) - 1e-4) < 1e-9


def test_batches_put_the_loss_on_the_assistant_turn_only() -> None:
    encoded = [([1, 2, 3, 4, 5], 3), ([1, 2, 6, 7], 2), ([9, 9, 9, 9, 9, 9], 4), ([5, 6, 7], 1)]
    batches = make_batches(encoded, batch_size=2, pad_id=0, seed=0)
    rows = {}
    for x, y in batches:
        for xi, yi in zip(x.tolist(), y.tolist(), strict=True):
            rows[tuple(v for v in xi if v)] = yi
    assert rows[(1, 2, 3, 4, 5)][:5] == [-100, -100, 4, 5, -100]
    assert rows[(1, 2, 6, 7)][:4] == [-100, 6, 7, -100]


def test_training_runs_end_to_end_and_the_loss_goes_down(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=30, batch_size=8, lr=5e-3, warmup_steps=3, vocab_size=384, tokenizer_examples=600,
                      model=dict(TINY), seed=1)
    result = train(cfg, tmp_path)
    losses = result.losses
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses

    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "loss_curve.png", "train_summary.json"):
        assert (tmp_path / name).is_file(), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "phi4flash" and config["tie_word_embeddings"] is True
    assert config["vocab_size"] % 64 == 0
    cfg_obj = Phi4FlashConfig.from_json(tmp_path)
    assert cfg_obj.layer_kinds == ["mamba", "sliding_attention", "mamba", "sliding_attention", "mamba_memory",
                                   "full_attention", "gmu", "cross_attention"]
    tok_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    ids = {v["content"]: int(k) for k, v in tok_cfg["added_tokens_decoder"].items()}
    assert gen["eos_token_id"] == [ids["<|end|>"], ids["<|endoftext|>"]]
    assert config["eos_token_id"] == config["bos_token_id"] == ids["<|endoftext|>"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names
    assert "model.layers.4.attn.A_log" in names and "model.layers.6.attn.in_proj.weight" in names

    # The saved checkpoint loads back through the project's loader and gives the trained model's logits.
    from phi4flash.weights import load_model

    loaded = load_model(tmp_path, dtype=torch.float32)
    ex = data.generate(1, seed=5, split="heldout")[0]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids_ = torch.tensor([tok.encode(data.render_prompt(ex.messages)).ids])
    with torch.no_grad():
        logits = loaded(ids_)
    assert logits.shape == (1, ids_.shape[1], config["vocab_size"])
    assert torch.isfinite(logits).all()
