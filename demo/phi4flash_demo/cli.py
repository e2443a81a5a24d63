"""``phi4flash demo``: load a model (or connect to a server) and serve the web chat."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import Any

from phi4flash.cli import COMPILE_HELP, HelpFormatter, configure_logging

logger = logging.getLogger(__name__)

# Read in this order when --api-key is not given (the first one set wins).
API_KEY_VARIABLES = ("PHI4FLASH_API_KEY", "OPENAI_API_KEY")


def build_parser(prog: str = "phi4flash demo") -> argparse.ArgumentParser:
    """The ``phi4flash demo`` options."""
    parser = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter,
                                     description="Serve the phi4flash web chat, on a model loaded here or on an "
                                                 "OpenAI-compatible server (--remote).")
    parser.add_argument("--model", default=None,
                        help="'embedded' (tiny built-in model), a Hugging Face id, or a checkpoint directory "
                             "(default: embedded); with --remote, the model id to ask the server for (default: the "
                             "first one the server lists)")
    parser.add_argument("--remote", metavar="URL", default=None,
                        help="use an OpenAI-compatible server at URL (its API root, e.g. http://127.0.0.1:8000/v1) "
                             "instead of loading the model here")
    parser.add_argument("--api-key", default=None,
                        help="the --remote server's API key (default: $PHI4FLASH_API_KEY, else $OPENAI_API_KEY, "
                             "else none)")
    parser.add_argument("--device", default="auto", help="cuda | mps | cpu | auto (cuda > mps > cpu)")
    parser.add_argument("--dtype", default="auto", help="bfloat16 | float16 | float32 | auto (bfloat16 on CUDA, "
                                                        "else float32)")
    parser.add_argument("--quantize", default=None,
                        help="weight-only quantization: int8, int4 or int4-g<32|64|128|256> "
                             "(default: none; int4 = int4-g128)")
    parser.add_argument("--compile", action="store_true",
                        help=COMPILE_HELP)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    parser.add_argument("--concurrency", type=int, default=2, help="generations running at once")
    parser.add_argument("--debug", action="store_true", help="debug logs, and tracebacks of load errors")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the ``phi4flash demo`` options.

    Args:
        argv: the arguments after ``demo``; None reads ``sys.argv``.

    Returns:
        The parsed options.
    """
    return build_parser().parse_args(argv)


def api_key(args: argparse.Namespace) -> str | None:
    """The --remote server's key: ``--api-key``, else the first of :data:`API_KEY_VARIABLES` that is set."""
    return args.api_key or next((os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v)), None)


def load_engine(args: argparse.Namespace) -> Any:
    """Load the engine the options ask for; return the exception instead of raising it.

    The web page then explains the failure, which is friendlier than a traceback in a terminal
    the user may not be watching. A remote server is asked for its models at once, so a wrong URL,
    a missing key or an unknown model shows there too, not on every message.
    """
    import phi4flash

    try:
        if args.remote:
            engine = phi4flash.RemoteEngine(args.remote, args.model, api_key=api_key(args))
            engine.check()
            return engine
        return phi4flash.load(args.model or "embedded", device=args.device, dtype=args.dtype,
                              quantize=args.quantize, compile=True if args.compile else "auto")
    except Exception as exc:  # shown on the page with hints on how to fix it
        logger.error("could not load %s: %s: %s%s", args.remote or args.model or "embedded", type(exc).__name__, exc,
                     "" if args.debug else " (--debug shows the traceback)")
        logger.debug("traceback", exc_info=exc)
        return exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``phi4flash demo``: load the model and serve the chat until interrupted.

    Args:
        argv: the arguments after ``demo``.

    Returns:
        The process exit status.
    """
    args = parse_args(argv)
    configure_logging(args.debug)
    from .app import CSS, build_demo

    engine = load_engine(args)
    demo = build_demo(engine, concurrency_limit=max(1, args.concurrency))
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS)
    return 0 if not isinstance(engine, BaseException) else 1
