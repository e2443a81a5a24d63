"""phi4flash's optional C++ kernels for the CPU, compiled once on this machine.

The sources in ``phi4flash/csrc`` are built with PyTorch's own ``cpp_extension`` (g++ and ninja, tuned to this
CPU with ``-march=native``) the first time they are needed, or ahead of time by ``scripts/setup.sh``
(``python -m phi4flash.native``), and cached by PyTorch under ``~/.cache/torch_extensions``. When there is no
compiler, or ``PHI4FLASH_NATIVE=0`` is set, everything runs on the pure PyTorch path; one log line says which.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from types import ModuleType

from .heartbeat import heartbeat

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("bindings.cpp", "quant_cpu.cpp", "scan_cpu.cpp",
                                                                   "mamba_step_cpu.cpp", "attention_cpu.cpp",
                                                                   "layer_cpu.cpp")]


def build_name() -> str:
    """The extension's name: a digest of this CPU's model and flags (the build is tuned to it, so a cache shared
    between machines must tell them apart) and of the sources (two versions of phi4flash never share a build)."""
    digest = hashlib.sha1(_cpu_signature().encode())
    for source in sorted(Path(__file__).parent.joinpath("csrc").iterdir()):
        digest.update(source.name.encode() + source.read_bytes())
    return f"phi4flash_cpu_{digest.hexdigest()[:12]}"


def _cpu_signature() -> str:
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
    return text


def _put_ninja_on_path() -> None:
    # cpp_extension runs `ninja` from PATH; the ninja wheel's binary is not there when the venv is not activated.
    if shutil.which("ninja") is None:
        try:
            import ninja  # type: ignore[import-untyped]
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


_READY: bool | None = None


def ready() -> bool:
    """Whether the kernels are there, loading them on the first call; afterwards a plain read of a flag (no
    file access), so that torch.compile traces through callers without a graph break."""
    global _READY
    if _READY is None:
        _READY = load() is not None
    return _READY


def disabled() -> bool:
    """Whether the user turned the native kernels off (``PHI4FLASH_NATIVE=0``)."""
    return os.environ.get("PHI4FLASH_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


# PyTorch's build lock holds no process id and is waited for forever: a build killed while it held it (Ctrl-C on
# a first start) would hang every later start. A lock that no process holds open, at two looks half a second
# apart, is removed where /proc shows that (Linux); elsewhere, one older than this (a build takes a minute or two).
STALE_LOCK_SECONDS = 600


def _lock_is_held(lock: Path) -> bool | None:
    """Whether a process holds ``lock`` open (PyTorch keeps it open while it builds); None where /proc cannot
    tell."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = str(lock.resolve())
    for fds in proc.glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fds.iterdir()):
                return True
        except OSError:  # a process that ended meanwhile, or another user's
            continue
    return False


def wait_for_build_lock(build_dir: Path, poll_seconds: float = 0.5) -> None:
    """Wait while another process builds the kernels in ``build_dir`` (saying so once); remove a lock that an
    interrupted build left."""
    lock = build_dir / "lock"
    said = False
    unheld = 0  # looks in a row that found no holder: a build that finishes closes the lock, then deletes it
    with contextlib.ExitStack() as waiting:
        while True:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                return
            held = _lock_is_held(lock)
            unheld = unheld + 1 if held is False else 0
            if unheld >= 2 or (held is None and age > STALE_LOCK_SECONDS):
                logger.warning("removing %s, left by a build of phi4flash's kernels that was interrupted", lock)
                lock.unlink(missing_ok=True)
                return
            if not said and held is not False:
                logger.info("waiting for another process that builds phi4flash's kernels (%s)", lock)
                waiting.enter_context(heartbeat(logger, "waiting for another process that builds phi4flash's "
                                                        "kernels"))
                said = True
            time.sleep(poll_seconds)


def build_directory(name: str) -> Path:
    """The folder where PyTorch builds and caches the extension ``name`` (``~/.cache/torch_extensions/...``)."""
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(name, verbose=False))


