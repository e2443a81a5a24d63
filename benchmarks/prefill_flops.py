"""How far `phi4flash bench`'s prefill ratio can go: the arithmetic of both models' prefills, counted.

    python benchmarks/prefill_flops.py [--lengths 512,2048,8192]

The dense products (every weight matrix times every prompt token, as the engine prefills: the self-decoder on all
but the last token, which runs the whole model) are counted by running the prefill under PyTorch's
``FlopCounterMode`` at 1,024 tokens (they grow linearly with the prompt). PyTorch's counter does not see the fused
attention kernels on the CPU, so attention is counted from the shapes: per query, 2 x heads x (Dh for the
scores + the value width) multiply-adds for each key it sees. The baseline's 32 causal layers see on average
half the prompt; ours see the 512-token window in its sliding-window layers and the prompt in its one
full-attention layer (the cross-decoder does not run in the prefill). The selective scan (a few multiply-adds per
state per token, 0.1% of ours) is left out.

The ratio of the two counts is the prefill speed-up that equal arithmetic speed on both sides would give: what
``phi4flash bench`` can reach at this width by execution alone.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from phi4flash.bench import baseline_model, our_config
from phi4flash.config import SLIDING_ATTENTION
from phi4flash.model import Phi4FlashForCausalLM

COUNTED_AT = 1024


def dense_flops_per_token(hidden: int, layers: int, vocab: int, window: int) -> tuple[float, float]:
    """(ours, baseline) FLOPs of the dense products per prompt token, counted on a real prefill."""
    ours = Phi4FlashForCausalLM(our_config(hidden, layers, vocab, window)).eval()
    baseline = baseline_model(hidden, layers, vocab, torch.float32)
    prompt = torch.randint(0, vocab, (1, COUNTED_AT))
    with torch.no_grad():
        cache = ours.new_cache(1, COUNTED_AT + 1)
        with FlopCounterMode(display=False) as counter:
            ours.prefill(prompt[:, :-1], cache)
            ours(prompt[:, -1:], cache=cache, logits_to_keep=1)
        ours_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            baseline(prompt, logits_to_keep=1)
        baseline_flops = counter.get_total_flops()
    return ours_flops / COUNTED_AT, baseline_flops / COUNTED_AT


def attention_flops_per_token(hidden: int, layers: int, window: int, length: int) -> tuple[float, float]:
    """(ours, baseline) attention FLOPs per prompt token, averaged over a prompt of ``length`` tokens."""
    ours_config = our_config(hidden, layers, 4096, window)
    heads, dh = ours_config.num_attention_heads, ours_config.head_dim
    per_key_ours = 2 * heads * (dh + 2 * dh)  # differential attention: values [V_even || V_odd], 2 Dh wide
    seen_window = sum(min(i + 1, window) for i in range(length)) / length
    sliding = ours_config.layer_kinds[: ours_config.kv_layer + 1].count(SLIDING_ATTENTION)
    ours = per_key_ours * (sliding * seen_window + (length + 1) / 2)
    # every query head scores its head width and sums as many values: 2 x hidden multiply-adds per key, any GQA
    baseline = layers * 2 * 2 * hidden * (length + 1) / 2
    return ours, baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()
    dense_ours, dense_baseline = dense_flops_per_token(args.hidden, args.layers, args.vocab, args.window)
    print(f"# prefill arithmetic per prompt token, hidden {args.hidden}, {args.layers} layers (MFLOP)\n")
    print("| prompt | ours: dense | ours: attention | ours | baseline: dense | baseline: attention | baseline | "
          "baseline / ours |\n|---|---|---|---|---|---|---|---|")
    for length in (int(n) for n in args.lengths.split(",")):
        att_ours, att_baseline = attention_flops_per_token(args.hidden, args.layers, args.window, length)
        ours, baseline = dense_ours + att_ours, dense_baseline + att_baseline
        cells = [dense_ours, att_ours, ours, dense_baseline, att_baseline, baseline]
        print(f"| {length} | " + " | ".join(f"{flops / 1e6:.1f}" for flops in cells) + f" | {baseline / ours:.2f}x |")


if __name__ == "__main__":
    main()
