"""What transformers' generate() costs over the engine, on the same phi4flash model and checkpoint.

One checkpoint, loaded twice: ``phi4flash.load`` (the engine) and ``AutoModelForCausalLM.from_pretrained``
after ``import phi4flash.hf``. Both decode the same random prompt greedily for exactly ``--new-tokens``
tokens (stop tokens held off); their outputs are checked to be the same tokens. The rounds interleave
the two sides; the table gives the best round and the spread (min..max) of each.

    OMP_NUM_THREADS=1 python benchmarks/bench_hf.py                 # width 384, 32 layers (phi4flash bench's)
    OMP_NUM_THREADS=1 python benchmarks/bench_hf.py --model embedded

TTFT: the engine's own metric (prompt in -> first token, with device syncs); transformers: call -> the
streamer's first generated token. Decode tokens/s: the tokens after the first over the time they took.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import torch

import phi4flash
import phi4flash.hf
from phi4flash import GenerationConfig
from phi4flash.bench import _TokenClock, our_config
from phi4flash.weights import EMBEDDED_DIR

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "generation_config.json")


def random_checkpoint(folder: Path, hidden: int, layers: int) -> Path:
    """The bench architecture at ``hidden`` width, random weights, with the embedded tokenizer (vocab 512)."""
    torch.manual_seed(0)
    config = dataclasses.replace(our_config(hidden, layers, 512, 512), bos_token_id=500, eos_token_id=500,
                                 pad_token_id=500)  # the embedded tokenizer's <|endoftext|>
    model = phi4flash.Phi4FlashForCausalLM(config)
    model.init_weights()
    phi4flash.save_checkpoint(model, folder)
    for name in TOKENIZER_FILES:
        shutil.copy(EMBEDDED_DIR / name, folder / name)
    return folder


def run_engine(engine: phi4flash.LocalEngine, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    config = GenerationConfig(temperature=0, max_new_tokens=n, min_new_tokens=n)
    done = phi4flash.collect(engine.stream_ids(prompt, config))
    return done.metrics.time_to_first_token_s, done.metrics.decode_tokens_per_s, done.token_ids


def run_transformers(model: torch.nn.Module, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    ids = torch.tensor([prompt])
    clock = _TokenClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, streamer=clock)
    first, last = clock.times[1], clock.times[-1]  # times[0]: the prompt, before any work
    return first - start, (n - 1) / (last - first), out[0, len(prompt):].tolist()


def main() -> None:
    """Print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a checkpoint folder or 'embedded' (default: random weights)")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            path = random_checkpoint(Path(tmp), args.hidden, args.layers)
            name = f"random weights, width {args.hidden}, {args.layers} layers"
        else:
            path = EMBEDDED_DIR if args.model == "embedded" else Path(args.model)
            name = args.model
        engine = phi4flash.load(str(path), device="cpu", dtype="float32", kept_state_bytes=0)  # no state reuse
        hf_model = phi4flash.hf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        generator = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, 500, (args.prompt,), generator=generator).tolist()
        results: dict[str, list[tuple[float, float]]] = {"engine": [], "transformers generate()": []}
        run_engine(engine, prompt[:32], 4)  # warm-up
        run_transformers(hf_model, prompt[:32], 4)
        for _ in range(args.rounds):
            ttft, tps, ours = run_engine(engine, prompt, args.new_tokens)
            results["engine"].append((ttft, tps))
            ttft, tps, theirs = run_transformers(hf_model, prompt, args.new_tokens)
            results["transformers generate()"].append((ttft, tps))
            if ours != theirs:
                raise RuntimeError("the engine and generate() decoded different tokens")
        engine.close()
    print(f"# {name}; prompt {args.prompt} tokens, {args.new_tokens} new tokens, float32 on CPU, "
          f"{torch.get_num_threads()} threads, best of {args.rounds} interleaved rounds (min..max)")
    print("\n| path | TTFT ms | decode tok/s |\n|---|---|---|")
    for label, runs in results.items():
        ttfts, rates = [r[0] * 1000 for r in runs], [r[1] for r in runs]
        print(f"| {label} | {min(ttfts):.0f} ({min(ttfts):.0f}..{max(ttfts):.0f}) | "
              f"{max(rates):.1f} ({min(rates):.1f}..{max(rates):.1f}) |")
    best = {label: (min(r[0] for r in runs), max(r[1] for r in runs)) for label, runs in results.items()}
    e, t = best["engine"], best["transformers generate()"]
    print(f"\ngenerate() / engine: TTFT {t[0] / e[0]:.2f}x, decode speed {t[1] / e[1]:.2f}x")


if __name__ == "__main__":
    main()
