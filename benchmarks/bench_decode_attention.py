"""One decode step's differential attention at the real model's shapes: phi4flash's C++ kernel against the
PyTorch path it replaces, on this CPU.

    python benchmarks/bench_decode_attention.py                      # contexts 64, 512, 2048, 8192
    python benchmarks/bench_decode_attention.py --contexts 2048 --rounds 7

One query per row (B = 1), 40 query heads, 20 kv heads of width 64, bfloat16, the keys and values a slice of a
longer cache as the model keeps them. Both sides run ``ops.differential_attention`` (the whole layer's attention:
scores, softmax, values, the differential combination and its norm); "pytorch" is the same call with the C++
kernel turned off (the matmul path phi4flash takes where the kernels are not built). The two take turns within
each round; each number is the best of the rounds, the spread (worst / best) beside it.

A decode step of the real model runs this 16 times: in the 8 sliding-window layers over at most 512 positions,
and in the full-attention layer and the 7 cross-attention layers over the whole context. The context's K/V stay
in the CPU's last-level cache here while they are small; in a real step the weights stream in between and evict
them, so the short contexts are the best case.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from phi4flash import ops

HEADS, KV_HEADS, HEAD_DIM = 40, 20, 64


def attention_call(context: int, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """One decode step's attention over ``context`` cached positions (random values), as the model calls it."""
    q = torch.randn(1, 1, HEADS, HEAD_DIM).to(dtype)
    cache = torch.randn(2, 1, context + 64, KV_HEADS, HEAD_DIM).to(dtype)  # room to grow, as a cache has
    k, v = cache[0, :, :context], cache[1, :, :context]
    lam, subln = torch.tensor(0.3), torch.ones(2 * HEAD_DIM, dtype=dtype)
    return lambda: ops.differential_attention(q, k, v, lam, 0.8, subln, 1e-5, None)


def per_call_seconds(fn: Callable[[], torch.Tensor], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def kernel_benchmark_setup(description: str, extra: Callable[[argparse.ArgumentParser], None]
                           ) -> tuple[argparse.Namespace, object, torch.dtype]:
    """The options that the C++-kernel benchmarks share (threads, rounds, dtype) and ``extra``'s, parsed; the
    threads and seed set; returns (args, the loaded kernels, dtype), or exits when the kernels are not built."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    extra(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from phi4flash import native

    kernels = native.load()
    if kernels is None:
        raise SystemExit("phi4flash's C++ kernels are not built here (no compiler?): nothing to compare")
    return args, kernels, getattr(torch, args.dtype)


def main() -> None:
    args, kernels, dtype = kernel_benchmark_setup(
        __doc__, lambda parser: parser.add_argument("--contexts", default="64,512,2048,8192"))
    native_check = ops._native_decode_attention
    sides = {"phi4flash": native_check, "pytorch": lambda *_: False}
    print(f"# {HEADS} heads, {KV_HEADS} kv heads of {HEAD_DIM}, {args.dtype}, one query, {args.threads} threads, "
          f"kernels: {kernels.isa()}; {args.rounds} rounds, the two sides in turns")
    print("\n| context | phi4flash us | pytorch us | pytorch / phi4flash |\n|---|---:|---:|---:|")
    with torch.no_grad():
        for context in (int(c) for c in args.contexts.split(",")):
            fn = attention_call(context, dtype)
            calls = max(5, 40_000 // context)
            times: dict[str, list[float]] = {name: [] for name in sides}
            for _ in range(args.rounds):
                for name, check in sides.items():
                    ops._native_decode_attention = check
                    try:
                        fn()  # warm
                        times[name].append(per_call_seconds(fn, calls))
                    finally:
                        ops._native_decode_attention = native_check
            best = {name: min(t) for name, t in times.items()}
            spread = {name: max(t) / min(t) for name, t in times.items()}
            print(f"| {context} | {best['phi4flash'] * 1e6:.0f} ({spread['phi4flash']:.2f}x) | "
                  f"{best['pytorch'] * 1e6:.0f} ({spread['pytorch']:.2f}x) | "
                  f"{best['pytorch'] / best['phi4flash']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
