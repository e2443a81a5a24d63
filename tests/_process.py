"""Child processes in tests: stop them the same way everywhere, and give their servers a port."""

from __future__ import annotations

import random
import socket
import subprocess
from pathlib import Path

# Ray's workers take ports from 10002-19999 by default; the kernel hands out ephemeral ports from its own range.
_FIRST_PORT = 20000


def _first_ephemeral_port() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A loopback port that is free now and that no other process is likely to take before the server binds it.

    A port from ``bind(("127.0.0.1", 0))`` comes from the kernel's ephemeral range, which every outgoing connection
    and every ``bind(0)`` draws from too: a server started a few seconds later (Ray Serve's proxy, after Ray has
    started a dozen processes) can find it taken. So the port is drawn from below that range and above Ray's.
    """
    low = _first_ephemeral_port()
    candidates = list(range(_FIRST_PORT, low)) if low > _FIRST_PORT + 100 else []
    random.SystemRandom().shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # an unusual port range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """Terminate ``proc`` (SIGTERM), kill it if it has not exited after ``timeout`` seconds; return its status."""
    proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
