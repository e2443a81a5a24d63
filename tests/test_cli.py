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


def test_bench_prints_both_models_and_the_ratios() -> None:
    """A tiny run of `phi4flash bench`: every row and ratio is printed (the numbers themselves go to
    docs/benchmarks.md from full runs, not to tests)."""
    result = _run(["bench", "--hidden", "64", "--layers", "8", "--vocab", "256", "--window", "32",
                   "--lengths", "64,160", "--new-tokens", "3", "--chunk", "48"])
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for name in ("phi4flash", "phi4flash (no prefill skip)", "transformers Phi3"):
        rows = [line for line in out.splitlines() if line.startswith(f"| {name} |")]
        assert [row.split(" | ")[1] for row in rows] == ["64", "160"], name
    ratios = [line for line in out.splitlines() if line.startswith(("| 64 |", "| 160 |"))]
    assert len(ratios) == 2 and all(line.count("x |") == 5 for line in ratios)
    assert "ratio ours/baseline" in out and "prefill chunks of 48" in out
