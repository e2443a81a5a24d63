"""``phi4flash serve``: the OpenAI-compatible server on uvicorn, or scaled out on Ray Serve.

Examples::

    phi4flash serve --model embedded --port 8000
    phi4flash serve --model microsoft/Phi-4-mini-flash-reasoning --max-batch 16 --api-key "$KEY"
    phi4flash serve --model embedded --ray --replicas 2
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from ..cli import COMPILE_HELP, HelpFormatter
from ._defaults import DEFAULT_MAX_QUEUE, DEFAULT_MAX_TOKENS

logger = logging.getLogger(__name__)


def build_parser(prog: str = "phi4flash serve") -> argparse.ArgumentParser:
    """The ``serve`` argument parser (the lead's top-level CLI may reuse it as a sub-parser's parent)."""
    p = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter,
                                description="Serve the model over an OpenAI-compatible HTTP API. The model loads "
                                            "before the port opens, and a model that cannot load ends the command "
                                            "with its error (--load-in-background binds first instead).")
    p.add_argument("--model", default="embedded", help="'embedded', a Hugging Face hub id, or a checkpoint folder")
    p.add_argument("--model-name", default=None, help="id served in /v1/models (default: the engine's model_name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=os.environ.get("PHI4FLASH_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $PHI4FLASH_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together in one batch")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests in flight (running + waiting) before new ones get 429")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="completion budget when a request sets no max_tokens")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--quantize", default=None,
                        help="weight-only quantization: int8, int4 or int4-g<32|64|128|256> "
                             "(default: none; int4 = int4-g128)")
    p.add_argument("--compile", action="store_true",
                   help=COMPILE_HELP)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server and phi4flash log level (debug adds tracebacks to errors)")
    p.add_argument("--load-in-background", action="store_true",
                   help="bind the port first and load the model on a thread: /health and the API answer 503 "
                        "until it is ready (for probes); a failed load still ends the command")
    p.add_argument("--ray", action="store_true", help="run on Ray Serve (needs the 'ray' extra)")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, each with its own engine")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    p.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves per replica")
    return p


def load_engine(model: str, *, max_batch: int, device: str = "auto", dtype: str = "auto",
                quantize: str | None = None, compile: bool | str = "auto") -> Any:
    """Load an engine with ``phi4flash.load``, passing device and dtype only when they are not "auto".

    Args:
        model: "embedded", a hub id or a checkpoint folder.
        max_batch: Requests the engine decodes together.
        device: Device name or "auto".
        dtype: Dtype name or "auto".
        quantize: "int8", "int4", "int4-g<group size>" or None.
        compile: compile the decode step while loading (True/False), or "auto" (``PHI4FLASH_COMPILE``).

    Returns:
        The loaded engine.
    """
    import phi4flash  # noqa: PLC0415  (torch loads here, after argument parsing)

    kwargs: dict[str, Any] = {"max_batch": max_batch, "compile": compile}
    if device != "auto":
        kwargs["device"] = device
    if dtype != "auto":
        kwargs["dtype"] = dtype
    if quantize:
        kwargs["quantize"] = quantize
    return phi4flash.load(model, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``phi4flash serve`` with ``argv`` (the arguments after ``serve``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    if args.max_batch < 1 or args.max_queue < 1 or args.replicas < 1:
        parser.error("--max-batch, --max-queue and --replicas must be >= 1")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: the server is reachable from other machines%s", args.host,
                       "" if args.api_key else " and has no --api-key")
    busy = _cannot_listen(args.host, args.port) if _listens_here(args) else None
    if busy:  # before the model loads (minutes for the real one), not after
        print(f"phi4flash serve: cannot listen on {args.host}:{args.port}: {busy} "
              "(another server may be using it: stop it, or pick another --port)", file=sys.stderr)
        return 1
    if args.ray:
        if args.compile:  # the replicas load in processes of their own, which inherit this environment
            os.environ["PHI4FLASH_COMPILE"] = "1"
        try:
            from .ray_app import serve_with_ray  # noqa: PLC0415
        except ImportError as exc:
            parser.error(f"--ray needs Ray Serve: pip install 'phi4flash[ray]' ({exc})")
        return serve_with_ray(model=args.model, replicas=args.replicas, host=args.host, port=args.port,
                              api_key=args.api_key, model_name=args.model_name, max_batch=args.max_batch,
                              max_queue=args.max_queue, default_max_tokens=args.default_max_tokens,
                              device=args.device, dtype=args.dtype, quantize=args.quantize,
                              replica_cpus=args.replica_cpus,
                              replica_gpus=args.replica_gpus)
    try:
        import uvicorn  # noqa: PLC0415

        from .app import create_app  # noqa: PLC0415
    except ImportError as exc:
        parser.error(f"phi4flash serve needs the 'serve' extra: pip install 'phi4flash[serve]' ({exc})")

    loader = functools.partial(load_engine, args.model, max_batch=args.max_batch, device=args.device,
                               dtype=args.dtype, quantize=args.quantize, compile=True if args.compile else "auto")
    failures: list[BaseException] = []
    server: Any = None

    def load() -> Any:
        try:
            return loader()
        except Exception as exc:
            failures.append(exc)
            if server is not None:
                server.should_exit = True  # a server that can never answer should not stay up
            raise

    if not args.load_in_background:
        try:
            engine: Any = load()
        except Exception:  # reported below, like a failed background load
            engine = None
    if failures:
        return _load_failed(args, failures[0])
    app = create_app(load if args.load_in_background else engine, api_key=args.api_key, model_name=args.model_name,
                     max_queue=args.max_queue, default_max_tokens=args.default_max_tokens)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    server.run()
    return _load_failed(args, failures[0]) if failures else 0


def _listens_here(args: argparse.Namespace) -> bool:
    """Whether this command opens the HTTP port itself: always but with ``--ray`` joining a running cluster
    (``RAY_ADDRESS``), whose Serve proxy owns the port and may already serve on it."""
    return not (args.ray and os.environ.get("RAY_ADDRESS"))


def _cannot_listen(host: str, port: int) -> str | None:
    """Why a server could not bind ``host:port`` now (e.g. "Address already in use"), or None if it could.

    Binds each address ``host`` resolves to with SO_REUSEADDR, as uvicorn and Ray Serve do, so a port whose last
    connections linger in TIME_WAIT counts as free and only a socket still bound to it counts as busy.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"{host!r} is not an address of this machine ({exc.strerror})"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                return exc.strerror or str(exc)
    return None


def _load_failed(args: argparse.Namespace, exc: BaseException) -> int:
    """Say why the model did not load (the traceback only at --log-level debug); return the exit status."""
    logger.debug("loading %s failed", args.model, exc_info=exc)
    hint = "" if args.log_level == "debug" else "\n(--log-level debug shows the traceback)"
    print(f"phi4flash serve: cannot load the model {args.model!r}: {exc}{hint}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
