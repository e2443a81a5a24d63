"""Hugging Face Space for phi4flash: the web chat with Phi-4-mini-flash-reasoning.

The same file runs on a GPU Space (ZeroGPU or dedicated), locally and in CI: with CUDA it loads the
full model at start; without a GPU it serves the tiny embedded model.
"""

from __future__ import annotations

try:  # ZeroGPU requires `spaces` to be imported before anything initialises CUDA.
    import spaces
except ImportError:  # not on Hugging Face: run without the GPU scheduler
    spaces = None

import logging
import os
from typing import Any

import torch

import phi4flash
from phi4flash_demo import CSS, build_demo

logger = logging.getLogger(__name__)

MODEL_ID = os.environ.get("PHI4FLASH_MODEL", "microsoft/Phi-4-mini-flash-reasoning")
MAX_NEW_TOKENS = int(os.environ.get("PHI4FLASH_MAX_NEW_TOKENS", "16384"))
# Weight-only quantization ("int8", "int4", "int4-g64", ...): a CPU Space can run the real model with
# PHI4FLASH_MODEL=microsoft/Phi-4-mini-flash-reasoning PHI4FLASH_QUANTIZE=int4.
QUANTIZE = os.environ.get("PHI4FLASH_QUANTIZE") or None
# A deliberately low decode rate for a shared GPU slice, so a long answer is not cut off by the
# ZeroGPU time limit; only the time really used is charged.
GPU_TOKENS_PER_S = 40.0
GPU_BASE_S = 20  # start-up, prefill and transfers
GPU_MAX_S = 300  # beyond this ZeroGPU rejects the call ("illegal duration")


def gpu_seconds(max_new_tokens: int) -> int:
    """The GPU time to request for one chat turn of at most ``max_new_tokens`` new tokens."""
    return int(min(GPU_MAX_S, GPU_BASE_S + max(1, int(max_new_tokens)) / GPU_TOKENS_PER_S))


def _gpu_duration(messages: list[dict[str, str]], config: phi4flash.GenerationConfig) -> int:
    # Same signature as the decorated turn generator, as spaces.GPU requires of a duration callable.
    return gpu_seconds(config.max_new_tokens)


def on_zero_gpu() -> bool:
    """Whether the Space runs on ZeroGPU hardware (a GPU lent per call)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def has_gpu() -> bool:
    """Whether a CUDA GPU is (or, on ZeroGPU, will be) available."""
    return on_zero_gpu() or torch.cuda.is_available()


def load_engine() -> tuple[Any, str]:
    """Load the full model on CUDA when there is a GPU, or quantized on the CPU when PHI4FLASH_QUANTIZE
    asks for it; else the embedded model.

    Returns:
        The engine (or the exception that stopped it loading) and the name of what was loaded.
    """
    source = MODEL_ID if has_gpu() or QUANTIZE else "embedded"
    try:
        if source == "embedded":
            return phi4flash.load("embedded", quantize=QUANTIZE), source
        # ZeroGPU lends the GPU per call, in a process of its own: CUDA graphs captured at start-up (the decode step
        # on a dedicated GPU, compile="auto") could not replay there, so its calls decode with the eager step.
        return phi4flash.load(source, device="cuda" if has_gpu() else "cpu", quantize=QUANTIZE,
                              compile=False if on_zero_gpu() else "auto"), source
    except Exception as exc:  # the page explains the failure instead of the Space crashing
        logger.exception("could not load %s", source)
        return exc, source


engine, MODEL_SOURCE = load_engine()
zero_gpu = spaces is not None and on_zero_gpu()
demo = build_demo(
    engine,
    title="phi4flash (embedded demo model, no GPU)" if MODEL_SOURCE == "embedded" else "Phi-4-mini-flash-reasoning",
    max_new_tokens_limit=MAX_NEW_TOKENS,
    gpu_decorator=spaces.GPU(duration=_gpu_duration) if spaces is not None else None,
    # Each ZeroGPU call gets its own GPU slice; on one dedicated GPU concurrent calls share it.
    concurrency_limit=4 if zero_gpu else 2,
)

if __name__ == "__main__":
    demo.launch(css=CSS)
