"""Latency metrics of one generation, measured inside the engine with device synchronisation.

Definitions (the same ones the web chat, the LangChain model and the server report):

- time to first token: from the request entering the engine (after tokenisation) to the first
  sampled token being available on the host, prefill included.
- prefill tokens/s: prompt tokens actually computed (reused ones excluded) / prefill seconds.
- decode tokens/s: tokens after the first / seconds since the first token (average); the recent
  value uses only the last ``RECENT_WINDOW`` inter-token intervals.
- inter-token latency p50/p95: over the gaps between consecutive generated tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

RECENT_WINDOW = 16


@dataclass
class LatencyMetrics:
    """A snapshot of the latency and token counts of one generation."""

    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0
    reasoning_tokens: int = 0
    answer_tokens: int = 0
    time_to_first_token_s: float | None = None
    prefill_s: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    decode_tokens_per_s_recent: float | None = None
    inter_token_latency_p50_s: float | None = None
    inter_token_latency_p95_s: float | None = None
    total_time_s: float = 0.0
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"; None while running
    cache_bytes: int = 0
    context_length: int = 0  # the model's maximum context, for "n / 64K" readouts
    device: str = ""
    dtype: str = ""
    decode_tokens_per_s_history: list[float] = field(default_factory=list)  # one point per ~RECENT_WINDOW tokens

    @property
    def completion_tokens(self) -> int:
        """Reasoning plus answer tokens."""
        return self.reasoning_tokens + self.answer_tokens

    @property
    def context_used(self) -> int:
        """Prompt plus generated tokens held in the context."""
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict, derived properties included."""
        data = asdict(self)
        data["completion_tokens"] = self.completion_tokens
        data["context_used"] = self.context_used
        return data


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class MetricsRecorder:
    """Builds :class:`LatencyMetrics` from timestamps that the engine records.

    The engine calls ``sync`` (a device synchronisation) before each timestamp, so the times
    are real compute times, not kernel-launch times.
    """

    def __init__(self, *, prompt_tokens: int, reused_prompt_tokens: int = 0, context_length: int = 0,
                 device: str = "", dtype: str = "", clock: Any = time.perf_counter) -> None:
        self._clock = clock
        self._start = clock()
        self._first_token: float | None = None
        self._token_times: list[float] = []
        self.metrics = LatencyMetrics(prompt_tokens=prompt_tokens, reused_prompt_tokens=reused_prompt_tokens,
                                      context_length=context_length, device=device, dtype=dtype)

    def prefill_done(self) -> None:
        """Mark the end of the prefill (the first token's logits are ready)."""
        now = self._clock()
        m = self.metrics
        m.prefill_s = now - self._start
        computed = m.prompt_tokens - m.reused_prompt_tokens
        m.prefill_tokens_per_s = computed / m.prefill_s if m.prefill_s > 0 and computed > 0 else None

    def token(self, channel: str) -> None:
        """Record one generated token on ``channel`` ("reasoning" or "answer")."""
        now = self._clock()
        m = self.metrics
        if channel == "reasoning":
            m.reasoning_tokens += 1
        else:
            m.answer_tokens += 1
        if self._first_token is None:
            self._first_token = now
            m.time_to_first_token_s = now - self._start
        self._token_times.append(now)
        n = len(self._token_times)
        if n >= 2:
            m.decode_tokens_per_s = (n - 1) / (now - self._first_token) if now > self._first_token else None
            recent = self._token_times[-(RECENT_WINDOW + 1):]
            span = recent[-1] - recent[0]
            m.decode_tokens_per_s_recent = (len(recent) - 1) / span if span > 0 else None
            if (n - 1) % RECENT_WINDOW == 0 and m.decode_tokens_per_s_recent is not None:
                m.decode_tokens_per_s_history.append(m.decode_tokens_per_s_recent)
        m.total_time_s = now - self._start

    def reassign(self, from_channel: str, to_channel: str, count: int) -> None:
        """Move ``count`` already-counted tokens between channels (the reasoning splitter may decide late)."""
        m = self.metrics
        count = min(count, m.reasoning_tokens if from_channel == "reasoning" else m.answer_tokens)
        if from_channel == "reasoning":
            m.reasoning_tokens -= count
        else:
            m.answer_tokens -= count
        if to_channel == "reasoning":
            m.reasoning_tokens += count
        else:
            m.answer_tokens += count

    def finish(self, reason: str, cache_bytes: int = 0) -> LatencyMetrics:
        """Close the record with ``reason`` and return the final metrics."""
        m = self.metrics
        m.finish_reason = reason
        m.cache_bytes = cache_bytes
        m.total_time_s = self._clock() - self._start
        gaps = sorted(b - a for a, b in zip(self._token_times, self._token_times[1:], strict=False))
        if gaps:
            m.inter_token_latency_p50_s = _percentile(gaps, 0.5)
            m.inter_token_latency_p95_s = _percentile(gaps, 0.95)
        return self.snapshot()

    def snapshot(self) -> LatencyMetrics:
        """A copy that later recording does not change."""
        m = self.metrics
        # every field but the history is immutable: a shallow copy (asdict's deep copy cost a fifth of a decode
        # step of the embedded model in batches, taken once per token per request)
        return replace(m, decode_tokens_per_s_history=list(m.decode_tokens_per_s_history))
