"""Training speed on the CPU: the compiled training step against the eager one, on the batches ``phi4flash train``
draws.

    python benchmarks/bench_train_compile.py [--rounds 3] [--batches 30] [--threads 2]

Both sides train the embedded model's default shape from the same initial weights, each with its own optimizer,
through the same training kernels (``_training_kernels``: the training scan), in the precision that
``phi4flash train`` picks on this CPU (``--precision`` to choose: bfloat16 autocast or float32), on the same
batches: chats generated and batched as ``phi4flash train`` does (at most 32 chats and 10,240 tokens, padding
included, grouped by length), tokenized with the shipped tokenizer. Each round times every batch on one side, then
on the other; the best round is reported, with the spread (worst / best). The compile itself (the first batch, and
the first batch long enough to attend through the fused kernel) is timed apart: a
training run pays it once, within its time budget.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from tokenizers import Tokenizer

from phi4flash.config import Phi4FlashConfig
from phi4flash.model import Phi4FlashForCausalLM
from phi4flash.training import data
from phi4flash.training import train as train_mod
from phi4flash.training.tokenizer_train import model_config

Batch = train_mod.Batch


def _batches(tok: Tokenizer, count: int, seed: int, weights: dict[str, float] | None = None,
             tool_sessions: float = 0.0) -> list[Batch]:
    cfg = train_mod.TrainConfig()
    examples = data.generate(cfg.batch_size * (count + 20), seed=seed, split="train", weights=weights,
                             tool_sessions=tool_sessions)
    encoded = [train_mod.encode_example(tok, ex) for ex in examples]
    batches = train_mod.make_batches(encoded, cfg.batch_size, tok.token_to_id("<|endoftext|>"), seed, cfg.batch_tokens)
    return batches[:count]


def _trainer(tok: Tokenizer, compiled: bool, bf16: bool, loss_positions_only: bool = True
             ) -> Callable[[Batch], float]:
    torch.manual_seed(0)
    model = Phi4FlashForCausalLM(Phi4FlashConfig.from_dict(model_config(tok, **train_mod.DEFAULT_MODEL)))
    model.init_weights(std=0.02)
    model.train()
    optimizer = torch.optim.AdamW(train_mod._param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    forward = train_mod._compiled(model) if compiled else model

    def step(batch: Batch) -> float:
        return train_mod.train_step(forward, model, optimizer, *batch, bf16=bf16,
                                    loss_positions_only=loss_positions_only)

    return step


def batch_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the options of a benchmark of training steps on drawn batches: rounds, batches, threads, seed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported")
    parser.add_argument("--batches", type=int, default=30, help="batches per round and side")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=5, help="seed of the chats")
    return parser


def main() -> int:
    parser = batch_arguments(__doc__.split("\n")[0])
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="bfloat16 autocast or float32; auto: as phi4flash train picks on this CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = train_mod.trains_in_bfloat16(None if args.precision == "auto" else args.precision == "bf16")
    tok = Tokenizer.from_file(str(train_mod.EMBEDDED_DIR / "tokenizer.json"))
    batches = _batches(tok, args.batches, args.seed)
    tokens = sum(batch.ids.numel() for batch in batches)
    sides = {"eager": _trainer(tok, compiled=False, bf16=bf16), "compiled": _trainer(tok, compiled=True, bf16=bf16)}
    with train_mod._training_kernels():
        long = next((b for b in batches if b.ids.shape[1] >= train_mod.TRAINING_FUSED_MIN_QUERIES), None)
        warm = [batches[0]] + ([long] if long is not None else [])
        compile_seconds = 0.0
        for name, step in sides.items():  # warm-up: the kernels' build, the compile, first allocations
            started = time.perf_counter()
            for batch in warm:
                step(batch)
            if name == "compiled":
                compile_seconds = time.perf_counter() - started
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, step in sides.items():
                started = time.perf_counter()
                for batch in batches:
                    step(batch)
                times[name].append(time.perf_counter() - started)
    shapes = sorted({tuple(batch.ids.shape) for batch in batches}, key=lambda s: s[1])
    print(f"# {len(batches)} training batches as phi4flash train draws them ({tokens:,} tokens with padding, "
          f"{len(shapes)} shapes from {shapes[0][0]}x{shapes[0][1]} to {shapes[-1][0]}x{shapes[-1][1]}), "
          f"{train_mod.precision_name(bf16)}, {args.threads} threads, best of {args.rounds} interleaved "
          "rounds (spread worst/best)\n")
    print("| step | s per step | tokens/s | spread |")
    print("|---|---:|---:|---:|")
    for name, seconds in times.items():
        best = min(seconds)
        print(f"| {name} | {best / len(batches):.3f} | {tokens / best:,.0f} | {max(seconds) / best:.2f} |")
    print(f"\ncompiled / eager: {min(times['eager']) / min(times['compiled']):.2f}x faster; the compile (the first "
          f"{len(warm)} batch{'es' if len(warm) > 1 else ''}) took {compile_seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
