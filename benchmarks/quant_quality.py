"""How much int8 / int4 weights change the next-token distribution: top-1 agreement and KL divergence against the
unquantized model, over a few hundred positions.

    python benchmarks/quant_quality.py            # the golden tiny8 model, the embedded model, the real size
    python benchmarks/quant_quality.py --skip-real

- golden tiny8: the official implementation's tiny random-weight model (tests/data/golden), 400 random tokens;
  reference float32.
- embedded: the trained embedded model on its own greedy answers to a few problems (text it knows); reference
  float32.
- real size: the real config.json with random weights, 256 random tokens; reference bfloat16 (its own dtype).

The reference is the full forward; the others decode one token at a time, as generation does, so that the
quantized models run the decode kernels (with their int8 activations) rather than prefill's dense path.
  Random weights make every token about as likely as the next, so its top-1 agreement is a hard test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import phi4flash
from phi4flash import GenerationConfig, load_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
GOLDEN = ROOT / "tests" / "data" / "golden" / "tiny8"
FORMATS = ("int8", "int4-g32", "int4-g64", "int4-g128")
PROBLEMS = ("What is 487 + 356?", "Solve 4x - 7 = 21", "What is 25% of 80?", "What is 63 - 28?", "What is 47 * 6?",
            "Solve 3x + 5 = 20")


def agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement and mean KL(reference || other) over the rows of (positions, vocab) logits."""
    top1 = (reference.argmax(-1) == other.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(other.float().log_softmax(-1), reference.float().log_softmax(-1),
                                    log_target=True, reduction="none").sum(-1).mean().item()
    return top1, kl


@torch.no_grad()
def logits_of(model: torch.nn.Module, sequences: list[torch.Tensor]) -> torch.Tensor:
    """The full forward's logits (the references)."""
    return torch.cat([model(ids)[0] for ids in sequences])


@torch.no_grad()
def decoded_logits(model: torch.nn.Module, sequences: list[torch.Tensor]) -> torch.Tensor:
    """The logits of one-token decode steps at every position: the path a quantized model decodes on (the
    native kernels, with their int8 activations), not the dense path of prefill."""
    rows = []
    for ids in sequences:
        cache = model.new_cache(1, ids.shape[1])
        rows += [model.step(ids[:, t], cache)[0] for t in range(ids.shape[1])]
    return torch.stack(rows)


def golden() -> list[tuple[str, str, int, float, float]]:
    torch.manual_seed(0)
    ids = [torch.randint(0, 96, (1, 100)) for _ in range(4)]
    reference = logits_of(load_model(GOLDEN), ids)
    rows = [("golden tiny8", "bfloat16 (no quantization)", len(reference),
             *agreement(reference, decoded_logits(load_model(GOLDEN, dtype="bfloat16"), ids)))]
    for spec in FORMATS:
        rows.append(("golden tiny8", spec, len(reference), *agreement(reference, decoded_logits(
            load_model(GOLDEN, quantize=spec), ids))))
    return rows


def embedded() -> list[tuple[str, str, int, float, float]]:
    engine = phi4flash.load("embedded")
    config = GenerationConfig(temperature=0, max_new_tokens=200)
    ids = [torch.tensor([engine.tokenizer.encode_chat([{"role": "user", "content": q}])
                         + engine.generate([{"role": "user", "content": q}], config).token_ids]) for q in PROBLEMS]
    engine.close()
    reference = logits_of(load_model("embedded"), ids)
    rows = [("embedded", "bfloat16 (no quantization)", len(reference),
             *agreement(reference, decoded_logits(load_model("embedded", dtype="bfloat16"), ids)))]
    for spec in FORMATS:
        rows.append(("embedded", spec, len(reference), *agreement(reference, decoded_logits(
            load_model("embedded", quantize=spec), ids))))
    return rows


def real_size() -> list[tuple[str, str, int, float, float]]:
    from bench_quant import REAL_CONFIG, float_model, quantized_copy

    from phi4flash import Phi4FlashConfig
    from phi4flash.quant import QuantSpec

    torch.manual_seed(1)
    ids = [torch.randint(0, 199_000, (1, 128)) for _ in range(2)]
    base = float_model(Phi4FlashConfig.from_json(REAL_CONFIG))
    reference = logits_of(base, ids)
    rows = []
    for spec in ("int8", "int4-g64", "int4-g128"):
        model = quantized_copy(base, QuantSpec.parse(spec))
        rows.append(("real size, random", spec, len(reference), *agreement(reference, decoded_logits(model, ids))))
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-real", action="store_true", help="skip the real-size model (7.7 GB, minutes)")
    args = parser.parse_args()
    rows = golden() + embedded() + ([] if args.skip_real else real_size())
    print("| model | weights | positions | top-1 agreement | KL divergence |\n|---|---|---|---|---|")
    for model, spec, positions, top1, kl in rows:
        print(f"| {model} | {spec} | {positions} | {top1:.3f} | {kl:.2e} |")


if __name__ == "__main__":
    main()
