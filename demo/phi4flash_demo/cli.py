"""``phi4flash demo``: load a model (or connect to a server) and serve the web chat."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the ``phi4flash demo`` options.

    Args:
        argv: the arguments after ``demo``; None reads ``sys.argv``.

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(prog="phi4flash demo", description="Serve the phi4flash web chat.")
    parser.add_argument("--model", default="embedded",
                        help="'embedded' (tiny built-in model), a Hugging Face id, or a checkpoint directory; "
                             "with --remote, the model name the server expects (default: embedded)")
    parser.add_argument("--remote", metavar="URL", default=None,
                        help="use an OpenAI-compatible server at URL instead of loading the model here")
    parser.add_argument("--device", default="auto", help="cuda | mps | cpu | auto (default: auto)")
    parser.add_argument("--dtype", default="auto", help="bfloat16 | float16 | float32 | auto (default: auto)")
    parser.add_argument("--quantize", default=None,
                        help="weight-only quantization: int8, int4 or int4-g<32|64|128|256> "
                             "(default: none; int4 = int4-g128)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    parser.add_argument("--concurrency", type=int, default=2, help="generations running at once (default: 2)")
    return parser.parse_args(argv)


def load_engine(args: argparse.Namespace) -> Any:
    """Load the engine the options ask for; return the exception instead of raising it.

    The web page then explains the failure, which is friendlier than a traceback in a terminal
    the user may not be watching.
    """
    import phi4flash

    try:
        if args.remote:
            return phi4flash.RemoteEngine(args.remote, args.model)
        return phi4flash.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    except Exception as exc:  # shown on the page with hints on how to fix it
        logger.exception("could not load %s", args.remote or args.model)
        return exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``phi4flash demo``: load the model and serve the chat until interrupted.

    Args:
        argv: the arguments after ``demo``.

    Returns:
        The process exit status.
    """
    args = parse_args(argv)
    from .app import CSS, build_demo

    engine = load_engine(args)
    demo = build_demo(engine, concurrency_limit=max(1, args.concurrency))
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS)
    return 0 if not isinstance(engine, BaseException) else 1
