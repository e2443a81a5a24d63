"""A log line every half minute during the slow one-off work of a first start (building the C++ kernels, waiting
for another process that builds them, compiling the decode step), which otherwise says one line and then nothing
for minutes: the user sees that the process is still at work, and for how long it has been."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

__all__ = ["HEARTBEAT_SECONDS", "heartbeat"]

HEARTBEAT_SECONDS = 30.0


@contextlib.contextmanager
def heartbeat(logger: logging.Logger, what: str, every: float | None = None) -> Iterator[None]:
    """Log ``still <what> (N s so far)`` at INFO on ``logger`` every ``every`` seconds (default
    :data:`HEARTBEAT_SECONDS`) until the block ends; nothing for a block that ends sooner."""
    period = HEARTBEAT_SECONDS if every is None else every
    done = threading.Event()
    started = time.perf_counter()

    def beat() -> None:
        while not done.wait(period):
            logger.info("still %s (%.0f s so far)", what, time.perf_counter() - started)

    thread = threading.Thread(target=beat, name="phi4flash-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
