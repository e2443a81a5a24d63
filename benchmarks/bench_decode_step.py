"""The work between the projections of one decode step, at the real model's shapes: phi4flash's C++ step
kernels against the PyTorch operations that do the same, on this CPU.

    python benchmarks/bench_decode_step.py [--rounds 5] [--threads 2] [--context 512]

Two parts of a decode step, each timed both ways in the same run, the two sides in turns within each round (the
best round is reported, with the spread, worst / best):
- "mamba": one Mamba mixer's step (``Mamba.step``: the convolution, the scan, the SiLU gate, with its projections
  replaced by zeros of their shapes so that only the work between them is timed): ``phi4flash::conv_step`` and
  ``phi4flash::scan_step`` against the model's PyTorch step (``ops.causal_conv1d_step``,
  ``ops.selective_scan_step``'s dispatch, the gate), which runs where the kernels do not apply;
- "attention": one layer's differential attention over ``--context`` cached positions
  (``ops.differential_attention``): ``phi4flash::diff_attention_step`` (the kernel and the differential
  combination in one call) against ``phi4flash::diff_attention_decode`` followed by the combination in PyTorch
  (``ops.differential_combination``), what the model ran before the combination moved into the kernel.
The real model's decode step has 9 Mamba steps (8 Mamba layers and the memory-emitting one) and 16 such attentions.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

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


def attention_step(context: int, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """One layer's decode attention over ``context`` cached positions (random values), as the model calls it."""
    heads, kv_heads, head_dim = REAL.num_attention_heads, REAL.num_key_value_heads, REAL.head_dim
    q = torch.randn(1, 1, heads, head_dim).to(dtype)
    cache = torch.randn(2, 1, context + 64, kv_heads, head_dim).to(dtype)
    k, v = cache[0, :, :context], cache[1, :, :context]
    lam, subln = torch.tensor(0.3), torch.ones(2 * head_dim, dtype=dtype)
    return lambda: ops.differential_attention(q, k, v, lam, 0.8, subln, 1e-5, None)


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from phi4flash import native

    kernels = native.load()
    if kernels is None:
        raise SystemExit("phi4flash's C++ kernels are not built here (no compiler?): nothing to compare")
    dtype = getattr(torch, args.dtype)
    namespace = torch.ops.phi4flash
    fused_attention = namespace.diff_attention_step
    switches: dict[str, dict[str, Callable[[bool], None]]] = {
        "mamba": {"phi4flash": lambda on: setattr(model, "native_mamba_step",
                                                   ops.native_mamba_step if on else lambda *a: False)},
        "attention": {"phi4flash": lambda on: setattr(namespace, "diff_attention_step",
                                                       fused_attention if on else _combined_in_pytorch)},
    }
    calls = {"mamba": 200, "attention": max(20, 40_000 // args.context)}
    work = {"mamba": mamba_step(dtype), "attention": attention_step(args.context, dtype)}
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
                        times[side].append(per_call_us(fn, calls[part]))
            finally:
                switch(True)
            best = {side: min(values) for side, values in times.items()}
            spread = {side: max(values) / min(values) for side, values in times.items()}
            print(f"| {part} | {best['phi4flash']:.0f} ({spread['phi4flash']:.2f}x) | {best['pytorch']:.0f} "
                  f"({spread['pytorch']:.2f}x) | {best['pytorch'] / best['phi4flash']:.2f}x |")


if __name__ == "__main__":
    main()
