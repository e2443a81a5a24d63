"""The streaming generation engine: one scheduler thread runs every request of an engine.

Requests from any number of threads join a running batch between decode steps (continuous batching):
each sequence has its own row of the :class:`~phi4flash.cache.Phi4FlashCache` (its own Mamba, window
and global K/V state), and one ``model.step`` advances every running row at once. A new request is
prefilled in chunks with the cross-decoder skipped (layers 0..L/2+1 on all prompt tokens, the
cross-decoder on the last one only), continuing from a kept state when its prompt extends an earlier
conversation. Closing a stream (or setting its cancel Event) drops it before the next step.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cache import Phi4FlashCache
from .compiled import CompiledDecoder, wants_compile
from .config import Phi4FlashConfig
from .constrained import mask_logits
from .metrics import LatencyMetrics, MetricsRecorder
from .model import Phi4FlashForCausalLM
from .protocol import (
    Completion,
    GenerationConfig,
    Message,
    PromptTooLongError,
    StreamEvent,
    Usage,
    check_messages,
)
from .quant import QuantSpec, weights_label
from .reasoning import ReasoningSplitter
from .sampling import Sampler, generation_config_defaults
from .tokenizer import ChatTokenizer, IncrementalDetokenizer
from .weights import load_model, parse_dtype, resolve_checkpoint

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # prompt tokens per prefill chunk by default: bounds prefill memory, as fast as 2048 on CPU

_DONE = object()
_LIVE_ENGINES: weakref.WeakSet[LocalEngine] = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    # Stop scheduler threads before the interpreter tears down torch's thread pools.
    for engine in list(_LIVE_ENGINES):
        engine.close()


def _restart_after_fork() -> None:
    # A forked child (ZeroGPU runs each @spaces.GPU call in one) has the engine's state but not its
    # scheduler thread; give it a fresh queue and thread, so that streams work there too.
    for engine in list(_LIVE_ENGINES):
        engine._start_scheduler()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restart_after_fork)


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA, float32 elsewhere."""
    if str(dtype) != "auto":
        return parse_dtype(dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load(source: str = "embedded", *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
         revision: str | None = None, token: str | bool | None = None, quantize: str | QuantSpec | None = None,
         **engine_options: Any) -> LocalEngine:
    """Load a checkpoint (hub id, local folder or "embedded") and return a ready :class:`LocalEngine`.

    Args:
        source: "microsoft/Phi-4-mini-flash-reasoning", a checkpoint folder, or "embedded".
        device: "auto" (cuda > mps > cpu) or a torch device.
        dtype: "auto" (bfloat16 on CUDA and for quantized weights, float32 elsewhere) or a dtype name.
        revision, token: for hub downloads.
        quantize: "int8", "int4" or "int4-g<group size>": weight-only quantization while loading (see
            :mod:`phi4flash.quant`); a checkpoint written by ``phi4flash quantize`` is quantized already.
        **engine_options: passed to :class:`LocalEngine` (max_batch, prefill_chunk, kept_state_bytes, ...).
    """
    path = resolve_checkpoint(source, revision=revision, token=token)
    torch_device = pick_device(device)
    quantized = quantize not in (None, "none") or Phi4FlashConfig.from_json(path).quantization is not None
    torch_dtype = torch.bfloat16 if quantized and str(dtype) == "auto" else pick_dtype(dtype, torch_device)
    model = load_model(path, dtype=torch_dtype, device=torch_device, quantize=quantize)
    tokenizer = ChatTokenizer.from_pretrained(path)
    name = "embedded" if str(source) == "embedded" else str(source)
    return LocalEngine(model, tokenizer, model_name=name, checkpoint_dir=path, **engine_options)


@dataclass
class _Request:
    prompt_ids: list[int]
    config: GenerationConfig
    cancel: threading.Event
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    row: int = -1
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None
    recorder: MetricsRecorder | None = None
    sampler: Sampler | None = None
    detokenizer: IncrementalDetokenizer | None = None
    splitter: ReasoningSplitter | None = None
    pending: str = ""  # text held back because it may start a stop string
    channel: str = "answer"
    unresolved: dict[str, int] = field(default_factory=dict)  # tokens counted before their text came out
    finished: bool = False


class LocalEngine:
    """In-process engine over a native model; implements :class:`phi4flash.Engine`.

    Thread-safe: any number of threads may call :meth:`stream` at once; their requests share decode
    steps (up to ``max_batch`` at a time, the rest wait in order).
    """

    def __init__(self, model: Phi4FlashForCausalLM, tokenizer: ChatTokenizer, *, model_name: str = "phi4flash",
                 checkpoint_dir: str | Path | None = None, max_batch: int = 8, prefill_chunk: int = PREFILL_CHUNK,
                 kept_state_bytes: int = 256 * 2**20, skip_cross_decoder: bool = True,
                 reasoning_first: bool = False, compile: bool | str = "auto") -> None:
        """Create an engine and start its scheduler thread.

        Args:
            model: the native model (eval mode).
            tokenizer: the checkpoint's tokenizer.
            model_name: reported in metrics and by servers.
            checkpoint_dir: where generation_config.json lives (for sampling defaults).
            max_batch: sequences decoded together at most.
            prefill_chunk: prompt tokens per prefill chunk (bounds prefill memory).
            kept_state_bytes: memory budget for kept conversation states (0 disables reuse).
            skip_cross_decoder: the prefill skip (off only to measure what it buys).
            reasoning_first: treat text before any ``<think>`` tag as reasoning.
            compile: compile the decode step (:mod:`phi4flash.compiled`) now, before serving (on the CPU a
                minute or so, logged; on CUDA its CUDA graphs, under a second); "auto": as ``PHI4FLASH_COMPILE``
                says, and when unset on CUDA only.
        """
        self.model = model.eval().tune_weight_layout()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.torch_device = model.device
        self.device = str(model.device)
        # what the weights are, for people (header, metrics): "bfloat16", or "int4 (g128)" when quantized
        self.dtype = weights_label(model) or str(model.dtype).replace("torch.", "")
        self.context_length = model.config.context_length
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.kept_state_bytes = kept_state_bytes
        self.skip_cross_decoder = skip_cross_decoder
        self.reasoning_first = reasoning_first
        self.defaults = generation_config_defaults(checkpoint_dir) if checkpoint_dir is not None else {}
        self.stop_token_ids = frozenset(tokenizer.stop_token_ids) | frozenset(model.config.stop_token_ids)
        self._stop_index = torch.tensor(sorted(self.stop_token_ids), dtype=torch.long, device=self.torch_device)
        self.vocab_limit = min(tokenizer.vocab_size, model.config.vocab_size)
        self._suppress = [i for i in tokenizer.unused_ids if i < self.vocab_limit]
        self._cache = model.new_cache(max_batch, min(self.context_length, 1024))
        self._kept: OrderedDict[tuple[int, ...], Phi4FlashCache] = OrderedDict()
        self._kept_bytes = 0
        self._compiled: CompiledDecoder | None = None
        if wants_compile(compile, model):
            self._compiled = CompiledDecoder(model)
            self._compiled.compile(max_batch, self._cache.max_length)
        self._start_scheduler()
        _LIVE_ENGINES.add(self)

    def _start_scheduler(self) -> None:
        """A fresh request queue, empty batch and scheduler thread (at start, and in a forked child)."""
        self._free_rows = list(range(self.max_batch))
        self._incoming: queue.Queue[_Request] = queue.Queue()
        self._running: list[_Request] = []
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="phi4flash-engine", daemon=True)
        self._worker.start()

    # -- public API -------------------------------------------------------------------------------
    def default_config(self, **overrides: Any) -> GenerationConfig:
        """The checkpoint's sampling defaults (model card: temperature 0.6, top_p 0.95) with overrides."""
        values = {k: v for k, v in self.defaults.items() if k in GenerationConfig.__dataclass_fields__}
        values.update(overrides)
        return GenerationConfig(**values)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Prompt tokens that ``messages`` render to, generation prompt included."""
        return len(self.tokenizer.encode_chat(messages))

    def stream(self, messages: Sequence[Message], config: GenerationConfig | None = None, *,
               cancel: threading.Event | None = None) -> Iterator[StreamEvent]:
        """Stream a completion of ``messages``; see :class:`phi4flash.Engine`.

        Raises:
            PromptTooLongError: the prompt leaves no room for a new token in the context.
            ValueError: an empty conversation, or invalid sampling values (naming the field).
        """
        check_messages(messages)
        return self.stream_ids(self.tokenizer.encode_chat(messages), config, cancel=cancel)

    def stream_ids(self, prompt_ids: Sequence[int], config: GenerationConfig | None = None, *,
                   cancel: threading.Event | None = None) -> Iterator[StreamEvent]:
        """:meth:`stream` for an already tokenised prompt."""
        config = (config or self.default_config()).validate()
        if not prompt_ids:
            raise ValueError("empty prompt: give at least one message")
        if len(prompt_ids) >= self.context_length:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.context_length} "
                "(prompt + at least one new token); shorten the conversation or drop earlier turns")
        if self._closed:
            raise RuntimeError("the engine is closed")
        request = _Request(prompt_ids=list(prompt_ids), config=config, cancel=cancel or threading.Event())
        self._incoming.put(request)
        return self._events(request)

    def generate(self, messages: Sequence[Message], config: GenerationConfig | None = None, *,
                 cancel: threading.Event | None = None) -> Completion:
        """Run :meth:`stream` to the end and return the whole completion."""
        return collect(self.stream(messages, config, cancel=cancel))

    def generate_batch(self, conversations: Sequence[Sequence[Message]],
                       config: GenerationConfig | Sequence[GenerationConfig] | None = None) -> list[Completion]:
        """Generate for several conversations at once (they share decode steps); results in order.

        ``config`` is one config for all, or one per conversation (a constraint follows one generation).
        """
        configs = list(config) if isinstance(config, Sequence) else [config] * len(conversations)
        if len(configs) != len(conversations):
            raise ValueError(f"{len(configs)} configs for {len(conversations)} conversations: give one or one each")
        streams = [self.stream(messages, c) for messages, c in zip(conversations, configs, strict=True)]
        results: list[Completion | None] = [None] * len(streams)
        threads = [threading.Thread(target=lambda i=i, s=s: results.__setitem__(i, collect(s)))
                   for i, s in enumerate(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [r for r in results if r is not None]

    def stats(self) -> dict[str, int]:
        """Queue depth, running batch size and kept-state usage (for servers' /metrics)."""
        return {"queue_depth": self._incoming.qsize(), "running": len(self._running), "max_batch": self.max_batch,
                "kept_states": len(self._kept), "kept_state_bytes": self._kept_bytes}

    @property
    def compiled_step(self) -> str:
        """The decode step in use: "eager", "compiled", or "eager (why it could not be compiled)"."""
        if self._compiled is None:
            return "eager"
        return "compiled" if self._compiled.ready else f"eager ({self._compiled.error})"

    def close(self) -> None:
        """Stop the scheduler thread; running streams end with finish_reason "cancelled"."""
        if self._closed:
            return
        self._closed = True
        self._incoming.put(None)  # type: ignore[arg-type]
        self._worker.join(timeout=10)

    # -- consumer side ----------------------------------------------------------------------------
    def _events(self, request: _Request) -> Iterator[StreamEvent]:
        try:
            while True:
                item = request.events.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancel.set()  # closing the iterator cancels; a no-op once the request is done

    # -- scheduler thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._admit()
            if self._closed:
                for request in list(self._running):
                    self._finish(request, "cancelled")
                return
            if not self._running:
                continue
            try:
                self._decode_step()
            except Exception as err:  # noqa: BLE001 - a failed step ends its requests, never the engine
                logger.exception("decode step failed")
                for request in list(self._running):
                    self._fail(request, err)

    def _admit(self) -> None:
        """Take waiting requests into free rows (blocking only when nothing runs) and prefill them."""
        while self._free_rows and not self._closed:
            try:
                request = self._incoming.get(block=not self._running)
            except queue.Empty:
                return
            if request is None:
                return
            if request.cancel.is_set():
                self._cancelled_before_start(request)
                continue
            try:
                self._start(request)
            except Exception as err:  # noqa: BLE001
                logger.exception("prefill failed")
                self._fail(request, err)

    def _cancelled_before_start(self, request: _Request) -> None:
        recorder = MetricsRecorder(prompt_tokens=len(request.prompt_ids), context_length=self.context_length,
                                   device=self.device, dtype=self.dtype)
        request.events.put(StreamEvent("answer", "", recorder.finish("cancelled"), done=True))
        request.events.put(_DONE)

    @torch.no_grad()
    def _start(self, request: _Request) -> None:
        row = self._free_rows.pop(0)
        request.row = row
        self._cache.reset([row])
        prompt = request.prompt_ids
        reused = self._restore(row, prompt)
        request.recorder = MetricsRecorder(prompt_tokens=len(prompt), reused_prompt_tokens=reused,
                                           context_length=self.context_length, device=self.device, dtype=self.dtype)
        request.sampler = Sampler(request.config, self.torch_device, self.vocab_limit, self._suppress)
        request.detokenizer = IncrementalDetokenizer(self.tokenizer)
        request.splitter = ReasoningSplitter(assume_reasoning_first=self.reasoning_first)
        request.channel = request.splitter.channel
        self._running.append(request)
        # Prefill all but the last prompt token and keep that state: a retry of the same prompt or a
        # next turn that extends it then starts from there. The last token goes through the next decode step
        # with the running rows (and the compiled graph), whose logits are the request's first.
        body_end = len(prompt) - 1
        for start in range(reused, body_end, self.prefill_chunk):
            if request.cancel.is_set():
                break
            chunk = torch.tensor([prompt[start:min(start + self.prefill_chunk, body_end)]], device=self.torch_device)
            if self.skip_cross_decoder:  # nobody reads these chunks' logits: the self-decoder alone
                self.model.prefill(chunk, self._cache, rows=[row])
            else:
                self.model(chunk, cache=self._cache, rows=[row], logits_to_keep=1, skip_cross_decoder=False)
        if request.cancel.is_set():
            self._finish(request, "cancelled")
            return
        if body_end > reused:
            self._keep(tuple(prompt[:body_end]), row)
        request.next_token = prompt[-1]

    def _restore(self, row: int, prompt: list[int]) -> int:
        """Load the longest kept state whose tokens are a proper prefix of ``prompt``; return its length."""
        best: tuple[int, ...] | None = None
        for key in self._kept:
            if len(key) < len(prompt) and (best is None or len(key) > len(best)) and tuple(prompt[:len(key)]) == key:
                best = key
        if best is None:
            return 0
        self._kept.move_to_end(best)
        self._cache.load(row, self._kept[best])
        return len(best)

    def _keep(self, tokens: tuple[int, ...], row: int) -> None:
        if self.kept_state_bytes <= 0 or tokens in self._kept:
            return
        snapshot = self._cache.extract(row)
        size = snapshot.nbytes
        if size > self.kept_state_bytes:
            return
        self._kept[tokens] = snapshot
        self._kept_bytes += size
        while self._kept_bytes > self.kept_state_bytes:
            _, old = self._kept.popitem(last=False)
            self._kept_bytes -= old.nbytes

    @torch.no_grad()
    def _decode_step(self) -> None:
        for request in list(self._running):
            if request.cancel.is_set():
                self._finish(request, "cancelled")
        if not self._running:
            return
        self._compact_rows()
        rows = [r.row for r in self._running]
        ids = torch.tensor([r.next_token for r in self._running], device=self.torch_device)
        if self._compiled is not None and self._compiled.ready and rows == list(range(len(rows))):
            logits = self._compiled(ids, self._cache)  # rows [0, n): the one compiled graph
        else:
            logits = self.model.step(ids, self._cache, rows=None if rows == list(range(self.max_batch)) else rows)
        self._sync()
        for request in self._running:
            if not request.generated:  # this step fed the prompt's last token: its logits are the first
                assert request.recorder is not None
                request.recorder.prefill_done()
        logits = self._constrain(self._running, logits)
        greedy = self._greedy_tokens(self._running, logits)
        for request, row_logits, token in zip(list(self._running), logits, greedy, strict=True):
            try:
                self._emit_token(request, row_logits, token)
            except Exception as err:  # noqa: BLE001 - e.g. a failing logits_processor ends only its request
                self._fail(request, err)

    def _greedy_tokens(self, requests: list[_Request], logits: torch.Tensor) -> list[int | None]:
        """The next token of every plainly greedy row (temperature 0, no processor, penalty or minimum length
        pending) in one argmax and one device sync, as each row's sampler would pick it; None for the others."""
        rows = [i for i, r in enumerate(requests) if r.config.temperature == 0.0 and r.config.logits_processor is None
                and r.config.repetition_penalty == 1.0 and len(r.generated) >= r.config.min_new_tokens]
        tokens: list[int | None] = [None] * len(requests)
        if len(rows) < 2:  # one row: its sampler costs the same
            return tokens
        # Every request's sampler masks the same ids (the engine's vocab limit and suppressed ids), and a greedy
        # one takes no random draw: the first one picks for all the rows.
        sampler = requests[rows[0]].sampler
        assert sampler is not None
        picked = sampler(logits.index_select(0, torch.tensor(rows, device=logits.device)))
        for i, token in zip(rows, picked.tolist(), strict=True):
            tokens[i] = token
        return tokens

    def _compact_rows(self) -> None:
        """Put the running requests on cache rows [0, n), in order, moving a row's state into a lower free row where
        an earlier request has finished: then every decode step reads the cache in place (a slice of rows, where
        a scattered selection copies each row's state, its global K/V included) and takes the compiled graph."""
        n = len(self._running)
        holes = sorted(row for row in self._free_rows if row < n)
        for request in sorted(self._running, key=lambda r: r.row):
            if request.row >= n:
                hole = holes.pop(0)
                self._cache.move_row(request.row, hole)
                self._free_rows.remove(hole)
                self._free_rows.append(request.row)
                request.row = hole
        self._free_rows.sort()
        self._running.sort(key=lambda r: r.row)

    def _constrain(self, requests: list[_Request], logits: torch.Tensor) -> torch.Tensor:
        """Mask the rows of ``logits`` whose request has a grammar, all in one pass."""
        rows = [i for i, r in enumerate(requests) if r.config.constraint is not None]
        if not rows:
            return logits
        index = torch.tensor(rows, device=logits.device)
        masked = mask_logits(logits.index_select(0, index).float(), [requests[i].config.constraint for i in rows],
                             [requests[i].generated for i in rows])
        return logits.float().index_copy(0, index, masked)

    def _emit_token(self, request: _Request, logits: torch.Tensor, token: int | None = None) -> None:
        """Sample the next token of ``request`` from its (V,) logits (unless ``token`` was already picked) and
        stream what it completes."""
        config = request.config
        assert request.sampler is not None and request.recorder is not None and request.detokenizer is not None
        if token is None:
            if config.logits_processor is not None:
                logits = config.logits_processor(list(request.generated), logits.float())
            if len(request.generated) < config.min_new_tokens:
                logits = logits.index_fill(0, self._stop_index, float("-inf"))
            previous = [request.prompt_ids + request.generated] if config.repetition_penalty != 1.0 else None
            token = int(request.sampler(logits[None], previous)[0])
        if config.constraint is not None and token not in self.stop_token_ids:
            token = config.constraint.canonical(request.generated, token)  # the forced text in trained tokens
        if token in self.stop_token_ids:
            request.recorder.token(request.channel)
            self._finish(request, "stop")
            return
        request.generated.append(token)
        request.next_token = token
        if self._push_text(request, request.detokenizer.push(token), [token]):
            self._finish(request, "stop")
            return
        total = len(request.prompt_ids) + len(request.generated)
        if len(request.generated) >= config.max_new_tokens or total >= self.context_length:
            self._finish(request, "length")

    def _push_text(self, request: _Request, text: str, token_ids: list[int], final: bool = False) -> bool:
        """Route new text through stop strings and the reasoning splitter; True when a stop string hit.

        A non-empty ``token_ids`` counts one generated token, on the channel the splitter is in after it.
        """
        stops = request.config.stop
        request.pending += text
        hit = False
        if stops:
            cut = min((i for i in (request.pending.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                request.pending, hit = request.pending[:cut], True
        if hit or final or not stops:
            ready, request.pending = request.pending, ""
        else:
            hold = max((n for s in stops for n in range(1, len(s)) if request.pending.endswith(s[:n])), default=0)
            ready, request.pending = request.pending[:len(request.pending) - hold], request.pending[
                len(request.pending) - hold:]
        assert request.splitter is not None and request.recorder is not None
        pieces = request.splitter.push(ready) if ready else []
        if hit or final:
            pieces += request.splitter.flush()
        request.channel = request.splitter.channel
        if token_ids:  # count now (exact timing); the channel is settled once the token's text comes out
            request.recorder.token(request.channel)
            request.unresolved[request.channel] = request.unresolved.get(request.channel, 0) + 1
        if pieces:
            settled = pieces[-1][0]
            for channel, count in request.unresolved.items():
                if channel != settled:
                    request.recorder.reassign(channel, settled, count)
            request.unresolved.clear()
        metrics = request.recorder.snapshot()
        for channel, piece in pieces:
            request.events.put(StreamEvent(channel, piece, metrics, token_ids))
        return hit

    def _finish(self, request: _Request, reason: str) -> None:
        if request.finished:
            return
        request.finished = True
        assert request.recorder is not None
        if request.detokenizer is not None:
            self._push_text(request, request.detokenizer.flush(), [], final=True)
        length = len(request.prompt_ids) + len(request.generated)
        if request.row >= 0 and reason != "cancelled" and request.generated:
            in_cache = int(self._cache.lengths[request.row])  # the last sampled token may not be fed yet
            self._keep(tuple((request.prompt_ids + request.generated)[:in_cache]), request.row)
        metrics = request.recorder.finish(reason, cache_bytes=self._cache.bytes_per_sequence(length))
        request.events.put(StreamEvent(request.channel, "", metrics, list(request.generated), done=True))  # type: ignore[arg-type]
        request.events.put(_DONE)
        self._release(request)

    def _fail(self, request: _Request, err: BaseException) -> None:
        if request.finished:
            return
        request.finished = True
        request.events.put(err)
        request.events.put(_DONE)
        self._release(request)

    def _release(self, request: _Request) -> None:
        if request in self._running:
            self._running.remove(request)
        if request.row >= 0:
            self._free_rows.append(request.row)
            self._free_rows.sort()
            request.row = -1

    def _sync(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)


def collect(events: Iterator[StreamEvent]) -> Completion:
    """Gather a stream into a :class:`Completion`."""
    reasoning: list[str] = []
    answer: list[str] = []
    token_ids: list[int] = []
    metrics = LatencyMetrics()
    for event in events:
        (reasoning if event.channel == "reasoning" else answer).append(event.text)
        if event.done:
            token_ids = event.token_ids
        metrics = event.metrics
    usage = Usage(prompt_tokens=metrics.prompt_tokens, completion_tokens=metrics.completion_tokens,
                  reasoning_tokens=metrics.reasoning_tokens,
                  total_tokens=metrics.prompt_tokens + metrics.completion_tokens)
    return Completion(reasoning="".join(reasoning), answer="".join(answer), finish_reason=metrics.finish_reason or "",
                      usage=usage, metrics=metrics, token_ids=token_ids)
