"""Training compiles on the CPU: one graph per attention branch (sums without size guards, as ``phi4flash train``
compiles) against inductor's default (each branch twice, on both sides of its 4,096-element split of float32
sums), cold compile time and step time.

    python benchmarks/bench_train_graphs.py [--rounds 2] [--batches 30] [--threads 2] [--seed 3]

Each side runs in its own process with its own inductor cache (a fresh one in the first round, so its compiles
are cold as on a new machine, kept for the later rounds), on the same batches: chats generated and batched as
``phi4flash train`` does with ``--tool-sessions 0.75``, the embedded model's default shape from the same initial
weights, in the precision ``phi4flash train`` picks on this CPU. A process trains on the batches twice: the first
pass compiles as it goes, the second only steps; compile time is the first pass's surplus over the second. The
sides alternate which goes first from round to round; step times are the best second pass, with the spread
(worst / best).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_train_compile import batch_arguments

SIDES = ("one graph per branch", "inductor's default")


def _worker(side: str, batches_n: int, threads: int, seed: int) -> dict[str, float]:
    import torch
    from bench_train_compile import _batches, _trainer
    from tokenizers import Tokenizer

    from phi4flash.training import train as train_mod

    torch.set_num_threads(threads)
    bf16 = train_mod.trains_in_bfloat16(None)
    tok = Tokenizer.from_file(str(train_mod.EMBEDDED_DIR / "tokenizer.json"))
    batches = _batches(tok, batches_n, seed, tool_sessions=0.75)
    passes = []
    with train_mod._training_kernels(guarded_sums=side == SIDES[1]):
        step = _trainer(tok, compiled=True, bf16=bf16)
        for _ in range(2):
            started = time.perf_counter()
            for batch in batches:
                step(batch)
            passes.append(time.perf_counter() - started)
    from torch._dynamo.utils import counters

    return {"first": passes[0], "second": passes[1], "graphs": counters["stats"]["unique_graphs"],
            "tokens": sum(batch.ids.numel() for batch in batches), "precision": train_mod.precision_name(bf16)}


def main() -> int:
    parser = batch_arguments(__doc__.split("\n")[0])
    parser.set_defaults(rounds=2, seed=3)
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)  # the parent process passes it
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.batches, args.threads, args.seed)))
        return 0
    results: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as caches:
        for round_ in range(args.rounds):
            for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(caches) / str(SIDES.index(side)))}
                done = subprocess.run(
                    [sys.executable, __file__, "--worker", side, "--batches", str(args.batches), "--threads",
                     str(args.threads), "--seed", str(args.seed)], env=env, check=True, capture_output=True, text=True)
                results[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"round {round_ + 1}, {side}: {results[side][-1]}", file=sys.stderr, flush=True)
    first = results[SIDES[0]][0]
    print(f"# {args.batches} training batches as phi4flash train draws them ({first['tokens']:,} tokens with "
          f"padding), {first['precision']}, {args.threads} threads; cold compiles in round 1, best of "
          f"{args.rounds} rounds for the steps (spread worst/best)\n")
    print("| compile | graphs | cold compile s | s per step | tokens/s | spread |")
    print("|---|---:|---:|---:|---:|---:|")
    best = {}
    for side, runs in results.items():
        cold = runs[0]["first"] - runs[0]["second"]
        seconds = [run["second"] for run in runs]
        best[side] = min(seconds)
        print(f"| {side} | {runs[0]['graphs']} | {cold:.0f} | {best[side] / args.batches:.3f} | "
              f"{first['tokens'] / best[side]:,.0f} | {max(seconds) / best[side]:.2f} |")
    ratio = best[SIDES[1]] / best[SIDES[0]]
    print(f"\nsteps of {SIDES[0]} / {SIDES[1]}: {ratio:.2f}x as fast")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
