"""Shared test set-up: seeded RNG, GPU tests skipped without CUDA, tests/ importable for helpers, and a check
that the suite leaves the checkout as it found it (tests write only to temporary folders)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
REPO = Path(__file__).resolve().parents[1]
# PHI4FLASH_COMPILE=1 in a developer's environment would make every engine of the suite compile its decode step
# (a minute each): the suite runs the eager step, and the compiled one where a test asks for it (compile=True, as
# tests/test_compiled.py does). Child processes inherit it.
os.environ.setdefault("PHI4FLASH_COMPILE", "0")
_CHECKOUT_BEFORE = pytest.StashKey[dict]()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


def pytest_configure(config: pytest.Config) -> None:
    # langchain-tests' standard suite times the model's constructor with pytest-benchmark: run it once, without
    # printing a statistics table into the suite's output (--benchmark-enable brings the table back).
    if hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def checkout_files() -> dict[str, str] | None:
    """A hash of every file git tracks or would add (ignored ones excluded); None outside a git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    files = {}
    for name in filter(None, listed.decode("utf-8", "surrogateescape").split("\0")):
        path = REPO / name
        files[name] = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "absent"
    return files


def pytest_sessionstart(session: pytest.Session) -> None:
    before = checkout_files()
    if before is not None:
        session.config.stash[_CHECKOUT_BEFORE] = before


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_CHECKOUT_BEFORE, None)
    after = checkout_files() if before is not None else None
    if before is None or after is None:
        return
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "the tests changed files of the checkout (tests must write only to temporary folders): "
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(message + ", ".join(changed), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
