"""The one-token decode step made cheap to launch: torch.compile on the CPU (inductor's C++ code), CUDA graphs on CUDA.

The step is :meth:`Phi4FlashForCausalLM.step` with ``static=True``: shapes depend on the number of rows and the
cache's size only, nothing reads a tensor in Python, and the global K/V is attended whole under a mask. So one
graph, dynamic in those sizes, serves every step of rows ``[0, n)`` of a cache. The engine keeps its running
requests on exactly those rows (it moves a later row down when an earlier request ends) and uses the eager step
only where the graph is not ready.

On the CPU, compiling takes a while, once per process: about a minute on a small CPU; for the real model 7 minutes
on 2 cores the first time, and about a minute once inductor has cached its code on disk. So it is asked for
(``phi4flash.load(..., compile=True)``, ``--compile`` on chat, demo and serve, or ``PHI4FLASH_COMPILE=1``) and done
while loading, on a scratch cache, with a log line when it starts, one every half minute while it runs
(:mod:`phi4flash.heartbeat`), and one for its time, or for why it could not be done (the eager step then runs).
It is not done on a background thread while the engine serves: a process that quits during a compile aborts in
C++.

On CUDA the eager static step is captured as CUDA graphs (:class:`CudaGraphSteps`), one per number of rows, on
first use: a capture records the step's few hundred kernel launches in milliseconds, and a replay launches them
all at once, where the eager step at batch 1 spends most of its time launching (38 tok/s for the real model on
an H200, 2026-12-04). torch.compile's own CUDA graphs ("reduce-overhead") are not used: inductor refused them for
this step (it writes the Mamba states and the cache's lengths in place: "mutated inputs") after a 324-s compile.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

from .cache import GlobalKV, Phi4FlashCache
from .heartbeat import heartbeat
from .model import Phi4FlashForCausalLM

logger = logging.getLogger(__name__)

SMALL_MODEL_PARAMETERS = 500_000_000  # below this, Python overhead dominates a CPU decode step: compiling pays


def compile_pays(model: Phi4FlashForCausalLM) -> bool:
    """Whether compiling the decode step is worth its start-up cost by default: on the CPU, for models small
    enough that the step is bound by per-operation overhead rather than by reading the weights (on CUDA the
    graphs cost under a second: :func:`wants_compile` takes them without asking)."""
    if model.device.type != "cpu":
        return False
    return sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS


def wants_compile(setting: bool | str, model: Phi4FlashForCausalLM, *, default: bool = False) -> bool:
    """True/False as given; "auto": ``PHI4FLASH_COMPILE`` (0 or 1) when set, else on CUDA yes (the CUDA graphs
    cost under a second and decode the real model 3-7x faster), else ``default`` (the engine: off, on the CPU the
    compile's minutes cost more than a model that already decodes faster than anyone reads gains; the benchmark:
    :func:`compile_pays`)."""
    if setting != "auto":
        return bool(setting)
    env = os.environ.get("PHI4FLASH_COMPILE", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    return env in ("1", "true", "yes", "on") or model.device.type == "cuda" or (default and compile_pays(model))


class CudaGraphSteps:
    """The static step of rows ``[0, n)`` of one cache, replayed from a CUDA graph per ``n`` captured on first use.

    A graph holds the addresses of the tensors it was captured with: the cache's state tensors, an input buffer
    for the ids and its own output. So the graphs belong to one cache at one size; when the engine's cache grows
    (its global K/V are reallocated) or another cache comes, they are dropped and captured again. All graphs share
    one memory pool: they replay one at a time, so their intermediates may share memory.
    """

    def __init__(self, step: Callable[[torch.Tensor, Phi4FlashCache], torch.Tensor], device: torch.device) -> None:
        self._step = step
        self._device = device
        self._stream: torch.cuda.Stream | None = None  # made at the first capture, where CUDA is surely there
        self._pool: tuple[int, int] | None = None
        self._cache: Phi4FlashCache | None = None  # the cache the graphs write (held, so its memory stays theirs)
        self._key: tuple[int, ...] = ()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _layout(cache: Phi4FlashCache) -> tuple[int, ...]:
        """What a graph depends on: the state tensors' addresses (a grown cache has new ones) and sizes."""
        tensors = [cache.lengths] + [t for state in cache.layers.values() for t in vars(state).values()]
        return (cache.batch_size, cache.max_length, *(t.data_ptr() for t in tensors))

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop the graphs and the cache they write."""
        self._graphs.clear()
        self._cache, self._key = None, ()

    def __call__(self, ids: torch.Tensor, cache: Phi4FlashCache) -> torch.Tensor:
        """(n,) next tokens of rows [0, n) -> (n, V) logits, the cache advanced by one position."""
        key = self._layout(cache)
        if cache is not self._cache or key != self._key:
            self._graphs.clear()
            self._cache, self._key = cache, key
        n = ids.shape[0]
        if n not in self._graphs:
            self._graphs[n] = self._capture(n, cache)
        graph, graph_ids, logits = self._graphs[n]
        graph_ids.copy_(ids)
        graph.replay()
        return logits.clone()  # the next replay overwrites the graph's output

    def _capture(self, n: int, cache: Phi4FlashCache) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        if self._stream is None:
            self._stream, self._pool = torch.cuda.Stream(device=self._device), torch.cuda.graph_pool_handle()
        ids = torch.zeros(n, dtype=torch.long, device=self._device)
        # One eager step on the capture's stream first (libraries allocate their workspaces and pick kernels
        # outside the capture), with the rows' state put back afterwards: only the key/value written past each
        # row's length stays, where the real step writes next.
        saved = [(t, t[:n].clone()) for state in cache.layers.values() if not isinstance(state, GlobalKV)
                 for t in vars(state).values()]
        lengths = cache.lengths[:n].clone()
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            self._step(ids, cache)
            for tensor, rows in saved:
                tensor[:n].copy_(rows)
            cache.lengths[:n].copy_(lengths)
        torch.cuda.current_stream(self._device).wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
            logits = self._step(ids, cache)
        return graph, ids, logits


class CompiledDecoder:
    """The compiled static decode step of ``model`` for caches like the engine's; :meth:`compile` it once."""

    def __init__(self, model: Phi4FlashForCausalLM) -> None:
        self.model = model
        self._step: Callable[[torch.Tensor, Phi4FlashCache], torch.Tensor]
        if model.device.type == "cuda":
            self._step = CudaGraphSteps(self._static_step, model.device)
        else:
            # On the CPU, where a small model's step takes a millisecond or two, what runs around the kernels
            # counts: the C++ wrapper calls them without the Python one's per-buffer checks, and the guards leave
            # out the modules' attributes (the engine owns the model and changes none of them after compiling;
            # tensors, shapes and dtypes are still checked). Both measured on the embedded model: 2.32 -> 2.06 ms
            # per step of 8 rows, 1.54 -> 1.31 ms for one row.
            options = {"cpp_wrapper": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            self._step = torch.compile(self._static_step, dynamic=True, options=options)
        self.ready = False
        self.error: str | None = None
        self.seconds: float | None = None

    def _static_step(self, ids: torch.Tensor, cache: Phi4FlashCache) -> torch.Tensor:
        return self.model.step(ids, cache, rows=slice(0, ids.shape[0]), static=True)

    @torch.no_grad()
    def compile(self, rows: int, max_length: int) -> bool:
        """Compile for caches of ``rows`` rows on a scratch cache (on CUDA: capture and replay the graphs of one
        row and of ``rows`` rows there, then drop them, the engine's cache gets its own); False (``error`` says
        why) if it cannot be."""
        started = time.perf_counter()
        graphs = isinstance(self._step, CudaGraphSteps)
        what = "capturing the decode step as CUDA graphs" if graphs else "compiling the decode step"
        logger.info("%s (once per process%s)", what, "" if graphs else ": about a minute; for the real model up "
                    "to 7 minutes the first time, while inductor's disk cache is cold")
        try:
            with heartbeat(logger, what):
                scratch = self.model.new_cache(rows, max_length)
                prompt = torch.zeros(rows, 4, dtype=torch.long, device=self.model.device)
                self.model(prompt, cache=scratch, logits_to_keep=1)
                # dynamo compiles a batch of one row apart, and a batch of every cache row (a slice of the whole
                # cache): with these three sizes compiled here, no later batch size recompiles
                try:
                    for batch in dict.fromkeys((min(2, rows), 1, rows)):
                        self._step(torch.zeros(batch, dtype=torch.long, device=self.model.device), scratch)
                finally:
                    if graphs:
                        self._step.clear()  # the scratch cache goes with its graphs
        except Exception as err:  # noqa: BLE001 - no compiler, an unsupported op: stay on the eager step, say why
            first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            self.error = f"{type(err).__name__}: {first_line}"
            logger.warning("decode step not compiled (%s); the eager step runs", self.error)
            return False
        self.seconds = time.perf_counter() - started
        self.ready = True
        logger.info("%s decode step ready in %.0f s", "graphed" if graphs else "compiled", self.seconds)
        return True

    def __call__(self, ids: torch.Tensor, cache: Phi4FlashCache) -> torch.Tensor:
        """(n,) next tokens of rows [0, n) -> (n, V) logits; the cache grows here, outside the graph."""
        cache.grow(int(cache.lengths[: ids.shape[0]].max()) + 1)
        return self._step(ids, cache)
