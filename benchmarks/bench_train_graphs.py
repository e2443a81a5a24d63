"""Training compiles on the CPU, two ways of one training step side by side: cold compile time, graphs, step time.

    python benchmarks/bench_train_graphs.py [--compare graphs|loss-positions] [--rounds 2] [--batches 30] [--seed 3]

``--compare graphs`` (the default): one graph per attention branch (sums without size guards, as ``phi4flash
train`` compiles) against inductor's default (each branch twice, on both sides of its 4,096-element split of
float32 sums). ``--compare loss-positions``: the cross-decoder and the head at the loss positions only (as
``phi4flash train`` steps, :class:`phi4flash.model.LossPositions`) against every position.

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

# each comparison's two sides: (name, sums with size guards, loss positions only)
COMPARISONS = {
    "graphs": (("one graph per branch", False, True), ("inductor's default", True, True)),
    "loss-positions": (("loss positions only", False, True), ("every position", False, False)),
}


def _worker(compare: str, side: int, batches_n: int, threads: int, seed: int) -> dict[str, float]:
    import torch
    from bench_train_compile import _batches, _trainer
    from tokenizers import Tokenizer

    from phi4flash.training import train as train_mod

    torch.set_num_threads(threads)
    bf16 = train_mod.trains_in_bfloat16(None)
    tok = Tokenizer.from_file(str(train_mod.EMBEDDED_DIR / "tokenizer.json"))
    batches = _batches(tok, batches_n, seed, tool_sessions=0.75)
    passes = []
    _, guarded_sums, loss_positions_only = COMPARISONS[compare][side]
    with train_mod._training_kernels(guarded_sums=guarded_sums):
        step = _trainer(tok, compiled=True, bf16=bf16, loss_positions_only=loss_positions_only)
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
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="graphs", help="the two sides to compare")
    parser.add_argument("--worker", type=int, choices=(0, 1), help=argparse.SUPPRESS)  # the parent process passes it
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(_worker(args.compare, args.worker, args.batches, args.threads, args.seed)))
        return 0
    names = [side[0] for side in COMPARISONS[args.compare]]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as caches:
        for round_ in range(args.rounds):
            for index in (0, 1) if round_ % 2 == 0 else (1, 0):
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(caches) / str(index))}
                done = subprocess.run(
                    [sys.executable, __file__, "--compare", args.compare, "--worker", str(index), "--batches",
                     str(args.batches), "--threads", str(args.threads), "--seed", str(args.seed)],
                    env=env, check=True, capture_output=True, text=True)
                results[names[index]].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"round {round_ + 1}, {names[index]}: {results[names[index]][-1]}", file=sys.stderr, flush=True)
    first = results[names[0]][0]
    print(f"# {args.batches} training batches as phi4flash train draws them ({first['tokens']:,} tokens with "
          f"padding), {first['precision']}, {args.threads} threads; cold compiles in round 1, best of "
          f"{args.rounds} rounds for the steps (spread worst/best)\n")
    print("| side | graphs | cold compile s | s per step | tokens/s | spread |")
    print("|---|---:|---:|---:|---:|---:|")
    best = {}
    for side, runs in results.items():
        cold = runs[0]["first"] - runs[0]["second"]
        seconds = [run["second"] for run in runs]
        best[side] = min(seconds)
        print(f"| {side} | {runs[0]['graphs']} | {cold:.0f} | {best[side] / args.batches:.3f} | "
              f"{first['tokens'] / best[side]:,.0f} | {max(seconds) / best[side]:.2f} |")
    ratio = best[names[1]] / best[names[0]]
    print(f"\nsteps of {names[0]} / {names[1]}: {ratio:.2f}x as fast")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
