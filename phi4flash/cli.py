"""The ``phi4flash`` command: chat | demo | serve | quantize | bench | eval | train.

The only module of the core that prints; the faces with heavier dependencies (web chat, server,
training) are imported when their sub-command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

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


def _chat(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="phi4flash chat", description="Chat with the model in the terminal.")
    parser.add_argument("model", nargs="?", default="embedded", help="hub id, checkpoint folder or 'embedded'")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantize", default=None,
                        help="weight-only quantization: int8, int4 or int4-g<32|64|128|256> "
                             "(default: none; int4 = int4-g128)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    import phi4flash

    engine = phi4flash.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    overrides: dict[str, object] = {"max_new_tokens": args.max_new_tokens, "seed": args.seed}
    if args.temperature is not None:
        overrides["temperature"] = args.temperature
    if args.top_p is not None:
        overrides["top_p"] = args.top_p
    config = engine.default_config(**overrides)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"{BOLD}phi4flash{RESET} {engine.model_name} on {engine.device} ({engine.dtype}); Ctrl-D to quit, "
          "Ctrl-C to stop a reply")
    while True:
        try:
            question = input(f"{BOLD}> {RESET}")
        except EOFError:
            print()
            return 0
        if not question.strip():
            continue
        messages.append({"role": "user", "content": question})
        answer, channel = [], None
        stream = engine.stream(messages, config)
        try:
            for event in stream:
                if event.channel != channel and event.text:
                    channel = event.channel
                    print(DIM if channel == "reasoning" else RESET, end="")
                    if channel == "answer":
                        print()
                if event.channel == "answer":
                    answer.append(event.text)
                print(event.text, end="", flush=True)
                if event.done:
                    print(f"{RESET}\n{DIM}[{format_metrics(event.metrics)}]{RESET}")
        except KeyboardInterrupt:
            stream.close()
            print(f"{RESET}\n{DIM}[stopped]{RESET}")
        except ValueError as err:  # e.g. the conversation no longer fits the context
            print(f"{RESET}\nerror: {err}")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": "".join(answer)})


def _quantize(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="phi4flash quantize", description="Write a weight-only quantized copy of a checkpoint (safetensors, "
        "config.json with a quantization entry, tokenizer files) that `phi4flash.load(OUT)` loads directly.")
    parser.add_argument("source", help="hub id, checkpoint folder or 'embedded'")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--bits", type=int, choices=(8, 4), default=4, help="8: per-channel int8; 4: group-wise int4")
    parser.add_argument("--group-size", type=int, default=None,
                        help="int4 group size: 32, 64, 128 or 256 (default: 128)")
    args = parser.parse_args(argv)
    if args.bits == 8 and args.group_size is not None:
        parser.error("--group-size is for --bits 4 (int8 has one scale per output channel)")

    import resource
    import time

    from .quant import QuantSpec
    from .weights import quantize_checkpoint

    spec = QuantSpec(8) if args.bits == 8 else QuantSpec(4, args.group_size or 128)
    start = time.perf_counter()
    out = quantize_checkpoint(args.source, args.out, spec)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"wrote {out} ({spec.label}, {size / 2**30:.2f} GiB of weights) in {time.perf_counter() - start:.1f} s; "
          f"peak memory {peak:.2f} GiB")
    return 0


def _bench(argv: Sequence[str]) -> int:
    from .bench import main

    return main(argv)


def _eval(argv: Sequence[str]) -> int:
    from .training.evaluate import main

    return main(argv) or 0


def _train(argv: Sequence[str]) -> int:
    from .training.train import main

    return main(argv) or 0


def _demo(argv: Sequence[str]) -> int:
    try:
        from phi4flash_demo.cli import main
    except ImportError as err:
        print(f"the web chat needs the demo extra: pip install 'phi4flash[demo]' ({err})", file=sys.stderr)
        return 1
    return main(argv) or 0


def _serve(argv: Sequence[str]) -> int:
    try:
        from .server.cli import main
    except ImportError as err:
        print(f"the server needs the serve extra: pip install 'phi4flash[serve]' ({err})", file=sys.stderr)
        return 1
    return main(argv) or 0


COMMANDS = {
    "chat": (_chat, "chat in the terminal (reasoning dimmed, then a metrics line)"),
    "demo": (_demo, "the Gradio web chat (default model: embedded)"),
    "serve": (_serve, "an OpenAI-compatible HTTP server"),
    "quantize": (_quantize, "write an int8 / int4 quantized copy of a checkpoint"),
    "bench": (_bench, "prefill/decode speed vs a transformers Phi-3-style baseline"),
    "eval": (_eval, "accuracy of a model on the held-out math problems"),
    "train": (_train, "retrain the embedded tiny model"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``phi4flash`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: phi4flash COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command, _ = COMMANDS[argv[0]]
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
