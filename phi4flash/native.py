"""phi4flash's optional C++ kernels for the CPU, compiled once on this machine.

The sources in ``phi4flash/csrc`` are built with PyTorch's own ``cpp_extension`` (g++ and ninja, tuned to this
CPU with ``-march=native``) the first time they are needed, or ahead of time by ``scripts/setup.sh``
(``python -m phi4flash.native``), and cached by PyTorch under ``~/.cache/torch_extensions``. When there is no
compiler, or ``PHI4FLASH_NATIVE=0`` is set, everything runs on the pure PyTorch path; one log line says which.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / "quant_cpu.cpp"]


def _cpu_signature() -> str:
    """Model and flags of this CPU: the build is tuned to it, so a cache shared between machines differs."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    text += line
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _put_ninja_on_path() -> None:
    # cpp_extension runs `ninja` from PATH; the ninja wheel's binary is not there when the venv is not activated.
    if shutil.which("ninja") is None:
        try:
            import ninja  # type: ignore[import-untyped]
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def disabled() -> bool:
    """Whether the user turned the native kernels off (``PHI4FLASH_NATIVE=0``)."""
    return os.environ.get("PHI4FLASH_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels, building them on first use; None (with one log line why) when they cannot be."""
    if disabled():
        logger.info("phi4flash native CPU kernels off (PHI4FLASH_NATIVE=0): pure PyTorch path")
        return None
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        start = time.perf_counter()
        module = cpp_extension.load(
            name=f"phi4flash_cpu_{_cpu_signature()}", sources=[str(s) for s in SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, a failed build: fall back, say why
        reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
        logger.info("phi4flash native CPU kernels unavailable (%s): pure PyTorch path; install g++ and ninja "
                    "(scripts/setup.sh does) for the fast path", reason)
        return None
    logger.info("phi4flash native CPU kernels ready in %.1f s (%s)", time.perf_counter() - start, module.isa())
    return module


def main() -> int:
    """``python -m phi4flash.native``: build (or find) the kernels now and say which path runs."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return 0 if load() is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
