"""Every ```python block of README.md and docs/*.md runs as written on a CPU machine with the embedded model.

Each block runs alone in a fresh interpreter, in a temporary working directory, with CUDA hidden and the
Hugging Face hub offline. A block that cannot run as written (it needs the real model's download, a GPU, or
serves until stopped) carries ``<!-- snippet: skip (reason) -->`` on the line above its fence; it is
reported as skipped with that reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*snippet:\s*skip\s*\((?P<reason>.+)\)\s*-->")
FENCE = re.compile(r"^```python\s*$")


@dataclass(frozen=True)
class Snippet:
    """One fenced block: where it is, its code, and the skip reason written above it (if any)."""

    path: Path
    line: int
    code: str
    skip: str | None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def snippets(path: Path) -> list[Snippet]:
    """The ```python blocks of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    i = 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            assert end is not None, f"{path.name}:{i + 1}: the ```python block is never closed"
            above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = SKIP.fullmatch(above)
            found.append(Snippet(path, i + 1, "\n".join(lines[i + 1:end]) + "\n",
                                 marker.group("reason") if marker else None))
            i = end
        i += 1
    return found


ALL = [snippet for path in DOCS for snippet in snippets(path)]


def run_snippet(snippet: Snippet, workdir: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the block as a script in ``workdir``, as a user on a CPU machine without network would."""
    script = workdir / "snippet.py"
    script.write_text(snippet.code, encoding="utf-8")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, str(script)], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_docs_have_snippets_and_skips_say_why() -> None:
    assert len(ALL) >= 8
    for snippet in ALL:
        assert snippet.skip is None or snippet.skip.strip(), snippet.name


@pytest.mark.parametrize("snippet", ALL, ids=[s.name for s in ALL])
def test_snippet_runs_as_written(snippet: Snippet, tmp_path: Path) -> None:
    if snippet.skip:
        pytest.skip(f"{snippet.name}: {snippet.skip}")
    result = run_snippet(snippet, tmp_path)
    assert result.returncode == 0, f"{snippet.name} failed:\n{snippet.code}\n--- stderr ---\n{result.stderr[-4000:]}"


def test_the_stream_snippet_prints_reasoning_and_answer_apart(tmp_path: Path) -> None:
    streaming = [s for s in snippets(ROOT / "README.md") if "engine.stream(" in s.code]
    assert len(streaming) == 1
    out = run_snippet(streaming[0], tmp_path).stdout
    reasoning, _, answer = out.partition("[answer]")
    assert "[reasoning]" in reasoning and reasoning.split("[reasoning]")[1].strip(), out
    assert "\\boxed{5}" in answer and "\\boxed" not in reasoning, out
    assert re.search(r"^TTFT \d+ ms, decode \d+ tok/s, finish: stop$", answer, re.M), out
