"""The Gradio web chat: streamed reasoning and answer, live latency readouts, real stop.

``build_demo(engine)`` returns a ``gr.Blocks`` around any object that implements
``phi4flash.Engine`` (the in-process ``LocalEngine`` or the HTTP ``RemoteEngine``). Every number in
the latency panel comes from the engine's ``LatencyMetrics``; the UI never times anything itself.
"""

from __future__ import annotations

import html
import logging
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from phi4flash import Engine, GenerationConfig, LatencyMetrics, PromptTooLongError

logger = logging.getLogger(__name__)

# Longer delimiters first, so "$$" is not read as two empty "$" spans.
MATH_DELIMITERS: list[dict[str, str | bool]] = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "$", "right": "$", "display": False},
]

# The Phi-4-mini-flash-reasoning article's two problems first. The embedded model is trained on every card
# (phi4flash.training.data.demo_examples), so the offline demo shows each one worked and answered.
EXAMPLES: list[str] = [
    "Solve the quadratic equation: 2x^2 + 5x - 3 = 0",
    "Sales has 25% more employees than Marketing, and Engineering has 40% fewer employees than Sales. "
    "If the three departments have 180 employees in total, how many employees does each department have?",
    "Sales has 25% more employees than Marketing. Together they have 180 employees. "
    "How many employees does Marketing have?",
    "Solve 3x + 5 = 20",
]

# The browser re-renders Markdown and KaTeX on every update; above ~10 updates/s it falls behind.
UPDATE_INTERVAL_S = 0.1
# Gradio can only close the chat generator at a yield, so yield at least this often.
HEARTBEAT_S = 0.5
# A message longer than this many characters per context token cannot fit, whatever the tokenizer.
_MAX_CHARS_PER_TOKEN = 16

THINK_TITLE = "Thinking"
ERROR_TITLE = "⚠️ Cannot answer"
LENGTH_TITLE = "ℹ️ Out of new tokens"


@dataclass
class DemoRuntime:
    """Counters the demo keeps about its generations (for the status line and for tests)."""

    active: int = 0
    finished: deque[LatencyMetrics] = field(default_factory=lambda: deque(maxlen=32))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def started(self) -> int:
        """Count one more running generation and return how many run now."""
        with self.lock:
            self.active += 1
            return self.active

    def ended(self, metrics: LatencyMetrics | None) -> None:
        """Count one generation as finished, keeping its final metrics."""
        with self.lock:
            self.active -= 1
            if metrics is not None:
                self.finished.append(metrics)


# --------------------------------------------------------------------------------------------------
# History and input handling


