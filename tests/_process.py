"""Child processes in tests: stop them the same way everywhere."""

from __future__ import annotations

import subprocess


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """Terminate ``proc`` (SIGTERM), kill it if it has not exited after ``timeout`` seconds; return its status."""
    proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
