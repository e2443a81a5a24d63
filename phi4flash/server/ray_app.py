"""The OpenAI-compatible app as a Ray Serve deployment: N replicas, each with its own engine.

Two ways to run it::

    phi4flash serve --model embedded --ray --replicas 2 --port 8000
    serve run phi4flash.server.ray_app:app                  # configured by PHI4FLASH_* environment variables
    serve run phi4flash.server.ray_app:build_app model=embedded replicas=2 max_batch=16

Ray Serve's proxy spreads requests over the replicas; inside a replica the engine batches them. Each
replica answers ``/metrics`` for itself (Ray's own metrics export covers the whole application).

This module imports Ray; nothing else in phi4flash does (the ``ray`` extra).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from ._defaults import DEFAULT_MAX_QUEUE, DEFAULT_MAX_TOKENS
from .app import create_app
from .cli import load_engine

logger = logging.getLogger(__name__)


@serve.ingress()
class Phi4FlashServer:
    """One replica: loads the engine in its constructor (Serve marks it ready after that), then serves the app."""

    def __init__(self, model: str = "embedded", *, max_batch: int = 16, max_queue: int = DEFAULT_MAX_QUEUE,
                 api_key: str | None = None, model_name: str | None = None,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, device: str = "auto", dtype: str = "auto",
                 quantize: str | None = None) -> None:
        self.engine = load_engine(model, max_batch=max_batch, device=device, dtype=dtype, quantize=quantize)
        self._app_kwargs = {"api_key": api_key, "model_name": model_name, "max_queue": max_queue,
                            "default_max_tokens": default_max_tokens}

    def __serve_build_asgi_app__(self) -> Any:
        """Called by Serve after ``__init__``: the same FastAPI app as ``phi4flash serve``."""
        return create_app(self.engine, **self._app_kwargs)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Bind the deployment (also the ``serve run phi4flash.server.ray_app:build_app key=value ...`` builder).

    Args:
        args: Optional settings: ``model`` ("embedded"), ``replicas`` (1), ``max_batch`` (16), ``max_queue``,
            ``api_key``, ``model_name``, ``default_max_tokens``, ``device``, ``dtype``, ``quantize``,
            ``replica_cpus`` (1), ``replica_gpus`` (0). Values may be strings, as ``serve run`` passes them.

    Returns:
        The bound Ray Serve application.
    """
    a = dict(args or {})
    replicas = int(a.pop("replicas", 1))
    cpus = float(a.pop("replica_cpus", 1))
    gpus = float(a.pop("replica_gpus", 0))
    max_batch = int(a.pop("max_batch", 16))
    max_queue = int(a.pop("max_queue", DEFAULT_MAX_QUEUE))
    default_max_tokens = int(a.pop("default_max_tokens", DEFAULT_MAX_TOKENS))
    model = str(a.pop("model", "embedded"))
    kwargs = {k: a.pop(k) for k in ("api_key", "model_name", "device", "dtype", "quantize") if a.get(k) is not None}
    if a:
        raise ValueError(f"unknown settings for the phi4flash Ray app: {sorted(a)}")
    deployment = serve.deployment(
        Phi4FlashServer,
        name="phi4flash",
        num_replicas=replicas,
        # Serve's router must let through as many requests as the app admits, or it queues them itself
        # and the engine never sees a full batch.
        max_ongoing_requests=max_queue,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
    )
    return deployment.bind(model, max_batch=max_batch, max_queue=max_queue,
                           default_max_tokens=default_max_tokens, **kwargs)


def _env_args() -> dict[str, Any]:
    names = ("model", "replicas", "max_batch", "max_queue", "api_key", "model_name", "default_max_tokens", "device",
             "dtype", "quantize", "replica_cpus", "replica_gpus")
    return {n: os.environ[f"PHI4FLASH_{n.upper()}"] for n in names if os.environ.get(f"PHI4FLASH_{n.upper()}")}


# `serve run phi4flash.server.ray_app:app`: settings from PHI4FLASH_MODEL, PHI4FLASH_REPLICAS, ... (binding is
# cheap: nothing loads until Serve starts the replicas).
app = build_app(_env_args())


def serve_with_ray(*, model: str, replicas: int, host: str = "127.0.0.1", port: int = 8000,
                   api_key: str | None = None, model_name: str | None = None, max_batch: int = 16,
                   max_queue: int = DEFAULT_MAX_QUEUE, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                   device: str = "auto", dtype: str = "auto", quantize: str | None = None,
                   replica_cpus: float = 1.0, replica_gpus: float = 0.0) -> int:
    """Start (or join, with ``RAY_ADDRESS``) a Ray cluster, deploy the app on ``host:port`` and block until Ctrl-C.

    Returns:
        The exit code.
    """
    import ray  # noqa: PLC0415

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            # A private single-machine cluster that listens on loopback only.
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
    settings: dict[str, Any] = {"model": model, "replicas": replicas, "max_batch": max_batch, "max_queue": max_queue,
                                "default_max_tokens": default_max_tokens, "device": device, "dtype": dtype,
                                "replica_cpus": replica_cpus, "replica_gpus": replica_gpus}
    if api_key:
        settings["api_key"] = api_key
    if quantize:
        settings["quantize"] = quantize
    if model_name:
        settings["model_name"] = model_name
    # Serve and the local Ray go whatever ends this: Ctrl-C, SIGTERM (service managers, `kill`), a port Ray Serve
    # cannot bind, a deployment that fails.
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(settings), name="phi4flash", route_prefix="/")
        logger.info("phi4flash on Ray Serve: http://%s:%d/v1 with %d replica(s)", host, port, replicas)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
