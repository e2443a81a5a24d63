"""Fine-tuning speed on the CPU: one forward and backward pass of the embedded model, C++ scan against the definition.

    OMP_NUM_THREADS=1 python benchmarks/bench_finetune_step.py [--rounds 3] [--batch 4] [--length 256]

What transformers and peft training reach: the model's own scan dispatch with gradients on, in float32. With
phi4flash's C++ kernels built, the Mamba layers' scan runs in C++ forward and backward
(``phi4flash::selective_scan_backward``); without them it runs the step-by-step definition, which is what
every CPU ran before the C++ scan had a backward pass. Both run in turns within every round; each number is the
best round, with the spread (worst / best).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import phi4flash
from phi4flash import ops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported")
    parser.add_argument("--batch", type=int, default=4, help="sequences per pass")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    args = parser.parse_args()
    engine = phi4flash.load("embedded")
    model = engine.model.float().train().requires_grad_(True)
    torch.manual_seed(0)
    ids = torch.randint(0, engine.vocab_limit, (args.batch, args.length))

    def timed(native: bool) -> float:
        original = ops.native_scan
        if not native:
            ops.native_scan = lambda *a: None
        try:
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
            return time.perf_counter() - start
        finally:
            ops.native_scan = original

    timed(True)  # warm-up: the kernels' build, first allocations
    timed(False)
    runs: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for native in (True, False):
            runs[native].append(timed(native))
    fast, slow = runs[True], runs[False]
    print(f"# forward + backward, embedded model, {args.batch} x {args.length} tokens, {torch.get_num_threads()} "
          f"threads, best of {args.rounds} interleaved rounds (spread worst/best)")
    print(f"C++ scan: {min(fast):.3f} s ({max(fast) / min(fast):.2f}); step-by-step definition: {min(slow):.3f} s "
          f"({max(slow) / min(slow):.2f}); speed-up {min(slow) / min(fast):.1f}x")
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