def content_text(content: Any) -> str:
    """Flatten a Gradio message content (a str, a content-block list or a component dict) to text.

    Args:
        content: ``"text"``, ``[{"type": "text", "text": ...}, ...]``, or a file/component dict.

    Returns:
        The text parts joined; files and other components contribute nothing.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        if content.get("type") == "text" or "text" in content:
            return str(content.get("text") or "")
        return ""
    if isinstance(content, (list, tuple)):
        return "".join(content_text(part) for part in content)
    return ""


def history_to_messages(history: Sequence[Any]) -> list[dict[str, str]]:
    """Turn a Gradio chat history into plain ``{"role", "content": str}`` messages for the engine.

    Thoughts, error notes and other messages that carry a ``metadata`` title are dropped: old chains
    of thought are not fed back to a reasoning model. A user turn that got no answer (an error or a
    stop before any answer) is dropped too, so roles keep alternating.

    Args:
        history: messages as the UI sends them (content blocks) or as the API keeps them (str).

    Returns:
        The conversation as engine messages, oldest first.
    """
    out: list[dict[str, str]] = []
    for msg in history:
        if not isinstance(msg, dict):
            role, content, metadata = getattr(msg, "role", None), getattr(msg, "content", ""), msg.metadata
        else:
            role, content, metadata = msg.get("role"), msg.get("content"), msg.get("metadata")
        if role not in ("user", "assistant") or (metadata and metadata.get("title")):
            continue
        text = content_text(content).strip()
        if not text:
            continue
        if out and out[-1]["role"] == role:
            if role == "user":
                out[-1] = {"role": role, "content": text}  # the earlier one was never answered
            else:
                out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + text}
            continue
        out.append({"role": role, "content": text})
    while out and out[-1]["role"] == "user":
        out.pop()
    return out


def strip_think_tags(text: str) -> str:
    """Remove ``<think>`` / ``</think>`` markers that an engine may leave in the reasoning text."""
    return re.sub(r"</?think>", "", text)


def display_math(text: str) -> str:
    """Wrap a bare ``\\boxed{...}`` (the models' final-answer convention) in ``$...$`` so that it renders.

    Text that already uses math delimiters is left alone.
    """
    if "$" in text or "\\(" in text or "\\[" in text:
        return text
    return re.sub(r"\\boxed\{(?:[^{}]|\{[^{}]*\})*\}", lambda m: f"${m.group(0)}$", text)


def error_message(text: str, title: str = ERROR_TITLE) -> gr.ChatMessage:
    """An assistant note shown in the chat; its title keeps it out of the next prompt (no status: shown open)."""
    return gr.ChatMessage(role="assistant", content=text, metadata={"title": title})


# --------------------------------------------------------------------------------------------------
# Latency panel


def format_context(n: int) -> str:
    """``65536`` -> ``"64K"``; other sizes with thousands separators."""
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return f"{n:,}"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def sparkline_svg(points: Sequence[float], width: int = 220, height: int = 44) -> str:
    """A tiny inline SVG line chart of ``points`` (decode tokens/s over the generation)."""
    if len(points) < 2:
        return (f'<svg class="p4f-spark" width="{width}" height="{height}" role="img" '
                'aria-label="decode tokens/s chart (collecting)"></svg>')
    top = max(points) * 1.1 or 1.0
    step = width / (len(points) - 1)
    coords = " ".join(f"{i * step:.1f},{height - 2 - (p / top) * (height - 4):.1f}" for i, p in enumerate(points))
    return (f'<svg class="p4f-spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="decode tokens/s chart, {len(points)} points, max {max(points):.0f}">'
            f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{coords}"/></svg>')


def render_stats(metrics: LatencyMetrics | None, phase: str, *, device: str = "", dtype: str = "",
                 context_length: int = 0, active: int = 1) -> str:
    """Render the latency panel as HTML; each value carries ``data-metric`` so tests can read it.

    Args:
        metrics: the engine's latest snapshot, or None before the first token.
        phase: what the generation is doing ("processing prompt", "thinking", "answering", "done", ...).
        device: fallback device name while no metrics exist.
        dtype: fallback dtype while no metrics exist.
        context_length: fallback context size while no metrics exist.
        active: generations running at once on this server (shown when above one).

    Returns:
        An HTML fragment for a ``gr.HTML`` component.
    """
    m = metrics or LatencyMetrics(device=device, dtype=dtype, context_length=context_length)
    ctx_total = m.context_length or context_length
    decode_live = m.decode_tokens_per_s_recent if m.finish_reason is None else m.decode_tokens_per_s
    # The engine's prefill rate counts only the prompt tokens it computed (reused ones came from a kept
    # state), so a continued conversation shows a rate over a few tokens: say how many.
    prefilled = m.prompt_tokens - m.reused_prompt_tokens
    prefill_label = "Prefill" if not m.prompt_tokens else (
        f"Prefill ({prefilled:,} new token{'s' if prefilled != 1 else ''})" if m.reused_prompt_tokens
        else f"Prefill ({prefilled:,} token{'s' if prefilled != 1 else ''})")
    rows = [
        ("ttft", "Time to first token", "–" if m.time_to_first_token_s is None
         else f"{m.time_to_first_token_s * 1000:,.0f} ms"),
        ("prefill", prefill_label, f"{_num(m.prefill_tokens_per_s, ',.0f')} tok/s"),
        ("decode", "Decode (live)" if m.finish_reason is None else "Decode (avg)",
         f"{_num(decode_live, ',.1f')} tok/s"),
        ("prompt", "Prompt tokens", f"{m.prompt_tokens:,}"),
        ("reused", "Reused prompt tokens", f"{m.reused_prompt_tokens:,}"),
        ("reasoning", "Reasoning tokens", f"{m.reasoning_tokens:,}"),
        ("answer", "Answer tokens", f"{m.answer_tokens:,}"),
        ("total", "Total time", f"{m.total_time_s:,.2f} s"),
        ("finish", "Finish reason", m.finish_reason or "–"),
        ("context", "Context used", f"{m.context_used:,} / {format_context(ctx_total)}" if ctx_total
         else f"{m.context_used:,}"),
        ("device", "Device", html.escape(" · ".join(x for x in (m.device or device, m.dtype or dtype) if x) or "–")),
    ]
    if active > 1:
        rows.append(("active", "Generations running", str(active)))
    body = "".join(f'<tr><th>{label}</th><td data-metric="{key}">{value}</td></tr>' for key, label, value in rows)
    chart = sparkline_svg(m.decode_tokens_per_s_history)
    return (f'<div class="p4f-stats"><div class="p4f-phase" data-phase="{html.escape(phase)}">{html.escape(phase)}'
            f'</div><table>{body}</table><div class="p4f-chart-label">decode tok/s over the generation</div>'
            f'{chart}</div>')


# --------------------------------------------------------------------------------------------------
# The chat turn


def _thought(reasoning: str, metrics: LatencyMetrics | None, *, done: bool, seconds: float = 0.0,
             stopped: bool = False) -> gr.ChatMessage:
    """The reasoning message: a spinner and live rate while pending, token count and duration when done."""
    n = metrics.reasoning_tokens if metrics else 0
    meta: dict[str, Any] = {"title": THINK_TITLE, "status": "pending"}
    if metrics is not None and metrics.decode_tokens_per_s_recent:
        meta["log"] = f"{n:,} tokens · {metrics.decode_tokens_per_s_recent:,.0f} tok/s"
    if done:
        # Gradio shows "duration" next to the title, e.g. "Thought · 812 tokens (4.3s)".
        meta = {"title": f"Thought · {n:,} tokens" + (" (stopped)" if stopped else ""),
                "status": "done", "duration": round(seconds, 2)}
    return gr.ChatMessage(role="assistant", content=strip_think_tags(reasoning).strip(), metadata=meta)


def build_turn(engine: Engine, runtime: DemoRuntime) -> Callable[[list[dict[str, str]], GenerationConfig],
                                                                 Iterator[tuple[list[gr.ChatMessage], str]]]:
    """Make the generator that streams one chat turn from ``engine``.

    The generator takes only picklable arguments (messages, config) so that a ZeroGPU ``@spaces.GPU``
    decorator can run it in its worker process. It yields ``(chat_messages, stats_html)`` at most
    every ``UPDATE_INTERVAL_S``, at least every ``HEARTBEAT_S`` (so that Gradio can close it even
    while the engine is prefilling a long prompt) and once at the end. Closing it (Gradio's Stop)
    sets the engine's cancel event, so decoding stops within one step.
    """
    info = {"device": engine.device, "dtype": engine.dtype, "context_length": engine.context_length}

    def turn(messages: list[dict[str, str]], config: GenerationConfig) -> Iterator[tuple[list[gr.ChatMessage], str]]:
        cancel = threading.Event()
        reasoning, answer = "", ""
        metrics: LatencyMetrics | None = None
        reasoning_metrics: LatencyMetrics | None = None
        final: LatencyMetrics | None = None
        active = 1

        def view(done: bool) -> list[gr.ChatMessage]:
            out: list[gr.ChatMessage] = []
            if reasoning or not answer:
                # The engine's final counts are authoritative (its splitter may move tokens late);
                # the thought lasted until the last reasoning token, or to the end if no answer came.
                ended = reasoning_metrics if answer else final
                out.append(_thought(reasoning, final or metrics, done=done or bool(answer),
                                    seconds=ended.total_time_s if ended else 0.0,
                                    stopped=done and not answer and final is not None
                                    and final.finish_reason == "cancelled"))
            if answer:
                out.append(gr.ChatMessage(role="assistant", content=display_math(strip_think_tags(answer).lstrip())))
            return out

        def phase() -> str:
            if final is not None:
                return f"done ({final.finish_reason})"
            if metrics is None:
                return "processing prompt…"
            return "answering…" if answer else "thinking…"

        def stats(error: bool = False) -> str:
            return render_stats(final or metrics, "error" if error else phase(), active=active, **info)

        try:
            # Raises PromptTooLongError / ValueError before anything runs.
            stream = engine.stream(messages, config, cancel=cancel)
            inbox: queue.Queue[Any] = queue.Queue()
            active = runtime.started()
            threading.Thread(target=_pump, args=(stream, inbox, runtime), name="phi4flash-demo-pump",
                             daemon=True).start()
            yield view(False), stats()
            last_yield, changed, ended = time.monotonic(), False, False
            while not ended:
                try:
                    items = [inbox.get(timeout=UPDATE_INTERVAL_S)]
                except queue.Empty:
                    items = []
                while not inbox.empty():
                    items.append(inbox.get_nowait())
                for item in items:
                    if item is _END:
                        ended = True
                    elif isinstance(item, BaseException):
                        raise item
                    elif item.done:
                        final = item.metrics
                    else:
                        changed = True
                        metrics = item.metrics
                        if item.channel == "reasoning":
                            reasoning += item.text
                            reasoning_metrics = metrics
                        else:
                            answer += item.text
                now = time.monotonic()
                due = (changed and now - last_yield >= UPDATE_INTERVAL_S) or now - last_yield >= HEARTBEAT_S
                if due and not ended:
                    last_yield, changed = now, False
                    yield view(False), stats()
            if final is None and metrics is not None:  # an engine that ended without its done event
                final = metrics
            out = view(True)
            if final is not None and final.finish_reason == "length" and not answer:
                out.append(error_message(f"The model used all {config.max_new_tokens:,} new tokens while thinking. "
                                         "Raise **Max new tokens** in the settings and retry.", LENGTH_TITLE))
            yield out, stats()
        except PromptTooLongError as exc:
            logger.info("prompt too long: %s", exc)  # the engine's wording repeats the advice below
            yield [error_message(f"This conversation is too long for the model's context of "
                                 f"{format_context(engine.context_length)} tokens (with room for the reply). "
                                 "Shorten the message, or start a new chat to drop the earlier turns.")], stats(
                error=True)
        except ValueError as exc:  # invalid sampling settings
            yield [error_message(f"Invalid settings: {exc}")], stats(error=True)
        except Exception as exc:  # the chat must show the failure, not a stack trace
            logger.exception("generation failed")
            partial = view(True) if reasoning or answer else []  # no empty "Thought · 0 tokens" above the error
            yield [*partial, error_message(f"Generation failed: {type(exc).__name__}: {exc}")], stats(error=True)
        finally:
            # Reached on normal end, on error, and on GeneratorExit when the user presses Stop.
            cancel.set()

    return turn


_END = object()


def _pump(stream: Iterator[Any], inbox: queue.Queue[Any], runtime: DemoRuntime) -> None:
    """Move the engine's events into ``inbox`` (so the UI can wait with a timeout), then ``_END``."""
    final: LatencyMetrics | None = None
    try:
        for event in stream:
            if event.done:
                final = event.metrics
            inbox.put(event)
    except Exception as exc:  # handed to the chat, which shows it
        inbox.put(exc)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        inbox.put(_END)
        runtime.ended(final)


def finalize_stopped(history: list[dict[str, Any]] | None, stats_html: str) -> tuple[list[dict[str, Any]], str]:
    """After Stop: end the thought's spinner and mark the panel as stopped; the partial answer stays."""
    history = list(history or [])
    for i, msg in enumerate(history):
        meta = msg.get("metadata") if isinstance(msg, dict) else None
        if meta and meta.get("status") == "pending":
            title = str(meta.get("title") or THINK_TITLE)
            history[i] = {**msg, "metadata": {**meta, "status": "done", "title": f"{title} (stopped)"}}
    stats_html = stats_html or ""
    stats_html = re.sub(r'data-phase="[^"]*">[^<]*<', 'data-phase="stopped">stopped<', stats_html)
    stats_html = re.sub(r'(data-metric="finish">)[^<]*<', r"\1cancelled<", stats_html)
    return history, stats_html


# --------------------------------------------------------------------------------------------------
# The page

CSS = """
.p4f-stats { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85em; }
.p4f-stats table { width: 100%; border-collapse: collapse; }
.p4f-stats table, .p4f-stats tr, .p4f-stats th, .p4f-stats td {
  border: none !important; background: none !important; padding: 1px 6px 1px 0;
}
.p4f-stats th { text-align: left; font-weight: normal; opacity: 0.75; }
.p4f-stats td { text-align: right; white-space: nowrap; }
.p4f-phase { font-weight: 600; margin-bottom: 4px; }
.p4f-chart-label { opacity: 0.75; margin-top: 6px; }
/* The panel layout gives every message of a reply (thought, answer) its own copy/retry/undo row, all
   acting on the whole reply: keep the last one. */
#chatbot .message-buttons:not(:last-child) { display: none !important; }
/* A long error message wraps instead of widening the page. */
#load-error pre, #load-error code { white-space: pre-wrap !important; overflow-wrap: anywhere; }
"""


def _validate_message(message: Any) -> dict[str, Any]:
    """Refuse a blank message in the browser before it becomes an empty bubble (and a nameless saved chat)."""
    return gr.validate(bool(content_text(message).strip()), "Type a question first: the message is empty.")


def build_demo(engine: Engine | BaseException | str, *, title: str = "Phi-4-mini-flash-reasoning",
               max_new_tokens_default: int = 4096, max_new_tokens_limit: int = 32768,
               gpu_decorator: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
               concurrency_limit: int = 2, max_queue: int = 16) -> gr.Blocks:
    """Build the web chat around an engine.

    Args:
        engine: an object implementing ``phi4flash.Engine``; or the exception (or message) from a
            model that failed to load, which builds a page that explains the failure instead.
        title: the page heading.
        max_new_tokens_default: the initial value of the "Max new tokens" slider.
        max_new_tokens_limit: the slider's maximum (also capped by the model's context).
        gpu_decorator: wraps the per-turn generator ``turn(messages, config)``; the Space passes
            ``spaces.GPU(duration=...)``. None runs it as is.
        concurrency_limit: generations that may run at once; further requests wait in the queue.
        max_queue: requests that may wait; beyond it users get "queue full" instead of a long wait.

    Returns:
        The ``gr.Blocks`` app, queued; ``demo.phi4flash_runtime`` holds its :class:`DemoRuntime`.
        Launch it with ``demo.launch(css=phi4flash_demo.app.CSS)`` (Gradio 6 takes CSS at launch).
    """
    if isinstance(engine, (BaseException, str)):
        return build_error_demo(engine)

    runtime = DemoRuntime()
    turn = build_turn(engine, runtime)
    if gpu_decorator is not None:
        turn = gpu_decorator(turn)
    context = int(engine.context_length or 0)
    limit = max(16, min(max_new_tokens_limit, context or max_new_tokens_limit))
    default_tokens = max(16, min(max_new_tokens_default, limit))

    def respond(message: str, history: list[dict[str, Any]], system_prompt: str, temperature: float,
                top_p: float, max_new_tokens: float, seed: float | None):
        text = content_text(message).strip()
        if not text:
            yield [error_message("Type a question first: the message was empty.")], gr.skip()
            return
        if context and len(text) > context * _MAX_CHARS_PER_TOKEN:
            yield [error_message(f"This message has {len(text):,} characters, far more than the model's "
                                 f"context of {format_context(context)} tokens can hold. Shorten it.")], gr.skip()
            return
        messages = history_to_messages(history)
        if system_prompt and system_prompt.strip():
            messages.insert(0, {"role": "system", "content": system_prompt.strip()})
        messages.append({"role": "user", "content": text})
        config = GenerationConfig(
            temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens),
            seed=None if seed is None or int(seed) < 0 else int(seed))
        yield from turn(messages, config)

    idle_stats = render_stats(None, "idle", device=engine.device, dtype=engine.dtype, context_length=context)
    stats = gr.HTML(idle_stats, elem_id="stats", render=False)
    inputs = [
        gr.Textbox(value="", label="System prompt", placeholder="Optional, e.g. 'Answer in French.'", lines=2,
                   render=False),
        gr.Slider(0.0, 1.5, value=0.6, step=0.05, label="Temperature (0 = greedy)", render=False),
        gr.Slider(0.05, 1.0, value=0.95, step=0.01, label="Top p", render=False),
        gr.Slider(16, limit, value=default_tokens, step=16, label="Max new tokens", render=False),
        gr.Number(value=-1, precision=0, label="Seed (-1 = random)", render=False),
    ]
    chatbot = gr.Chatbot(
        elem_id="chatbot", layout="panel", height="68vh", latex_delimiters=MATH_DELIMITERS,
        buttons=["copy", "copy_all"], watermark=f"Generated by {title}", show_label=False,
        placeholder=f"**{html.escape(title)}**: ask a math question. The reasoning streams live above the answer.")

    with gr.Blocks(title=title, fill_height=True) as demo:
        where = engine.device if not getattr(engine, "base_url", None) else f"{engine.device} {engine.base_url}"
        gr.Markdown(f"## {html.escape(title)}\n`{html.escape(engine.model_name)}` · {html.escape(where)} · "
                    f"{html.escape(engine.dtype)} · context {format_context(context)} tokens", elem_id="header")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                textbox = gr.Textbox(placeholder="Ask a question…", elem_id="input", submit_btn=True, stop_btn=True,
                                     show_label=False, max_lines=12)
                chat = gr.ChatInterface(
                    respond, chatbot=chatbot, textbox=textbox,
                    additional_inputs=inputs, additional_outputs=[stats],
                    additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
                    examples=[[q] for q in EXAMPLES], cache_examples=False, editable=True, save_history=True,
                    show_progress="hidden", api_name="chat", fill_height=True, validator=_validate_message)
            with gr.Column(scale=1, min_width=300):
                gr.Markdown("### Latency")
                stats.render()
        # Gradio closes the generator on Stop; this clears the leftover spinner and panel state.
        chat.textbox.stop(finalize_stopped, [chat.chatbot, stats], [chat.chatbot, stats],
                          api_visibility="private", queue=False)
        # Another conversation (new, cleared or reopened from the list): the panel's numbers belong to none.
        gr.on([chat.new_chat_button.click, chat.chatbot.clear, chat.chat_history_dataset.click], lambda: idle_stats,
              None, stats, api_visibility="private", queue=False)
    demo.queue(max_size=max_queue, default_concurrency_limit=concurrency_limit)
    demo.phi4flash_runtime = runtime  # type: ignore[attr-defined]
    return demo


def build_error_demo(error: BaseException | str) -> gr.Blocks:
    """A page that says why the model could not be loaded and how to fix it.

    Args:
        error: the exception raised while loading, or a message.

    Returns:
        A ``gr.Blocks`` with only that explanation.
    """
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    hints = [
        "Check the model name: `embedded` (the tiny built-in model), a Hugging Face id such as "
        "`microsoft/Phi-4-mini-flash-reasoning`, or a local checkpoint directory.",
        "For a hub model: check the network, and log in (`huggingface-cli login` or `HF_TOKEN`) if it is gated.",
        "Out of memory: the 3.8B model needs about 8 GB in bf16 on a GPU; try `--model embedded` to check the setup.",
        "With `--remote`: check the URL (the API root, e.g. `http://127.0.0.1:8000/v1`) and the API key (`--api-key`, "
        "or the `PHI4FLASH_API_KEY` / `OPENAI_API_KEY` environment variables).",
        "Missing packages: `pip install \"phi4flash[demo]\"`.",
    ]
    with gr.Blocks(title="phi4flash: model failed to load") as demo:
        body = "\n".join(f"- {h}" for h in hints)
        reason = reason.replace("```", "'''")  # keep the code fence closed
        gr.Markdown(f"## The model failed to load\n\n```\n{reason}\n```\n\n"
                    f"**How to fix it**\n\n{body}", elem_id="load-error")
    return demo
