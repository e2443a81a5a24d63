"""Parity with the official implementation: max |logits difference| on the golden vectors.

    python benchmarks/parity.py

Full forward and prefill + one-token decode, in float32 (against cases.safetensors) and float64 (against
reference_fp64.safetensors), for tests/data/golden/tiny8 (a copy of shared/golden/tiny8).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from phi4flash import load_model

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden" / "tiny8"


def main() -> None:
    cases = load_file(GOLDEN / "cases.safetensors")
    fp64 = load_file(GOLDEN / "reference_fp64.safetensors")
    ids, prompt_len = cases["input_ids"], int(cases["prompt_len"])
    for dtype, reference in (("float32", cases), ("float64", fp64)):
        model = load_model(GOLDEN, dtype=dtype)
        with torch.no_grad():
            full = model.lm_head(model.model(ids)).double()
            cache = model.new_cache(ids.shape[0], ids.shape[1])
            model(ids[:, :prompt_len], cache=cache, logits_to_keep=1)
            steps = torch.stack([model.lm_head(model.model(ids[:, t:t + 1], cache=cache))[:, 0]
                                 for t in range(prompt_len, ids.shape[1])], 1).double()
        print(f"{dtype}: full forward {(full - reference['logits_full'].double()).abs().max():.2e}, "
              f"prefill + decode {(steps - reference['logits_decode'].double()).abs().max():.2e}")


if __name__ == "__main__":
    main()
