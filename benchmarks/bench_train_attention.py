"""Training speed on the CPU: the training step with phi4flash's training attention (``training/attention.py``:
each head group at its own width, queries in blocks against the keys they see) against the model's own attention
(SDPA's fused kernel from ``TRAINING_FUSED_MIN_QUERIES`` tokens on, the explicit matmuls below; before the
training attention the threshold was 256, 192 since), on the batches the shipped model's run drew.

    python benchmarks/bench_train_attention.py [--rounds 3] [--batches 30] [--threads 2] [--compiled]

Both sides train the embedded model's default shape from the same initial weights, each with its own optimizer,
through the same training scan, in the precision that ``phi4flash train`` picks on this CPU, on the same batches:
chats generated with the mix and tool-session share of the shipped model's run (its train_summary.json), batched as
``phi4flash train`` does. Each round times every batch on one side, then on the other; the best round is reported,
with the spread (worst / best). ``--compiled`` compiles both sides' steps (minutes of compiles first; the two
models share one forward, so dynamo's cache of 8 graphs can fill and leave steps uncompiled: indicative only). Then each
attention alone, forward and backward, at four batch lengths of the same 10,240-token batches.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
from bench_train_compile import _batches, _trainer, batch_arguments
from tokenizers import Tokenizer

from phi4flash import model as model_mod
from phi4flash import ops
from phi4flash.training import train as train_mod
from phi4flash.training.attention import training_attention

SIDES = {"training attention": training_attention, "model's attention": ops.differential_attention}


def _attention_alone(length: int, rounds: int) -> dict[str, float]:
    """Best seconds of one attention call forward and backward, each side, at ``length`` tokens (bfloat16)."""
    batch, heads, kv_heads, dh = min(32, 10240 // length), 4, 2, 44
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(batch, length, n, dh, generator=g).to(torch.bfloat16).requires_grad_()
               for n in (heads, kv_heads, kv_heads))
    weight = torch.ones(2 * dh, requires_grad=True)
    grad = torch.randn(batch, length, heads * dh, generator=g).to(torch.bfloat16)
    best: dict[str, float] = {}
    for round_ in range(rounds + 1):
        for name, attend in SIDES.items():
            started = time.perf_counter()
            y = attend(q, k, v, torch.tensor(0.3), 0.2, weight, 1e-5, None, True)
            y.backward(grad)
            seconds = time.perf_counter() - started
            if round_:  # the first round warms up
                best[name] = min(best.get(name, seconds), seconds)
    return best


def main() -> int:
    parser = batch_arguments(__doc__.split("\n")[0])
    parser.add_argument("--compiled", action="store_true", help="compile both sides' training steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = train_mod.trains_in_bfloat16(None)
    tok = Tokenizer.from_file(str(train_mod.EMBEDDED_DIR / "tokenizer.json"))
    run = json.loads((train_mod.EMBEDDED_DIR / "train_summary.json").read_text())["train_config"]
    batches = _batches(tok, args.batches, args.seed, run["weights"], run["tool_sessions"])
    tokens = sum(batch.ids.numel() for batch in batches)
    steps: dict[str, Callable[..., float]] = {name: _trainer(tok, compiled=args.compiled, bf16=bf16) for name in SIDES}
    times: dict[str, list[float]] = {name: [] for name in SIDES}
    with train_mod._training_kernels():
        for round_ in range(args.rounds + 1):
            for name, step in steps.items():
                model_mod.differential_attention = SIDES[name]  # type: ignore[attr-defined]
                started = time.perf_counter()
                for batch in batches if round_ else batches[:1] + [max(batches, key=lambda b: b.ids.shape[1])]:
                    step(batch)
                if round_:  # the first round warms up (and compiles)
                    times[name].append(time.perf_counter() - started)
    lengths = sorted(batch.ids.shape[1] for batch in batches)
    print(f"# {len(batches)} training batches as the shipped model's run drew them ({tokens:,} tokens with padding, "
          f"{lengths[0]} to {lengths[-1]} tokens long, median {lengths[len(lengths) // 2]}), "
          f"{train_mod.precision_name(bf16)}, {'compiled' if args.compiled else 'eager'} steps, {args.threads} "
          f"threads, best of {args.rounds} interleaved rounds (spread worst/best)\n")
    print("| attention | s per step | tokens/s | spread |")
    print("|---|---:|---:|---:|")
    for name, seconds in times.items():
        best = min(seconds)
        print(f"| {name} | {best / len(batches):.3f} | {tokens / best:,.0f} | {max(seconds) / best:.2f} |")
    base, new = min(times["model's attention"]), min(times["training attention"])
    print(f"\ntraining attention: {base / new:.2f}x the steps a minute\n")
    print("| tokens | batch | training attention ms | model's attention ms | ratio |")
    print("|---:|---:|---:|---:|---:|")
    with train_mod._training_kernels(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for length in (128, 256, 384, 512):  # the model's attention with training's threshold
            best = _attention_alone(length, args.rounds)
            ours, theirs = best["training attention"], best["model's attention"]
            print(f"| {length} | {min(32, 10240 // length)} | {ours * 1e3:.1f} | {theirs * 1e3:.1f} | "
                  f"{theirs / ours:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
