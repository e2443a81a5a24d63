"""The one-token decode step compiled once: torch.compile on the CPU (inductor's C++ code), CUDA graphs on CUDA.

The step is :meth:`Phi4FlashForCausalLM.step` with ``static=True``: shapes depend on the number of rows and the
cache's size only, nothing reads a tensor in Python, and the global K/V is attended whole under a mask. So one
graph, dynamic in those sizes, serves every step of rows ``[0, n)`` of a cache. The engine uses it when its
running requests hold exactly those rows, and the eager step otherwise.

Compiling takes a while (about a minute on a small CPU, once per process; inductor caches its code on disk). It
runs on a background thread on a scratch cache while the engine serves with the eager step; a log line says when
the compiled step takes over, or why it could not.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from .cache import Phi4FlashCache
from .model import Phi4FlashForCausalLM

logger = logging.getLogger(__name__)

SMALL_MODEL_PARAMETERS = 500_000_000  # below this, Python overhead dominates a CPU decode step: compiling pays


def compile_pays(model: Phi4FlashForCausalLM) -> bool:
    """Whether compiling the decode step is worth its start-up cost by default: on the CPU, for models small
    enough that the step is bound by per-operation overhead rather than by reading the weights."""
    if model.device.type != "cpu":
        return False
    return sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS


def wants_compile(setting: bool | str, model: Phi4FlashForCausalLM) -> bool:
    """True/False as given; "auto": ``PHI4FLASH_COMPILE`` (0 or 1) when set, else :func:`compile_pays`."""
    if setting != "auto":
        return bool(setting)
    env = os.environ.get("PHI4FLASH_COMPILE", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    return env in ("1", "true", "yes", "on") or compile_pays(model)


class CompiledDecoder:
    """The compiled static decode step of ``model`` for caches like the engine's; call :meth:`start` once."""

    def __init__(self, model: Phi4FlashForCausalLM) -> None:
        self.model = model
        cuda = model.device.type == "cuda"
        # on CUDA, "reduce-overhead" replays the step as CUDA graphs
        self._step = torch.compile(self._static_step, dynamic=True, mode="reduce-overhead" if cuda else None)
        self.ready = threading.Event()
        self.error: str | None = None
        self.seconds: float | None = None

    def _static_step(self, ids: torch.Tensor, cache: Phi4FlashCache) -> torch.Tensor:
        return self.model.step(ids, cache, rows=slice(0, ids.shape[0]), static=True)

    def start(self, rows: int, max_length: int, *, background: bool = True) -> None:
        """Compile for caches of ``rows`` rows, on a scratch cache (in a thread unless ``background`` is False)."""
        if background:
            threading.Thread(target=self._warm_up, args=(rows, max_length), name="phi4flash-compile",
                             daemon=True).start()
        else:
            self._warm_up(rows, max_length)

    @torch.no_grad()
    def _warm_up(self, rows: int, max_length: int) -> None:
        started = time.perf_counter()
        logger.info("compiling the decode step (once per process, about a minute on a small CPU; the eager step "
                    "serves meanwhile)")
        try:
            scratch = self.model.new_cache(rows, max_length)
            prompt = torch.zeros(rows, 4, dtype=torch.long, device=self.model.device)
            self.model(prompt, cache=scratch, logits_to_keep=1)
            for batch in (min(2, rows), 1):  # two sizes, so that the graph is general in the number of rows
                self._step(torch.zeros(batch, dtype=torch.long, device=self.model.device), scratch)
        except Exception as err:  # noqa: BLE001 - no compiler, an unsupported op: stay on the eager step, say why
            self.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err) else ''}"
            logger.warning("decode step not compiled (%s); the eager step runs", self.error)
            return
        self.seconds = time.perf_counter() - started
        logger.info("compiled decode step ready in %.0f s", self.seconds)
        self.ready.set()

    def __call__(self, ids: torch.Tensor, cache: Phi4FlashCache) -> torch.Tensor:
        """(n,) next tokens of rows [0, n) -> (n, V) logits; the cache grows here, outside the graph."""
        cache.grow(int(cache.lengths[: ids.shape[0]].max()) + 1)
        return self._step(ids, cache)
