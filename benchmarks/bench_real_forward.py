"""Forward speed of the real-size architecture (3.85B parameters, random weights) on this machine.

    python benchmarks/bench_real_forward.py [--tokens 512] [--dtype bfloat16] [--device cpu]

Builds the model from the real config.json on the meta device, materialises it in the given dtype with
random weights, and times a full forward over a prompt, and the engine's prefill (cross-decoder on the
last token only), in tokens/s.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from gpu_models import build_phi4flash  # noqa: E402 - benchmarks/ is on sys.path when run as a script

from phi4flash import Phi4FlashConfig

REAL_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "checkpoint" / "config.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(REAL_CONFIG))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    config = Phi4FlashConfig.from_json(args.config)
    start = time.perf_counter()
    model = build_phi4flash(config, args.device, dtype)
    print(f"materialised {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters in {args.dtype} on "
          f"{args.device} in {time.perf_counter() - start:.1f} s; {torch.get_num_threads()} threads")
    ids = torch.randint(0, 200000, (1, args.tokens), device=args.device)
    with torch.no_grad():
        for label, run in (("full forward (all 32 layers, all logits)", lambda: model(ids)),
                           ("prefill with the cross-decoder skipped", lambda: model(
                               ids, cache=model.new_cache(1, args.tokens + 1), logits_to_keep=1))):
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            print(f"{label}: {args.tokens} tokens in {best:.2f} s = {args.tokens / best:.1f} tokens/s")


if __name__ == "__main__":
    main()
