"""The work between the projections of one decode step, at the real model's shapes: phi4flash's C++ step
kernels against the PyTorch operations that do the same, on this CPU.

    python benchmarks/bench_decode_step.py [--rounds 5] [--threads 2] [--context 512]

Three parts of a decode step, each timed both ways in the same run, the two sides in turns within each round (the
best round is reported, with the spread, worst / best):
- "mamba": one Mamba mixer's step (``Mamba.step``: the convolution, the scan, the SiLU gate, with its projections
  replaced by zeros of their shapes so that only the work between them is timed): ``phi4flash::conv_step`` and
  ``phi4flash::scan_step`` against the model's PyTorch step (``ops.causal_conv1d_step``,
  ``ops.selective_scan_step``'s dispatch, the gate), which runs where the kernels do not apply;
- "attention": one layer's differential attention over ``--context`` cached positions
  (``ops.differential_attention``): ``phi4flash::diff_attention_step`` (the kernel and the differential
  combination in one call) against ``phi4flash::diff_attention_decode`` followed by the combination in PyTorch
  (``ops.differential_combination``), what the model ran before the combination moved into the kernel;
- "layer": one decoder layer's work around its mixer and MLP projections (``layer_glue``: two LayerNorms, a
  residual add, the MLP's SiLU product): the C++ module's ``add_layer_norm`` and ``silu_mul`` against the PyTorch
  operations (casts, add, ``F.layer_norm``, ``F.silu``, the product).
The real model's decode step has 9 Mamba steps (8 Mamba layers and the memory-emitting one), 16 such attentions
and 32 layers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from bench_decode_attention import attention_call, kernel_benchmark_setup, per_call_seconds

from phi4flash import Phi4FlashConfig, model, ops
from phi4flash.cache import MambaState

REAL = Phi4FlashConfig.from_json(Path(__file__).resolve().parents[1] / "tests" / "data" / "checkpoint" / "config.json")


def _zero_projections(mixer: model.Mamba) -> None:
    for name in ("in_proj", "x_proj", "out_proj"):
        linear = getattr(mixer, name)
        width, dtype = linear.out_features, linear.weight.dtype
        linear.forward = lambda x, width=width, dtype=dtype: torch.zeros(*x.shape[:-1], width, dtype=dtype)


def mamba_step(dtype: torch.dtype) -> Callable[[], object]:
    """A Mamba mixer's decode step at the real model's shapes; the projections return zeros."""
    mixer = model.Mamba(REAL, layer_idx=0).to(dtype)
    mixer.A_log.data = mixer.A_log.data.float()
    _zero_projections(mixer)
    e, n, k = REAL.mamba_d_inner, REAL.mamba_d_state, REAL.mamba_d_conv
    state = MambaState(conv=torch.randn(1, e, k).to(dtype), ssm=torch.randn(1, e, n))
    h = torch.randn(1, REAL.hidden_size).to(dtype)
    return lambda: mixer.step(h, state)


def _combined_in_pytorch(q, k, v, valid, scale, lam, subln_weight, lambda_init, eps):  # noqa: ANN001, ANN202
    heads = torch.ops.phi4flash.diff_attention_decode(q, k, v, valid, scale)  # (B, 2, H/2, 2Dh)
    y = ops.differential_combination(heads[:, 0], heads[:, 1], lam, lambda_init, subln_weight, eps)
    return y.reshape(q.shape[0], -1)


def layer_glue(dtype: torch.dtype) -> Callable[[], object]:
    """A decoder layer's work around its mixer and its MLP's products, as ``DecoderLayer.forward`` and
    ``MLP.forward`` do it: the input LayerNorm, the mixer's output added with the post-attention LayerNorm, SiLU(gate)
    times up on fc1's output (float32 residual stream, random values)."""
    width, inner, eps = REAL.hidden_size, REAL.intermediate_size, REAL.layer_norm_eps
    x, out = torch.randn(1, 1, width), torch.randn(1, 1, width).to(dtype)
    fc1_out = torch.randn(1, 1, 2 * inner).to(dtype)
    weight, bias = torch.ones(width, dtype=dtype), torch.zeros(width, dtype=dtype)

    def glue() -> torch.Tensor:
        y, _ = ops.add_layer_norm(x, None, weight, bias, eps)
        _, h = ops.add_layer_norm(y, out, weight, bias, eps)
        gate, up = fc1_out.chunk(2, dim=-1)
        return ops.silu_mul(gate, up)

    return glue


def main() -> None:
    args, kernels, dtype = kernel_benchmark_setup(
        __doc__, lambda parser: parser.add_argument("--context", type=int, default=512))
    namespace = torch.ops.phi4flash
    fused_attention = namespace.diff_attention_step
    layer_kernels = ops._eager_layer_kernels
    switches: dict[str, dict[str, Callable[[bool], None]]] = {
        "mamba": {"phi4flash": lambda on: setattr(model, "native_mamba_step",
                                                   ops.native_mamba_step if on else lambda *a: False)},
        "attention": {"phi4flash": lambda on: setattr(namespace, "diff_attention_step",
                                                       fused_attention if on else _combined_in_pytorch)},
        "layer": {"phi4flash": lambda on: setattr(ops, "_eager_layer_kernels",
                                                   layer_kernels if on else lambda *a: None)},
    }
    calls = {"mamba": 200, "attention": max(20, 40_000 // args.context), "layer": 2000}
    work = {"mamba": mamba_step(dtype), "attention": attention_call(args.context, dtype), "layer": layer_glue(dtype)}
    print(f"# real model's shapes, {args.dtype}, one row, {args.threads} threads, kernels: {kernels.isa()}; "
          f"attention over {args.context} positions; {args.rounds} rounds, the two sides in turns")
    print("\n| part | phi4flash us | pytorch us | pytorch / phi4flash |\n|---|---:|---:|---:|")
    with torch.no_grad():
        for part, fn in work.items():
            switch = switches[part]["phi4flash"]
            times: dict[str, list[float]] = {"phi4flash": [], "pytorch": []}
            try:
                for _ in range(args.rounds):
                    for side in times:
                        switch(side == "phi4flash")
                        fn()  # warm
                        times[side].append(per_call_seconds(fn, calls[part]) * 1e6)
            finally:
                switch(True)
            best = {side: min(values) for side, values in times.items()}
            spread = {side: max(values) / min(values) for side, values in times.items()}
            print(f"| {part} | {best['phi4flash']:.0f} ({spread['phi4flash']:.2f}x) | {best['pytorch']:.0f} "
                  f"({spread['pytorch']:.2f}x) | {best['pytorch'] / best['phi4flash']:.2f}x |")


if __name__ == "__main__":
    main()
