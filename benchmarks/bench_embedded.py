"""Decode speed of the embedded model through the engine: one sequence and a batch of 8, three ways.

    OMP_NUM_THREADS=1 python benchmarks/bench_embedded.py [--rounds 3]

- "before": the eager step with the PyTorch selective scan and attention (what the engine ran before the C++
  kernels; it does keep the engine's later scheduling, which keeps running requests on the first cache rows);
- "eager": the eager step as the engine runs it by default (the C++ scan when built);
- "compiled": ``phi4flash.load(..., compile=True)``, the decode step compiled once (compile time reported).

The same greedy requests run on each engine in turns within every round; each number is the best round, with the
spread (best / worst) beside it. Decode tokens/s are the engine's own metrics (decode time after the first token).
"""

from __future__ import annotations

import argparse
import time

import torch

import phi4flash
from phi4flash import GenerationConfig, ops

PROMPTS = ["What is 4873 + 3568?", "Solve 7x - 12 = 51", "What is 25% of 480?", "What is 96 - 58?",
           "What is 73 * 8?", "Solve 3x + 5 = 20", "What is 20% of 150?", "What is 487 + 356?"]


def decode_rate(engine: phi4flash.LocalEngine, batch: int, before: bool) -> float:
    """Decode tokens/s per sequence (batch 1) or in total (batch 8), from the engine's metrics."""
    originals = ops.native_scan, ops._native_decode_attention
    if before:  # the PyTorch scan and attention, as before the C++ kernels
        ops.native_scan, ops._native_decode_attention = (lambda *args: None), (lambda *args: False)
    try:
        config = GenerationConfig(temperature=0, max_new_tokens=200)
        conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:batch]]
        start = time.perf_counter()
        done = engine.generate_batch(conversations, config)
        wall = time.perf_counter() - start
    finally:
        ops.native_scan, ops._native_decode_attention = originals
    if batch == 1:
        return done[0].metrics.decode_tokens_per_s or 0.0
    return sum(c.usage.completion_tokens for c in done) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    compiled = phi4flash.load("embedded", compile=True)
    compile_s = time.perf_counter() - start
    eager = phi4flash.load("embedded", compile=False)
    variants = {"before (eager, PyTorch scan and attention)": (eager, True), "eager": (eager, False),
                "compiled": (compiled, False)}
    runs: dict[tuple[str, int], list[float]] = {}
    for batch in (1, 8):  # a warm-up round, not recorded: a compiled step may recompile for a new batch size
        for engine, before in variants.values():
            decode_rate(engine, batch, before)
    for _ in range(args.rounds):
        for batch in (1, 8):
            for name, (engine, before) in variants.items():
                runs.setdefault((name, batch), []).append(decode_rate(engine, batch, before))
    print(f"# embedded model, {torch.get_num_threads()} threads, greedy, 200 new tokens at most, best of "
          f"{args.rounds} rounds; compiled step: {compiled.compiled_step} (load + compile {compile_s:.0f} s)\n")
    print("| decode | " + " | ".join(variants) + " | compiled / before |\n|---|" + "---|" * (len(variants) + 1))
    for batch, label in ((1, "one sequence, tok/s"), (8, "batch of 8, total tok/s")):
        best = {name: max(runs[(name, batch)]) for name in variants}
        cells = [f"{best[n]:.0f} ({max(runs[(n, batch)]) / max(min(runs[(n, batch)]), 1e-9):.2f}x)" for n in variants]
        ratio = best["compiled"] / best["before (eager, PyTorch scan and attention)"]
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    compiled.close()
    eager.close()


if __name__ == "__main__":
    main()
