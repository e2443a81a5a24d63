"""The one-token decode step compiled once: torch.compile on the CPU (inductor's C++ code), CUDA graphs on CUDA.

The step is :meth:`Phi4FlashForCausalLM.step` with ``static=True``: shapes depend on the number of rows and the
cache's size only, nothing reads a tensor in Python, and the global K/V is attended whole under a mask. So one
graph, dynamic in those sizes, serves every step of rows ``[0, n)`` of a cache. The engine keeps its running
requests on exactly those rows (it moves a later row down when an earlier request ends) and uses the eager step
only where the graph is not ready.

Compiling takes a while, once per process: about a minute on a small CPU; for the real model 7 minutes on 2 cores
(324 s on an H200) the first time, and about a minute once inductor has cached its code on disk. So it is asked for
(``phi4flash.load(..., compile=True)``, ``--compile`` on chat, demo and serve, or ``PHI4FLASH_COMPILE=1``) and done
while loading, on a scratch cache, with a log line when it starts, one every half minute while it runs
(:mod:`phi4flash.heartbeat`), and one for its time, or for why it could not be done (the eager step then runs).
It is not done on a background thread while the engine serves: a process that quits during a compile aborts in
C++.

On the first GPU run (an H200, 2026-12-04) inductor compiled the step but skipped its CUDA graphs ("mutated
inputs": the step writes the Mamba states and the cache's lengths in place), so on CUDA the step runs as fused
kernels without graph replay; its speed there is not measured yet (docs/benchmarks.md, GPU check).
"""

from __future__ import annotations

import logging
import os
import time

import torch

from .cache import Phi4FlashCache
from .heartbeat import heartbeat
from .model import Phi4FlashForCausalLM

logger = logging.getLogger(__name__)

SMALL_MODEL_PARAMETERS = 500_000_000  # below this, Python overhead dominates a CPU decode step: compiling pays


def compile_pays(model: Phi4FlashForCausalLM) -> bool:
    """Whether compiling the decode step is worth its start-up cost by default: on the CPU, for models small
    enough that the step is bound by per-operation overhead rather than by reading the weights."""
    if model.device.type != "cpu":
        return False
    return sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS


def wants_compile(setting: bool | str, model: Phi4FlashForCausalLM, *, default: bool = False) -> bool:
    """True/False as given; "auto": ``PHI4FLASH_COMPILE`` (0 or 1) when set, else ``default`` (the engine: off,
    the start-up costs more than a model that already decodes faster than anyone reads gains; the benchmark:
    :func:`compile_pays`)."""
    if setting != "auto":
        return bool(setting)
    env = os.environ.get("PHI4FLASH_COMPILE", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    return env in ("1", "true", "yes", "on") or (default and compile_pays(model))


class CompiledDecoder:
    """The compiled static decode step of ``model`` for caches like the engine's; :meth:`compile` it once."""

    def __init__(self, model: Phi4FlashForCausalLM) -> None:
        self.model = model
        cuda = model.device.type == "cuda"
        # On CUDA, "reduce-overhead" replays the step as CUDA graphs. On the CPU, where a small model's step takes
        # a millisecond or two, what runs around the kernels counts: the C++ wrapper calls them without the
        # Python one's per-buffer checks, and the guards leave out the modules' attributes (the engine owns the
        # model and changes none of them after compiling; tensors, shapes and dtypes are still checked). Both
        # measured on the embedded model: 2.32 -> 2.06 ms per step of 8 rows, 1.54 -> 1.31 ms for one row.
        options = None if cuda else {"cpp_wrapper": True,
                                     "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        self._step = torch.compile(self._static_step, dynamic=True, mode="reduce-overhead" if cuda else None,
                                   options=options)
        self.ready = False
        self.error: str | None = None
        self.seconds: float | None = None

    def _static_step(self, ids: torch.Tensor, cache: Phi4FlashCache) -> torch.Tensor:
        return self.model.step(ids, cache, rows=slice(0, ids.shape[0]), static=True)

    @torch.no_grad()
    def compile(self, rows: int, max_length: int) -> bool:
        """Compile for caches of ``rows`` rows on a scratch cache; False (``error`` says why) if it cannot be."""
        started = time.perf_counter()
        logger.info("compiling the decode step (once per process: about a minute; for the real model up to 7 "
                    "minutes the first time, while inductor's disk cache is cold)")
        try:
            with heartbeat(logger, "compiling the decode step"):
                scratch = self.model.new_cache(rows, max_length)
                prompt = torch.zeros(rows, 4, dtype=torch.long, device=self.model.device)
                self.model(prompt, cache=scratch, logits_to_keep=1)
                # dynamo compiles a batch of one row apart, and a batch of every cache row (a slice of the whole
                # cache): with these three sizes compiled here, no later batch size recompiles
                for batch in dict.fromkeys((min(2, rows), 1, rows)):
                    self._step(torch.zeros(batch, dtype=torch.long, device=self.model.device), scratch)
        except Exception as err:  # noqa: BLE001 - no compiler, an unsupported op: stay on the eager step, say why
            first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            self.error = f"{type(err).__name__}: {first_line}"
            logger.warning("decode step not compiled (%s); the eager step runs", self.error)
            return False
        self.seconds = time.perf_counter() - started
        self.ready = True
        logger.info("compiled decode step ready in %.0f s", self.seconds)
        return True

    def __call__(self, ids: torch.Tensor, cache: Phi4FlashCache) -> torch.Tensor:
        """(n,) next tokens of rows [0, n) -> (n, V) logits; the cache grows here, outside the graph."""
        cache.grow(int(cache.lengths[: ids.shape[0]].max()) + 1)
        return self._step(ids, cache)