def build_needed(build_dir: Path) -> bool:
    """Whether loading the kernels from ``build_dir`` compiles them first: nothing built there yet, a source newer
    than the library, or a build file written for another checkout's sources or another environment's PyTorch
    (ninja then rebuilds it all: about 2.5 minutes on 2 cores)."""
    try:
        built = (build_dir / f"{build_dir.name}.so").stat().st_mtime
        recipe = (build_dir / "build.ninja").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    import torch

    inputs = [*SOURCES, Path(torch.__file__).parent]
    return any(str(path) not in recipe for path in inputs) or any(s.stat().st_mtime > built for s in SOURCES)


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
        name = build_name()  # hashes every source: once
        build_dir = build_directory(name)
        wait_for_build_lock(build_dir)
        building = build_needed(build_dir)
        if building:
            logger.info("building phi4flash's C++ kernels for this CPU (once: about 2.5 minutes on 2 cores, then "
                        "cached in %s)", build_dir)
        with heartbeat(logger, "building phi4flash's C++ kernels") if building else contextlib.nullcontext():
            module = cpp_extension.load(
                name=name, sources=[str(s) for s in SOURCES],
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, a failed build: fall back, say why
        reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
        logger.info("phi4flash native CPU kernels unavailable (%s): pure PyTorch path; install g++ and ninja "
                    "(scripts/setup.sh does) for the fast path", reason)
        return None
    _register_fakes()
    logger.info("phi4flash native CPU kernels ready in %.1f s (%s)", time.perf_counter() - start, module.isa())
    return module


def _register_fakes() -> None:
    """Shapes of the operators' outputs, so that torch.compile can trace through them without running them."""
    import torch

    @torch.library.register_fake("phi4flash::int4_linear")
    def _(x, w, scales, zeros, group):  # noqa: ANN001, ANN202
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("phi4flash::int8_linear")
    def _(x, w, scales):  # noqa: ANN001, ANN202
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("phi4flash::bf16_linear")
    def _(x, w):  # noqa: ANN001, ANN202
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("phi4flash::dequantize")
    def _(w, scales, zeros, group, rows):  # noqa: ANN001, ANN202
        count = w.shape[0] if rows is None else rows.numel()
        return w.new_empty(count, w.shape[1] * (2 if zeros is not None else 1), dtype=torch.bfloat16)

    @torch.library.register_fake("phi4flash::dequantize_into")
    def _(w, scales, zeros, group, first_row, out):  # noqa: ANN001, ANN202
        return None

    @torch.library.register_fake("phi4flash::selective_scan")
    def _(u, delta, A, B, C, D, state):  # noqa: ANN001, ANN202
        return u.new_empty(u.shape), u.new_empty(u.shape[0], u.shape[2], A.shape[1])

    @torch.library.register_fake("phi4flash::selective_scan_backward")
    def _(u, delta, A, B, C, D, state, gy, g_last):  # noqa: ANN001, ANN202
        rows, width = u.shape[0], u.shape[2]
        return [torch.empty_like(u), torch.empty_like(u), torch.empty_like(A), torch.empty_like(B),
                torch.empty_like(C), A.new_empty(width), A.new_empty(rows, width, A.shape[1])]

    @torch.library.register_fake("phi4flash::diff_attention_decode")
    def _(q, k, v, key_valid, scale):  # noqa: ANN001, ANN202
        return q.new_empty(q.shape[0], 2, q.shape[1] // 2, 2 * q.shape[2])

    @torch.library.register_fake("phi4flash::diff_attention_step")
    def _(q, k, v, key_valid, scale, lam, subln_weight, lambda_init, eps):  # noqa: ANN001, ANN202
        return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])

    @torch.library.register_fake("phi4flash::conv_step")
    def _(x, weight, bias, state):  # noqa: ANN001, ANN202
        return x.new_empty(x.shape)

    @torch.library.register_fake("phi4flash::scan_step")
    def _(u, dt, dt_bias, A_log, B, C, D, z, state, emits_memory):  # noqa: ANN001, ANN202
        return [u.new_empty(u.shape), u.new_empty(u.shape if emits_memory else (0,))]


def main() -> int:
    """``python -m phi4flash.native``: build (or find) the kernels now and say which path runs."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return 0 if load() is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
