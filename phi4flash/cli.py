"""The ``phi4flash`` command: chat | demo | serve | quantize | bench | eval | train | space.

The only module of the core that prints; the faces with heavier dependencies (web chat, server,
training) are imported when their sub-command runs. Each sub-command lives in a module with a
``build_parser()`` (its options, each with help and default) and a ``main(argv)``; :data:`COMMANDS` is the
table from names to those two, so ``phi4flash --help`` and the tests can walk every parser.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every sub-command's help: "(default: X)" after each option's help, unless there is no default to show
    (None, False) or the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text.lower():
            return text
        return super()._get_help_string(action)


# --compile on chat, demo and serve
COMPILE_HELP = ("compile the one-token decode step while loading (on a CPU torch.compile: a minute or two, once per "
                "process, for the real model decode about 1.3x faster; on CUDA CUDA graphs, under a second, 3-7x "
                "faster); default: as $PHI4FLASH_COMPILE says, else on CUDA only")


@dataclass(frozen=True)
class Command:
    """One sub-command: what it does, where its parser and entry point live, and the extra it needs."""

    summary: str
    module: str  # defines build_parser(prog) -> ArgumentParser and main(argv) -> int
    extra: str | None = None  # the pip extra whose absence makes the import fail
    prefix: str = ""  # a module holding several commands names them {prefix}build_parser, {prefix}main

    def load(self, attribute: str) -> Callable[..., Any]:
        """Import the command's module and return ``build_parser`` or ``main``."""
        return getattr(importlib.import_module(self.module), self.prefix + attribute)


COMMANDS: dict[str, Command] = {
    "chat": Command("chat in the terminal (reasoning dimmed, then a metrics line)", "phi4flash.chat"),
    "demo": Command("the Gradio web chat (default model: embedded)", "phi4flash_demo.cli", "demo"),
    "serve": Command("an OpenAI-compatible HTTP server", "phi4flash.server.cli", "serve"),
    "quantize": Command("write an int8 / int4 quantized copy of a checkpoint", "phi4flash.cli", prefix="quantize_"),
    "bench": Command("prefill/decode speed vs a transformers Phi-3-style baseline", "phi4flash.bench"),
    "eval": Command("accuracy of a model on the held-out math problems", "phi4flash.training.evaluate"),
    "train": Command("retrain the embedded tiny model", "phi4flash.training.train", "train"),
    "space": Command("build a deployable Hugging Face Space folder", "phi4flash_demo.space", "demo"),
}


def command_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of sub-command ``name`` (for help and tests), with its ``phi4flash NAME`` prog."""
    return COMMANDS[name].load("build_parser")(prog=f"phi4flash {name}")


def quantize_build_parser(prog: str = "phi4flash quantize") -> argparse.ArgumentParser:
    """The ``phi4flash quantize`` options."""
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter,
        description="Write a weight-only quantized copy of a checkpoint (safetensors, config.json with a "
                    "quantization entry, tokenizer files) that `phi4flash.load(OUT)` loads directly.")
    parser.add_argument("source", help="hub id, checkpoint folder or 'embedded'")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--bits", type=int, choices=(8, 4), default=4, help="8: per-channel int8; 4: group-wise int4")
    parser.add_argument("--group-size", type=int, default=None,
                        help="int4 group size: 32, 64, 128 or 256 (default: 128)")
    return parser


def quantize_main(argv: Sequence[str] | None = None) -> int:
    """Run ``phi4flash quantize``; return the exit status."""
    parser = quantize_build_parser()
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


def configure_logging(debug: bool = False) -> None:
    """Log INFO and above to stderr (DEBUG with ``debug``), replacing any earlier set-up."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        force=True)
    # HTTP clients log every request at INFO (gradio checks its own server with httpx at start).
    logging.getLogger("httpx").setLevel(logging.DEBUG if debug else logging.WARNING)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return ("usage: phi4flash [--version] [--help] COMMAND [options]\n\ncommands:\n" + "\n".join(lines)
            + "\n\n`phi4flash COMMAND --help` lists a command's options and their defaults.")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``phi4flash`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from ._version import __version__

        print(f"phi4flash {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    command = COMMANDS.get(name)
    if command is None:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"phi4flash: unknown command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    configure_logging()
    try:
        run = command.load("main")
    except ImportError as err:
        if command.extra is None:
            raise
        print(f"phi4flash {name} needs the {command.extra} extra: pip install 'phi4flash[{command.extra}]' ({err})",
              file=sys.stderr)
        return 1
    try:
        return run(rest) or 0
    except KeyboardInterrupt:  # Ctrl-C while loading or serving: quit without a traceback
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
