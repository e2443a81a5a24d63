"""Run by tests/test_native.py in its own process: build phi4flash's C++ kernels for a CPU without AVX-512
(``-march=x86-64-v2``: the portable C++ loops; ``-march=haswell``: the AVX2 kernels) and check them against the
reference: the quantized kernels bit for bit, the bfloat16 matrix-vector product, the decode attention and the
selective scan (forward and backward) within float32 rounding.

Usage: python tests/_portable_kernels.py BUILD_DIR [MARCH]  (prints "PORTABLE OK <isa>" when every check holds)
"""

from __future__ import annotations

import sys

import torch
from model_helpers import decode_attention_reference
from torch.utils.cpp_extension import load

from phi4flash import native, ops, qkernels, quant


def main(build_dir: str, march: str = "x86-64-v2") -> None:
    module = load(name=f"phi4flash_portable_check_{march.replace('-', '_')}",
                  sources=[str(source) for source in native.SOURCES],
                  extra_cflags=["-O2", f"-march={march}", "-fopenmp"], extra_ldflags=["-fopenmp"],
                  build_directory=build_dir, verbose=False)
    torch.manual_seed(0)
    for bits, group in [(8, 0), (4, 128), (4, 64), (4, 32)]:
        for rows, n, k in [(1, 32, 256), (5, 48, 384)]:
            port = quant.quantize_weight(torch.randn(n, k) * 0.05, bits, group)
            x = torch.randn(rows, k).to(torch.bfloat16)
            q, scale = qkernels.quantize_activations(x)
            seen = (q.view(rows, -1, 128) * scale[..., None]).view(rows, k)
            w = quant.dequantize(**port)
            if bits == 8:
                scales = port["scales"].to(torch.bfloat16).contiguous()
                tiles, extra = qkernels.int8_tiles((port["qweight"].to(torch.int16) + 128).to(torch.uint8)), None
                y = torch.ops.phi4flash.int8_linear(x, tiles, scales)
            else:
                values = torch.stack([port["qweight"] & 15, port["qweight"] >> 4], -1).view(n, k)
                tiles = qkernels.int4_tiles(values)
                scales = qkernels.tile_columns(port["scales"].to(torch.bfloat16))
                extra = qkernels.tile_columns(port["zeros"].to(torch.bfloat16))
                y = torch.ops.phi4flash.int4_linear(x, tiles, scales, extra, group)
            expected = (seen.double() @ w.double().t()).float().to(torch.bfloat16)
            assert torch.equal(y, expected), (bits, group, rows, (y.float() - expected.float()).abs().max())
            whole = torch.ops.phi4flash.dequantize(tiles, scales, extra, group, None)
            assert torch.equal(whole, w.to(torch.bfloat16)), (bits, group)
            picked = torch.ops.phi4flash.dequantize(tiles, scales, extra, group, torch.tensor([n - 1, 0]))
            assert torch.equal(picked, w[[n - 1, 0]].to(torch.bfloat16)), (bits, group)
    for rows, n, k in [(1, 40, 256), (2, 12, 100), (5, 7, 96)]:  # decode's rows, inputs past the vectors' width
        x, w = torch.randn(rows, k).to(torch.bfloat16), torch.randn(n, k).to(torch.bfloat16)
        expected = x.double() @ w.double().t()
        error = (torch.ops.phi4flash.bf16_linear(x, w).double() - expected).abs() / (expected.abs() + 1e-3)
        assert error.max().item() <= 2**-8, (rows, n, k, error.max().item())
    for heads, kv_heads, head_dim in [(40, 20, 64), (4, 2, 32), (12, 4, 24), (4, 2, 44), (4, 2, 30)]:
        q, k, v = torch.randn(2, heads, head_dim), torch.randn(2, 50, kv_heads, head_dim), torch.randn(2, 50, kv_heads,
                                                                                                        head_dim)
        valid = torch.rand(2, 50) > 0.3
        got = torch.ops.phi4flash.diff_attention_decode(q, k, v, valid, head_dim**-0.5)
        expected = decode_attention_reference(q, k, v, valid, head_dim**-0.5)
        assert (got.double() - expected).abs().max().item() <= 1e-5, (heads, kv_heads, head_dim)
    for width, length, state_size in [(40, 19, 8), (20, 7, 16)]:
        u, delta = torch.randn(2, length, width), torch.rand(2, length, width) + 0.1
        A, D = -torch.rand(width, state_size) - 0.1, torch.randn(width)
        B, C, state = torch.randn(2, length, state_size), torch.randn(2, length, state_size), torch.randn(2, width,
                                                                                                          state_size)
        inputs = [t.double().requires_grad_() for t in (u, delta, A, B, C, D, state)]
        y_ref, last_ref = ops.selective_scan_reference(*(t.transpose(1, 2) if t.dim() == 3 and t is not inputs[6]
                                                         else t for t in inputs))
        gy, g_last = torch.randn(y_ref.shape, dtype=torch.float64), torch.randn(last_ref.shape, dtype=torch.float64)
        ((y_ref * gy).sum() + (last_ref * g_last).sum()).backward()
        leaves = [t.detach().float().requires_grad_() for t in inputs]
        y, last = ops._NativeScan.apply(*leaves)  # the kernel's layouts: y (B, T, E)
        assert (y.double().transpose(1, 2) - y_ref).abs().max().item() <= 1e-4, (width, state_size)
        ((y.transpose(1, 2) * gy.float()).sum() + (last * g_last.float()).sum()).backward()
        for leaf, ref in zip(leaves, inputs, strict=True):
            assert (leaf.grad.double() - ref.grad).abs().max().item() <= 1e-4 * (1 + ref.grad.abs().max().item())
    for dtype in (torch.float32, torch.bfloat16):  # the decode step's attention with its combination
        q, k, v = torch.randn(2, 12, 24).to(dtype), *(torch.randn(2, 40, 4, 24).to(dtype) for _ in range(2))
        lam, gain = torch.tensor(0.3), torch.rand(48).to(dtype) + 0.5
        got = torch.ops.phi4flash.diff_attention_step(q, k, v, None, 0.2, lam, gain, 0.5, 1e-5)
        heads = torch.ops.phi4flash.diff_attention_decode(q, k, v, None, 0.2)
        expected = ops.differential_combination(heads[:, 0], heads[:, 1], lam, 0.5, gain, 1e-5).reshape(2, -1)
        assert ((got.double() - expected.double()).abs() / (1 + expected.double().abs())).max().item() <= 2**-7
    for width, state_size in [(44, 16), (20, 6)]:  # the Mamba decode step: whole vectors and tails
        x, z = torch.randn(2, width), torch.randn(2, width)
        weight, bias, conv = torch.randn(width, 1, 4), torch.randn(width), torch.randn(2, width, 4)
        conv_ref = conv.clone()
        got = torch.ops.phi4flash.conv_step(x, weight, bias, conv)
        expected = ops.causal_conv1d_step(x, weight, bias, conv_ref)
        assert torch.equal(conv, conv_ref) and (got - expected).abs().max().item() <= 1e-5
        dt, dt_bias, D = torch.randn(2, width) * 5, torch.randn(width), torch.randn(width)
        A_log, B, C = torch.randn(width, state_size), torch.randn(2, state_size), torch.randn(2, state_size)
        A, state = -torch.exp(A_log), torch.randn(2, width, state_size)
        state_ref = state.clone()
        gated, _ = torch.ops.phi4flash.scan_step(expected, dt, dt_bias, A_log, B, C, D, z, state, False)
        y = ops.selective_scan_step(expected, torch.nn.functional.softplus(dt + dt_bias), A, B, C, D, state_ref)
        assert (state - state_ref).abs().max().item() <= 1e-5 * (1 + state_ref.abs().max().item())
        assert (gated - y * torch.nn.functional.silu(z)).abs().max().item() <= 1e-5 * (1 + y.abs().max().item())
    for width in (44, 5):  # the layer functions (called on the module): whole vectors and tails
        for dtype in (torch.float32, torch.bfloat16):
            x, delta = torch.randn(3, width), torch.randn(3, width).to(dtype)
            weight, bias = torch.randn(width).to(dtype), torch.randn(width).to(dtype)
            total, normed = module.add_layer_norm(x, delta, weight, bias, 1e-5)
            expected = torch.nn.functional.layer_norm((x + delta.float()).to(dtype), (width,), weight, bias, 1e-5)
            assert torch.equal(total, x + delta.float())
            assert ((normed.double() - expected.double()).abs() / (1 + expected.double().abs())).max() <= 2**-7
            gate, up = torch.randn(3, 2 * width).to(dtype).chunk(2, dim=-1)
            got, expected = module.silu_mul(gate, up), torch.nn.functional.silu(gate) * up
            assert ((got.double() - expected.double()).abs() / (1 + expected.double().abs())).max() <= 2**-7
    print("PORTABLE OK", module.isa())


if __name__ == "__main__":
    main(*sys.argv[1:3])
