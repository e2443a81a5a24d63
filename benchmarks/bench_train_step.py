"""Training speed on the CPU: one optimizer step of the embedded model's training, with and without the C++ scan.

    python benchmarks/bench_train_step.py [--rounds 3] [--threads 2]

Two settings, each timed both ways in turns within every round (the best round is reported, with the spread):
- "train": the embedded model's training step as ``phi4flash train`` runs it (its default model, a batch of
  20 chats of 512 tokens, in the precision that ``phi4flash train`` picks on this CPU, ``--precision`` to choose):
  the training scan through phi4flash's C++ scan and its C++ backward pass, against the PyTorch chunked scan
  that runs without a compiler;
- "fine-tune": a forward and backward pass through the model's own scan dispatch (what transformers and peft
  training reach), 4 sequences of 256 tokens in float32: the C++ scan against the step-by-step definition that
  ran before it had a backward pass.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from phi4flash import ops
from phi4flash.config import Phi4FlashConfig
from phi4flash.model import Phi4FlashForCausalLM
from phi4flash.training import train as train_mod
from phi4flash.training.tokenizer_train import model_config


class _Vocabulary:
    """What ``model_config`` reads of a tokenizer: its size and the end-of-text id."""

    def __init__(self, size: int) -> None:
        self.size = size

    def get_vocab_size(self) -> int:
        return self.size

    def token_to_id(self, token: str) -> int:  # noqa: ARG002 - every special id is 0 here
        return 0


def _model(vocab: int) -> Phi4FlashForCausalLM:
    config = model_config(_Vocabulary(vocab), **train_mod.DEFAULT_MODEL)  # type: ignore[arg-type]
    model = Phi4FlashForCausalLM(Phi4FlashConfig.from_dict(config))
    model.init_weights(std=0.02)
    return model.train()


def _next_tokens(ids: torch.Tensor) -> torch.Tensor:
    """The targets of ``ids``: each position's next token, none (-100) after the last."""
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    return targets


def _timed(fn: Callable[[], None], native: bool) -> float:
    original = ops.native_scan
    if not native:
        ops.native_scan = lambda *args: None
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        ops.native_scan = original


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="the train step's bfloat16 autocast or float32; auto: as phi4flash train picks")
    args = parser.parse_args()
    bf16 = train_mod.trains_in_bfloat16(None if args.precision == "auto" else args.precision == "bf16")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = 1024
    model = _model(vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_ids = torch.randint(0, vocab, (20, 512))
    tune_ids = torch.randint(0, vocab, (4, 256))

    train_targets, tune_targets = _next_tokens(train_ids), _next_tokens(tune_ids)

    def train_step() -> None:
        with train_mod._training_kernels():
            train_mod.train_step(model, model, optimizer, train_ids, train_targets, bf16=bf16)

    def tune_step() -> None:
        train_mod.train_step(model, model, optimizer, tune_ids, tune_targets, bf16=False)

    cases = {"train": train_step, "fine-tune": tune_step}
    times: dict[tuple[str, bool], list[float]] = {}
    for fn in cases.values():  # warm-up: the kernels' build, first allocations
        _timed(fn, True)
        _timed(fn, False)
    for _ in range(args.rounds):
        for name, fn in cases.items():
            for native in (True, False):
                times.setdefault((name, native), []).append(_timed(fn, native))
    print(f"# one optimizer step ('train' in {train_mod.precision_name(bf16)}), {args.threads} threads, "
          f"best of {args.rounds} interleaved rounds (spread best/worst)\n")
    print("| step | C++ scan s | PyTorch scan s | speed-up |")
    print("|---|---|---|---|")
    for name in cases:
        fast, slow = times[(name, True)], times[(name, False)]
        print(f"| {name} | {min(fast):.2f} ({max(fast) / min(fast):.2f}) | {min(slow):.2f} "
              f"({max(slow) / min(slow):.2f}) | {min(slow) / min(fast):.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
