"""The `phi4flash` command: help, and a terminal chat that streams and prints a metrics line."""

from __future__ import annotations

import subprocess
import sys


def _run(args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phi4flash", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_help_lists_the_commands() -> None:
    result = _run(["--help"])
    assert result.returncode == 0
    for command in ("chat", "demo", "serve", "bench", "eval", "train"):
        assert f"  {command}" in result.stdout
    assert _run(["no-such-command"]).returncode == 2


def test_chat_streams_reasoning_answer_and_metrics() -> None:
    result = _run(["chat", "embedded", "--temperature", "0", "--max-new-tokens", "200"],
                  stdin="What is 25 + 17?\nAnd 3 + 4?\n")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "\033[2m" in out  # the reasoning, dimmed
    assert "\\boxed{" in out
    lines = [line for line in out.splitlines() if "TTFT" in line]
    assert len(lines) == 2 and "finish: stop" in lines[0] and "tok/s" in lines[0]
    assert "reused 0" in lines[0] and "reused 0" not in lines[1]  # the second turn continues the first
