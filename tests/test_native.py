"""phi4flash's C++ CPU kernels against their definitions: the selective scan, the bfloat16 matrix-vector
product and the decode attention (the quantized kernels are in test_quant.py; their portable C++ build is
checked here), and the model with and without them."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_helpers import decode_attention_reference, tiny_model

from phi4flash import heartbeat as heartbeat_module
from phi4flash import native, ops, qkernels
from phi4flash.heartbeat import heartbeat

kernels = native.load()
pytestmark = pytest.mark.skipif(kernels is None, reason="phi4flash's C++ kernels could not be built here (no g++?)")


SCAN_SHAPES = [  # batch, channels, tokens, state size
    (2, 40, 33, 4),     # channels not a multiple of the 16 lanes
    (1, 128, 100, 8),   # the embedded model's state
    (3, 256, 17, 16),   # the real model's state
    (1, 20, 5, 5),      # any other state size: the portable loop
]


def _scan_inputs(batch: int, width: int, length: int, state_size: int) -> tuple[torch.Tensor, ...]:
    u = torch.randn(batch, width, length)
    delta = torch.nn.functional.softplus(torch.randn(batch, width, length))
    A = -torch.exp(torch.randn(width, state_size))
    B, C = torch.randn(batch, state_size, length), torch.randn(batch, state_size, length)
    return u, delta, A, B, C, torch.randn(width), torch.randn(batch, width, state_size)


@pytest.mark.parametrize("batch, width, length, state_size", SCAN_SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_native_scan_equals_the_definition(batch: int, width: int, length: int, state_size: int,
                                           with_state: bool) -> None:
    u, delta, A, B, C, D, state = _scan_inputs(batch, width, length, state_size)
    start = state if with_state else None
    y_ref, s_ref = ops.selective_scan_reference(u.double(), delta.double(), A.double(), B.double(), C.double(),
                                                D.double(), None if start is None else start.double())
    y, s = ops.native_scan(u, delta, A, B, C, D, start)
    assert y.shape == u.shape and s.shape == (batch, width, state_size)
    assert (y.double() - y_ref).abs().max().item() <= 1e-6 * (1 + y_ref.abs().max().item())
    assert (s.double() - s_ref).abs().max().item() <= 1e-6 * (1 + s_ref.abs().max().item())
    y_none, _ = ops.native_scan(u, delta, A, B, C, None, start)  # no D skip
    assert torch.allclose(y_none + D[:, None] * u, y, atol=1e-5)


@pytest.mark.parametrize("batch, width, length, state_size", SCAN_SHAPES)
@pytest.mark.parametrize("with_skip_and_state", [False, True])
def test_native_scan_gradients_equal_the_definitions(batch: int, width: int, length: int, state_size: int,
                                                     with_skip_and_state: bool) -> None:
    inputs = _scan_inputs(batch, width, length, state_size)
    if not with_skip_and_state:
        inputs = (*inputs[:5], None, None)
    gy, g_last = torch.randn(batch, width, length), torch.randn(batch, width, state_size)

    def grads(scan, dtype: torch.dtype) -> list[torch.Tensor]:  # noqa: ANN001
        leaves = [None if t is None else t.to(dtype).requires_grad_() for t in inputs]
        y, last = scan(*leaves)
        ((y * gy.to(dtype)).sum() + (last * g_last.to(dtype)).sum()).backward()
        return [t.grad for t in leaves if t is not None]

    expected = grads(ops.selective_scan_reference, torch.float64)
    got = grads(ops.native_scan, torch.float32)
    assert len(got) == len(expected) == (7 if with_skip_and_state else 5)
    for name, g, ref in zip("u delta A B C D state".split(), got, expected, strict=False):
        assert g.shape == ref.shape, name
        assert (g.double() - ref).abs().max().item() <= 2e-5 * (1 + ref.abs().max().item()), name


def test_model_trains_through_the_native_scan(monkeypatch) -> None:
    model = tiny_model()
    ids = torch.randint(0, 100, (2, 24))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    fast = gradients()
    monkeypatch.setattr(ops, "native_scan", lambda *args: None)
    slow = gradients()
    assert fast.keys() == slow.keys() and any("A_log" in name for name in fast)
    for name in fast:
        assert (fast[name] - slow[name]).abs().max().item() <= 1e-4 * (1 + slow[name].abs().max().item()), name


def test_native_scan_underflowing_decays_are_zero() -> None:
    u, delta, A, B, C, D, _ = _scan_inputs(1, 16, 3, 16)
    A = A * 1e4  # exp(delta * A) underflows: the state forgets everything each step
    y, s = ops.native_scan(u, delta, A, B, C, D, None)
    y_ref, s_ref = ops.selective_scan_reference(u, delta, A, B, C, D)
    assert torch.isfinite(y).all() and torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(s, s_ref, atol=1e-5)


def test_model_with_and_without_the_native_scan(monkeypatch) -> None:
    model = tiny_model()
    ids = torch.randint(0, 100, (2, 40))
    with torch.no_grad():
        fast = model(ids)
        cache = model.new_cache(2, 48)
        model(ids[:, :25], cache=cache, logits_to_keep=1)
        steps = torch.stack([model.step(ids[:, t], cache) for t in range(25, 40)], dim=1)
        monkeypatch.setattr(ops, "native_scan", lambda *args: None)
        slow = model(ids)
    assert (fast - slow).abs().max().item() <= 1e-4
    assert (steps - slow[:, 25:]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("rows, out_features, in_features", [(1, 64, 128), (3, 80, 256), (5, 7, 96), (2, 12, 40)])
def test_bf16_matrix_vector_product(rows: int, out_features: int, in_features: int) -> None:
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    w = torch.randn(out_features, in_features).to(torch.bfloat16)
    expected = x.float() @ w.float().t()
    got = torch.ops.phi4flash.bf16_linear(x, w)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - expected).abs() / (expected.abs() + 1e-2 * expected.abs().max())).max().item() <= 5e-3


def test_kernels_refuse_bad_inputs_with_a_message() -> None:
    with pytest.raises(RuntimeError, match="contiguous \\(M, K\\) bfloat16"):
        torch.ops.phi4flash.bf16_linear(torch.randn(2, 8), torch.randn(4, 8).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="shapes"):
        u, delta, A, B, C = (torch.randn(1, 4, 8), torch.randn(1, 4, 9), torch.randn(8, 4), torch.randn(1, 4, 4),
                             torch.randn(1, 4, 4))  # delta's length differs from u's
        torch.ops.phi4flash.selective_scan(u, delta, A, B, C, None, None)


def test_decode_linear_runs_the_kernel_for_decode_only(monkeypatch) -> None:
    """bfloat16 on the CPU: one or two rows go through the kernel (same numbers as F.linear up to rounding),
    more rows through F.linear; float32 layers stay plain nn.Linear."""
    model = tiny_model().to_dtype(torch.bfloat16).tune_weight_layout()
    layer = model.model.layers[0].mlp.fc1
    assert type(layer) is qkernels.DecodeLinear
    calls = []
    original = torch.ops.phi4flash.bf16_linear
    monkeypatch.setattr(torch.ops.phi4flash, "bf16_linear", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    with torch.no_grad():
        for rows in (1, 2, 5):
            x = torch.randn(rows, layer.in_features).to(torch.bfloat16)
            expected = torch.nn.functional.linear(x, layer.weight).float()
            error = (layer(x).float() - expected).abs() / (expected.abs() + 1e-2 * expected.abs().max())
            assert error.max().item() <= 1e-2
    assert calls == [1, 2]
    assert type(tiny_model().tune_weight_layout().model.layers[0].mlp.fc1) is torch.nn.Linear


@pytest.mark.parametrize("batch, heads, kv_heads, head_dim, keys", [
    (1, 40, 20, 64, 700),  # the real model's heads (whole vectors: head width 64 or 32)
    (3, 4, 2, 44, 300),    # the embedded model's: a head width of 44, its last lanes masked, two blocks
    (3, 4, 2, 32, 70),     # the first embedded model's
    (2, 6, 2, 64, 40),     # phi4flash bench's: three query heads per kv head (six rows, padded to eight)
    (1, 4, 4, 64, 17),     # one query head per kv head
    (2, 4, 2, 16, 9),      # other head widths: masked lanes (the portable loops without AVX-512)
    (2, 12, 4, 24, 33),    # the same, three query heads per kv head
    (2, 4, 2, 30, 45),     # AVX2: a head width of 30 (its scores' last 6 lanes, its values' last 12, masked)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_equals_the_definition(batch: int, heads: int, kv_heads: int, head_dim: int, keys: int,
                                                dtype: torch.dtype, masked: bool) -> None:
    """The cache is read where it lies: a slice of a longer buffer, rows far apart; longer caches are cut into
    blocks of 256 positions whose softmaxes are combined."""
    torch.manual_seed(0)
    q = torch.randn(batch, heads, head_dim).to(dtype)
    buffer = torch.randn(batch, keys + 5, kv_heads, head_dim).to(dtype)
    k, v = buffer[:, 3:keys + 3], torch.randn(batch, keys, kv_heads, head_dim).to(dtype)
    valid = torch.rand(batch, keys) > 0.4 if masked else None
    if valid is not None:
        valid[:, 0] = True
        valid[:, 256:512] = False  # with 700 keys: a whole block of positions has nothing to attend
        valid[0, keys // 2:] = False  # a free tail, as a static step's mask leaves it: the blocks end early
        valid[-1, :keys // 3], valid[-1, keys // 3] = False, True  # and blocks that start late
    scale = head_dim**-0.5
    got = torch.ops.phi4flash.diff_attention_decode(q, k, v, valid, scale)
    expected = decode_attention_reference(q, k, v, valid, scale)
    assert got.dtype == dtype and got.shape == expected.shape
    bound = 1e-6 if dtype == torch.float32 else 8e-3  # bfloat16: the output's own rounding
    assert ((got.double() - expected).abs() / (1 + expected.abs())).max().item() <= bound


def test_decode_attention_refuses_bad_inputs_with_a_message() -> None:
    q, k = torch.randn(1, 4, 16), torch.randn(1, 5, 2, 16)
    with pytest.raises(RuntimeError, match="Hkv even and dividing H"):
        torch.ops.phi4flash.diff_attention_decode(q, torch.randn(1, 5, 3, 16), torch.randn(1, 5, 3, 16), None, 1.0)
    with pytest.raises(RuntimeError, match="heads contiguous"):
        strided = torch.randn(1, 5, 16, 2).transpose(2, 3)
        torch.ops.phi4flash.diff_attention_decode(q, strided, strided, None, 1.0)
    with pytest.raises(RuntimeError, match="contiguous bool"):
        torch.ops.phi4flash.diff_attention_decode(q, k, k, torch.ones(1, 4, dtype=torch.bool), 1.0)


@pytest.mark.parametrize("batch, heads, kv_heads, head_dim, keys", [(1, 40, 20, 64, 300), (3, 4, 2, 44, 70),
                                                                (2, 12, 4, 24, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gain_layout", ["float32", "bfloat16", "strided"])
def test_decode_step_attention_equals_the_models_combination(batch: int, heads: int, kv_heads: int, head_dim: int,
                                                             keys: int, dtype: torch.dtype, gain_layout: str) -> None:
    """diff_attention_step = diff_attention_decode, then ops.differential_combination (the model's PyTorch code),
    with the same roundings in bfloat16: pair j of the heads becomes heads 2j and 2j + 1. The subln gain is read in
    place in float32 or bfloat16 (as q's dtype holds it), and converted first when strided."""
    torch.manual_seed(0)
    q = torch.randn(batch, heads, head_dim).to(dtype)
    k, v = (torch.randn(batch, keys, kv_heads, head_dim).to(dtype) for _ in range(2))
    valid = torch.rand(batch, keys) > 0.3
    valid[:, 0] = True
    lam, gain = torch.tensor(0.35), 1 + 0.3 * torch.randn(2 * head_dim)
    if gain_layout == "bfloat16":
        gain = gain.to(torch.bfloat16)
    elif gain_layout == "strided":
        gain = torch.stack([gain, gain], dim=1)[:, 0]
    lambda_init, eps, scale = 0.4, 1e-5, head_dim**-0.5
    got = torch.ops.phi4flash.diff_attention_step(q, k, v, valid, scale, lam, gain, lambda_init, eps)
    heads_out = torch.ops.phi4flash.diff_attention_decode(q, k, v, valid, scale)  # (B, 2, H/2, 2Dh)
    expected = ops.differential_combination(heads_out[:, 0], heads_out[:, 1], lam, lambda_init, gain, eps)
    assert got.dtype == dtype and got.shape == (batch, heads * head_dim)
    error = (got.double() - expected.reshape(batch, -1).double()).abs() / (1 + expected.reshape(batch, -1).abs())
    assert error.max().item() <= (1e-6 if dtype == torch.float32 else 2**-7)  # bfloat16: at most a last-bit step
    if dtype == torch.bfloat16:  # the same roundings (the gain's included): equal but where the RMS sum's order tips
        assert (got != expected.reshape(batch, -1)).float().mean().item() <= 0.01
    with pytest.raises(RuntimeError, match=r"subln_weight: \(2 Dh,\)"):
        torch.ops.phi4flash.diff_attention_step(q, k, v, valid, scale, lam, gain[:-1], lambda_init, eps)


LAYER_WIDTHS = [176, 2560, 44]  # the embedded model's, the real model's, and one with an 8-lane tail


@pytest.mark.parametrize("width", LAYER_WIDTHS)
@pytest.mark.parametrize("residual, delta_dtype, norm_dtype", [
    (torch.float32, torch.float32, torch.float32),    # a float32 model
    (torch.float32, torch.bfloat16, torch.bfloat16),  # a bfloat16 model: float32 residual stream, bfloat16 layers
    (torch.bfloat16, torch.float32, torch.bfloat16),
])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_layer_norm_equals_the_models_operations(width: int, residual: torch.dtype, delta_dtype: torch.dtype,
                                                     norm_dtype: torch.dtype, with_delta: bool) -> None:
    """add_layer_norm = x + delta.to(x.dtype), then F.layer_norm of that in the weight's dtype (the decoder layer's
    PyTorch operations): the sum exactly, the norm within float32 rounding (bfloat16: at most a last-bit step)."""
    torch.manual_seed(0)
    x = (3 * torch.randn(2, 3, width) + 1).to(residual)
    delta = torch.randn(2, 3, width).to(delta_dtype) if with_delta else None
    weight, bias = (1 + 0.3 * torch.randn(width)).to(norm_dtype), (0.2 * torch.randn(width)).to(norm_dtype)
    total, normed = kernels.add_layer_norm(x, delta, weight, bias, 1e-5)
    expected_total = x + delta.to(x.dtype) if with_delta else x
    expected = torch.nn.functional.layer_norm(expected_total.to(norm_dtype), (width,), weight, bias, 1e-5)
    if with_delta:
        assert total.dtype == residual and torch.equal(total, expected_total)
    else:
        assert total.numel() == 0  # the sum is x itself
    assert normed.dtype == norm_dtype and normed.shape == x.shape
    error = ((normed.double() - expected.double()).abs() / (1 + expected.double().abs())).max().item()
    assert error <= (1e-5 if norm_dtype == torch.float32 else 2**-7)
    if norm_dtype == torch.bfloat16:  # a last-bit step only where the sums' order tips a rounding
        assert (normed != expected).float().mean().item() <= 0.01
    no_bias = kernels.add_layer_norm(x, delta, weight, None, 1e-5)[1]
    expected = torch.nn.functional.layer_norm(expected_total.to(norm_dtype), (width,), weight, None, 1e-5)
    assert ((no_bias.double() - expected.double()).abs() / (1 + expected.double().abs())).max().item() <= (
        1e-5 if norm_dtype == torch.float32 else 2**-7)
    with pytest.raises(RuntimeError, match="x \\(..., D\\) with D the weight's length"):
        kernels.add_layer_norm(x[..., :-1], None, weight, bias, 1e-5)


@pytest.mark.parametrize("width", [10240, 176, 44, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_equals_the_models_operations(width: int, dtype: torch.dtype) -> None:
    """silu_mul(gate, up) = F.silu(gate) * up with its roundings, on the halves of one projection's output (rows
    read with their stride, as the MLP's chunk gives them); large magnitudes saturate without overflow."""
    torch.manual_seed(0)
    projected = (4 * torch.randn(2, 3, 2 * width)).to(dtype)
    projected[0, 0, :4] = torch.tensor([-200.0, 200.0, -30.0, 0.0])
    gate, up = projected.chunk(2, dim=-1)
    got = kernels.silu_mul(gate, up)
    expected = torch.nn.functional.silu(gate) * up
    assert got.dtype == dtype and got.shape == gate.shape and torch.isfinite(got).all()
    error = ((got.double() - expected.double()).abs() / (1 + expected.double().abs())).max().item()
    assert error <= (1e-6 if dtype == torch.float32 else 2**-7)
    if dtype == torch.bfloat16:  # SiLU rounded before the product, as F.silu's result is: equal but for rare ties
        assert (got != expected).float().mean().item() <= 0.01
    with pytest.raises(RuntimeError, match="gate and up of one shape"):
        kernels.silu_mul(gate, up.float() if dtype == torch.bfloat16 else up.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_with_and_without_the_layer_kernels(monkeypatch, dtype: torch.dtype) -> None:
    """Prefill and decode agree with the PyTorch operations; every LayerNorm and SiLU product of a step (the
    final norm, each layer's two, the MLPs' and the GMUs' products) goes through the kernels."""
    model = tiny_model().to_dtype(dtype)
    ids = torch.randint(0, 100, (2, 20))
    calls: dict[str, int] = {"add_layer_norm": 0, "silu_mul": 0}
    for name in calls:
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, name=name, original=original: calls.__setitem__(name, calls[name] + 1)
                            or original(*a))

    def run() -> torch.Tensor:
        with torch.no_grad():
            cache = model.new_cache(2, 24)
            prefill = model(ids[:, :6], cache=cache, logits_to_keep=1)[:, -1]
            for name in calls:
                calls[name] = 0
            return torch.stack([prefill, *(model.step(ids[:, t], cache) for t in range(6, 20))], dim=1)

    fast = run()
    layers = model.config.num_hidden_layers
    gmus = sum(layer.kind == "gmu" for layer in model.model.layers)
    assert gmus > 0 and calls == {"add_layer_norm": 14 * (2 * layers + 1), "silu_mul": 14 * (layers + gmus)}
    monkeypatch.setattr(ops, "_eager_layer_kernels", lambda *a: None)
    slow = run()
    assert calls == {"add_layer_norm": 0, "silu_mul": 0}
    bound = 1e-4 if dtype == torch.float32 else 0.1
    assert (fast - slow).abs().max().item() <= bound * (1 + slow.abs().max().item())


def _gate_reference(y: torch.Tensor, z: torch.Tensor, emits_memory: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba._gate, the model's own code, on a stand-in for the module."""
    from types import SimpleNamespace

    from phi4flash.model import Mamba

    return Mamba._gate(SimpleNamespace(emits_memory=emits_memory), y, z)  # type: ignore[arg-type]


@pytest.mark.parametrize("width, state_size", [(40, 16), (64, 8), (20, 6)])  # 6: the portable loop
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("emits_memory", [False, True])
def test_mamba_step_kernels_equal_the_definitions(width: int, state_size: int, dtype: torch.dtype,
                                                  emits_memory: bool) -> None:
    """conv_step = ops.causal_conv1d_step and scan_step = softplus, ops.selective_scan_step (A = -exp(A_log)) and
    the gate, on rows read from wider tensors (the projections' outputs), states updated in place."""
    torch.manual_seed(0)
    batch, kernel = 2, 4
    projected = torch.randn(batch, 2 * width).to(dtype)  # in_proj's output: x || z
    x, z = projected.chunk(2, dim=-1)
    weight, bias = (0.5 * torch.randn(width, 1, kernel)).to(dtype), torch.randn(width).to(dtype)
    conv_state = torch.randn(batch, width, kernel).to(dtype)
    conv_ref = conv_state.clone()
    got_x = torch.ops.phi4flash.conv_step(x, weight, bias, conv_state)
    expected_x = ops.causal_conv1d_step(x, weight, bias, conv_ref)
    assert torch.equal(conv_state, conv_ref)
    assert ((got_x.float() - expected_x.float()).abs() / (1 + expected_x.float().abs())).max().item() <= (
        1e-6 if dtype == torch.float32 else 2**-7)

    x_proj = torch.randn(batch, 3 + 2 * state_size).to(dtype)  # x_proj's output: dt rank 3, then B and C
    b, c = x_proj[:, 3:3 + state_size], x_proj[:, 3 + state_size:]
    dt, dt_bias, D = (torch.randn(batch, width) - 1).to(dtype), torch.randn(width), torch.randn(width)
    A_log = torch.randn(width, state_size)
    A = -torch.exp(A_log)
    state = torch.randn(batch, width, state_size)
    state_ref = state.clone()
    gated, memory = torch.ops.phi4flash.scan_step(expected_x, dt, dt_bias, A_log, b, c, D, z, state, emits_memory)
    delta = torch.nn.functional.softplus(dt.float() + dt_bias)
    y = ops.selective_scan_step(expected_x, delta, A, b, c, D, state_ref)
    expected_gated, expected_memory = _gate_reference(y, z, emits_memory)
    assert (state - state_ref).abs().max().item() <= 1e-5 * (1 + state_ref.abs().max().item())
    bound = 1e-5 if dtype == torch.float32 else 2**-7
    assert gated.dtype == dtype
    assert ((gated.float() - expected_gated.float()).abs() / (1 + expected_gated.float().abs())).max().item() <= bound
    if emits_memory:
        assert ((memory.float() - expected_memory.float()).abs() / (1 + expected_memory.float().abs())).max() <= bound
    else:
        assert memory.numel() == 0 and expected_memory is None
    with pytest.raises(RuntimeError, match="A_log: contiguous float32"):
        torch.ops.phi4flash.scan_step(expected_x, dt, dt_bias, A_log.t(), b, c, D, z, state, emits_memory)
    with pytest.raises(RuntimeError, match="of one dtype"):
        torch.ops.phi4flash.conv_step(x.double(), weight, bias, conv_state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_decode_with_and_without_the_native_mamba_step(monkeypatch, dtype: torch.dtype) -> None:
    """Decode steps (one and several rows, a continued batch) agree with the PyTorch step, the memory-emitting
    layer's GMUs included."""
    model = tiny_model().to_dtype(dtype)
    ids = torch.randint(0, 100, (2, 20))
    calls = []
    original = torch.ops.phi4flash.scan_step
    monkeypatch.setattr(torch.ops.phi4flash, "scan_step", lambda *a: calls.append(a[-1]) or original(*a))

    def decode() -> torch.Tensor:
        with torch.no_grad():
            cache = model.new_cache(2, 24)
            model(ids[:, :6], cache=cache, logits_to_keep=1)
            calls.clear()
            return torch.stack([model.step(ids[:, t], cache) for t in range(6, 20)], dim=1)

    fast = decode()
    mamba_layers = sum(layer.kind.startswith("mamba") for layer in model.model.layers)
    assert len(calls) == 14 * mamba_layers and True in calls  # the memory-emitting layer's step is among them
    monkeypatch.setattr(ops, "native_mamba_step", lambda *a: False)
    monkeypatch.setattr("phi4flash.model.native_mamba_step", lambda *a: False)
    slow = decode()
    assert not calls
    bound = 1e-4 if dtype == torch.float32 else 0.1
    assert (fast - slow).abs().max().item() <= bound * (1 + slow.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 128])  # head width 16 (masked lanes) and 32 (whole vectors)
def test_model_decode_with_and_without_the_native_attention(monkeypatch, dtype: torch.dtype, hidden: int) -> None:
    """Decode steps past the window (the ring wraps) and a continued batch agree with the PyTorch path."""
    model = tiny_model(hidden_size=hidden).to_dtype(dtype)
    ids = torch.randint(0, 100, (2, 30))
    calls = []
    original = torch.ops.phi4flash.diff_attention_step
    monkeypatch.setattr(torch.ops.phi4flash, "diff_attention_step",
                        lambda *a: calls.append(a[1].shape[1]) or original(*a))

    def decode() -> torch.Tensor:
        with torch.no_grad():
            cache = model.new_cache(2, 32)
            model(ids[:, :6], cache=cache, logits_to_keep=1)
            calls.clear()
            return torch.stack([model.step(ids[:, t], cache) for t in range(6, 30)], dim=1)

    fast = decode()
    assert len(calls) == 24 * 4  # four attention layers in tiny_config (two sliding, the full, one cross)
    monkeypatch.setattr(ops, "_native_decode_attention", lambda *a: False)
    slow = decode()
    assert not calls
    bound = 1e-4 if dtype == torch.float32 else 0.1
    assert (fast - slow).abs().max().item() <= bound * (1 + slow.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("march, isa", [("x86-64-v2", "portable C++"), ("haswell", "avx2")])
def test_kernels_for_cpus_without_avx512(tmp_path, march: str, isa: str) -> None:
    """The kernels that CPUs without AVX-512 VNNI run (AVX2, and plain C++ loops without it) give the same bits
    as the reference (built here with -march=haswell and -march=x86-64-v2 in a process of their own: a CI
    machine of another kind would run them untested)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 builds")
    script = Path(__file__).with_name("_portable_kernels.py")
    result = subprocess.run([sys.executable, str(script), str(tmp_path), march], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"PORTABLE OK {isa}" in result.stdout


def test_loading_says_that_the_native_kernels_run(caplog) -> None:
    import logging

    from phi4flash import load_model

    with caplog.at_level(logging.INFO, logger="phi4flash.weights"):
        load_model("embedded")
    assert "phi4flash on cpu: float32 weights; phi4flash's C++ kernels" in caplog.text


def test_a_build_lock_left_by_an_interrupted_build_is_removed(tmp_path: Path, monkeypatch, caplog) -> None:
    """PyTorch waits forever for the lock of a build that was killed (Ctrl-C on a first start hung every later
    start, silently); the loader waits for a live build and removes a lock no process holds."""
    import threading
    import time

    native.wait_for_build_lock(tmp_path)  # no lock: no wait
    lock = tmp_path / "lock"
    lock.touch()  # left behind: nobody holds it open (removed on the second look, a poll later)
    with caplog.at_level("WARNING", logger="phi4flash.native"):
        native.wait_for_build_lock(tmp_path, poll_seconds=0.05)
    assert not lock.exists() and "interrupted" in caplog.text

    def build_in_progress() -> None:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # as PyTorch's FileBaton holds it while it builds
        threading.Timer(0.6, lambda: (os.close(fd), lock.unlink())).start()

    monkeypatch.setattr(heartbeat_module, "HEARTBEAT_SECONDS", 0.1)
    for where_proc_cannot_tell in (False, True):
        if where_proc_cannot_tell:
            monkeypatch.setattr(native, "_lock_is_held", lambda lock: None)
        build_in_progress()
        started = time.perf_counter()
        caplog.clear()
        with caplog.at_level("INFO", logger="phi4flash.native"):
            native.wait_for_build_lock(tmp_path, poll_seconds=0.05)
        assert 0.55 <= time.perf_counter() - started < 5 and not lock.exists()
        # a line when the wait starts, then one every HEARTBEAT_SECONDS while it lasts
        assert "waiting for another process that builds" in caplog.text
        assert "still waiting for another process that builds phi4flash's kernels (0 s so far)" in caplog.text
    lock.touch()  # where /proc cannot tell: by its age
    stale = time.time() - native.STALE_LOCK_SECONDS - 60
    os.utime(lock, (stale, stale))
    native.wait_for_build_lock(tmp_path)
    assert not lock.exists()


def test_a_heartbeat_logs_while_its_block_runs_and_stops_with_it(caplog) -> None:
    """The slow one-off work of a first start (a kernel build, a wait for another process's build, a compile) says
    every half minute that it still runs; the heartbeat ends with its block."""
    import logging
    import threading
    import time

    logger = logging.getLogger("phi4flash.test_heartbeat")

    def beats() -> list[str]:
        return [record.getMessage() for record in caplog.records if record.name == logger.name]

    with caplog.at_level("INFO", logger=logger.name):
        with heartbeat(logger, "doing the slow thing", every=0.05):
            time.sleep(0.4)
        during = beats()
        time.sleep(0.2)
        assert beats() == during  # nothing after the block
        assert len(during) >= 2 and all(line.startswith("still doing the slow thing (") and
                                        line.endswith(" s so far)") for line in during)
        started = time.perf_counter()
        with heartbeat(logger, "doing a quick thing", every=5):
            pass
        assert time.perf_counter() - started < 1 and "quick" not in caplog.text  # ended at once, no line
    assert not any(thread.name == "phi4flash-heartbeat" for thread in threading.enumerate())


def test_a_build_that_will_run_is_told_apart_from_a_cached_one(tmp_path: Path) -> None:
    """A first start, or one after another checkout or environment built the kernels (ninja then rebuilds for
    1-2 silent minutes), is announced; a cached build is not."""
    if native.ready():  # the real cache, as PyTorch wrote it for this checkout: nothing left to build
        assert not native.build_needed(native.build_directory(native.build_name()))
    build_dir = tmp_path / "phi4flash_cpu_0123456789ab"
    build_dir.mkdir()
    assert native.build_needed(build_dir)  # nothing built yet
    recipe = f"cflags = -isystem {Path(torch.__file__).parent / 'include'}\n" + "".join(
        f"build {source.stem}.o: compile {source}\n" for source in native.SOURCES)
    (build_dir / "build.ninja").write_text(recipe)
    library = build_dir / f"{build_dir.name}.so"
    library.write_bytes(b"")
    assert not native.build_needed(build_dir)
    (build_dir / "build.ninja").write_text(recipe.replace(str(native.SOURCES[0].parent), "/another/checkout/csrc"))
    assert native.build_needed(build_dir)  # another checkout's sources
    (build_dir / "build.ninja").write_text(recipe.replace(str(Path(torch.__file__).parent), "/another/venv/torch"))
    assert native.build_needed(build_dir)  # another environment's PyTorch
    (build_dir / "build.ninja").write_text(recipe)
    older = min(source.stat().st_mtime for source in native.SOURCES) - 60
    os.utime(library, (older, older))
    assert native.build_needed(build_dir)  # a source changed since the build
