"""``phi4flash chat``: chat with a model in the terminal.

The reasoning streams dimmed, then the answer and a line of latency metrics. Only complete exchanges
are kept in the conversation: a reply stopped with Ctrl-C (or one that ran out of tokens before any
answer) is dropped with its question, so the next question continues as if it had not been asked.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .cli import COMPILE_HELP, HelpFormatter, configure_logging

DIM, BOLD, RESET = "\033[2m", "\033[1m", "\033[0m"


def format_metrics(metrics: object) -> str:
    """One line of latency readouts for a finished generation."""
    m = metrics
    parts = []
    if getattr(m, "time_to_first_token_s", None) is not None:
        parts.append(f"TTFT {m.time_to_first_token_s * 1000:.0f} ms")  # type: ignore[attr-defined]
    if getattr(m, "prefill_tokens_per_s", None):
        parts.append(f"prefill {m.prefill_tokens_per_s:.0f} tok/s")  # type: ignore[attr-defined]
    if getattr(m, "decode_tokens_per_s", None):
        parts.append(f"decode {m.decode_tokens_per_s:.1f} tok/s")  # type: ignore[attr-defined]
    parts.append(f"prompt {m.prompt_tokens} (reused {m.reused_prompt_tokens})")  # type: ignore[attr-defined]
    parts.append(f"reasoning {m.reasoning_tokens} + answer {m.answer_tokens} tokens")  # type: ignore[attr-defined]
    parts.append(f"{m.total_time_s:.2f} s")  # type: ignore[attr-defined]
    parts.append(f"finish: {m.finish_reason}")  # type: ignore[attr-defined]
    return " | ".join(parts)


def build_parser(prog: str = "phi4flash chat") -> argparse.ArgumentParser:
    """The ``phi4flash chat`` options."""
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter,
        description="Chat with the model in the terminal: the reasoning streams dimmed, then the answer and a "
                    "line of latency metrics. Ctrl-C stops a reply (the stopped exchange is dropped from the "
                    "conversation); Ctrl-C or Ctrl-D at the prompt quits.")
    parser.add_argument("model", nargs="?", default="embedded",
                        help="'embedded' (the tiny built-in model), a Hugging Face hub id or a checkpoint folder")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | mps")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, else float32) | float32 | bfloat16 "
                                                        "| float16")
    parser.add_argument("--quantize", default=None,
                        help="weight-only quantization: int8, int4 or int4-g<32|64|128|256> "
                             "(default: none; int4 = int4-g128)")
    parser.add_argument("--compile", action="store_true",
                        help=COMPILE_HELP)
    parser.add_argument("--system", default=None, help="system prompt (none when not given)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature, 0 = greedy (unset: the checkpoint's generation_config)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling threshold (unset: the checkpoint's generation_config)")
    parser.add_argument("--max-new-tokens", type=int, default=4096, help="most new tokens per reply, reasoning "
                                                                         "included")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (unset: random)")
    parser.add_argument("--debug", action="store_true", help="debug logs, and tracebacks on errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``phi4flash chat`` with ``argv`` (the arguments after ``chat``); return the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(args.debug)
    import phi4flash

    try:
        engine = phi4flash.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                                compile=True if args.compile else "auto")
        overrides: dict[str, object] = {"max_new_tokens": args.max_new_tokens, "seed": args.seed}
        if args.temperature is not None:
            overrides["temperature"] = args.temperature
        if args.top_p is not None:
            overrides["top_p"] = args.top_p
        config = engine.default_config(**overrides).validate()
    except Exception as exc:  # a clear message; the traceback only when asked for
        if args.debug:
            raise
        print(f"phi4flash chat: {exc}\n(--debug shows the traceback)", file=sys.stderr)
        return 1
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"{BOLD}phi4flash{RESET} {engine.model_name} on {engine.device} ({engine.dtype}); Ctrl-C stops a reply, "
          "Ctrl-D (or Ctrl-C at the prompt) quits")
    return chat_loop(engine, config, messages)


def chat_loop(engine: Any, config: Any, messages: list[dict[str, str]]) -> int:
    """Read questions, stream replies; keep only complete exchanges in ``messages``.

    A reply stopped with Ctrl-C, or one that ran out of tokens before any answer, is dropped with its
    question, so the next question continues the conversation as if it had not been asked.
    """
    if sys.stdin.isatty():
        import readline  # noqa: F401 - line editing and history for input()
    while True:
        try:
            question = input(f"{BOLD}> {RESET}")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not question.strip():
            continue
        answer = _reply(engine, config, [*messages, {"role": "user", "content": question}])
        if answer is not None:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _reply(engine: Any, config: Any, messages: list[dict[str, str]]) -> str | None:
    """Stream one reply to the terminal; return its answer, or None when the exchange is not to be kept."""
    answer: list[str] = []
    channel = None
    try:
        stream = engine.stream(messages, config)
    except ValueError as err:  # e.g. the conversation no longer fits the context
        print(f"error: {err}")
        return None
    try:
        for event in stream:
            if event.channel != channel and event.text:
                channel = event.channel
                print(DIM if channel == "reasoning" else f"{RESET}\n", end="")
            if event.channel == "answer":
                answer.append(event.text)
            print(event.text, end="", flush=True)
            if event.done:
                print(f"{RESET}\n{DIM}[{format_metrics(event.metrics)}]{RESET}")
    except KeyboardInterrupt:
        stream.close()
        print(f"{RESET}\n{DIM}[stopped: this exchange is not kept]{RESET}")
        return None
    text = "".join(answer).strip()
    if not text:
        print(f"{DIM}[no answer (out of new tokens while thinking? raise --max-new-tokens): not kept]{RESET}")
        return None
    return text


