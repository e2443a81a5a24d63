"""The `phi4flash` command: help for every option, version, unknown commands, and the terminal chat (streaming,
Ctrl-C during a reply and at the prompt, load errors)."""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from phi4flash import __version__, cli

QUESTION = "Solve 4x - 7 = 21"


def _run(args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phi4flash", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_help_version_and_unknown_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("chat", "demo", "serve", "bench", "eval", "train", "space"):
        assert f"  {command}  " in out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"phi4flash {__version__}"
    assert cli.main(["caht"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'caht'" in err and "did you mean 'chat'" in err and "  serve  " in err
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().err


def _options(parser: argparse.ArgumentParser) -> list[tuple[argparse.ArgumentParser, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _options(sub)
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            found.append((parser, action))
    return found


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_option_has_help_with_its_default(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Walks each sub-command's parser (and its sub-parsers), so options added later are covered too."""
    parser = cli.command_parser(name)
    assert parser.prog == f"phi4flash {name}"
    options = _options(parser)
    assert options
    for owner, action in options:
        label = f"{owner.prog} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and action.help.strip(), f"{label} has no help"
        shown = owner._get_formatter()._get_help_string(action) % {**vars(action), "prog": owner.prog}
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS:
            assert "default" in shown.lower(), f"{label} does not show its default ({action.default!r}): {shown!r}"
    # What a user sees: the help names the command as it is typed, and reads as plain text.
    with pytest.raises(SystemExit) as done:
        cli.main([name, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: phi4flash {name}") and "``" not in out and "python -m" not in out


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


class Chat:
    """`phi4flash chat` in a child process, driven like a user at a terminal: type, read, press Ctrl-C."""

    def __init__(self, *args: str) -> None:
        # SIGINT back to its default in the child, so that Python turns it into KeyboardInterrupt even when
        # the test runner itself was started with SIGINT ignored (a background job).
        self.proc = subprocess.Popen([sys.executable, "-m", "phi4flash", "chat", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=0,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self._out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while char := self.proc.stdout.read(1):
            self._out.append(char)

    @property
    def output(self) -> str:
        return "".join(self._out)

    def wait_for(self, predicate, since: int = 0, timeout: float = 120.0) -> str:  # noqa: ANN001
        """Wait until ``predicate`` holds for the output after offset ``since``; return that output."""
        deadline = time.monotonic() + timeout
        while not predicate(self.output[since:]):
            assert self.proc.poll() is None, self.output[-2000:]
            assert time.monotonic() < deadline, f"timed out; output so far: {self.output[-2000:]!r}"
            time.sleep(0.002)
        return self.output[since:]

    def ask(self, text: str) -> int:
        """Type ``text`` and Enter; return the output offset where the reply starts."""
        assert self.proc.stdin is not None
        since = len(self.output)
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return since

    def close(self) -> tuple[int, str]:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        code = self.proc.wait(60)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


def test_ctrl_c_during_a_reply_drops_that_exchange() -> None:
    """A stopped reply leaves the conversation as if it had not been asked: the next answer is a fresh chat's."""
    import phi4flash
    from phi4flash import GenerationConfig

    chat = Chat("--temperature", "0")
    try:
        chat.wait_for(lambda out: "> " in out)
        since = chat.ask(QUESTION)
        chat.wait_for(lambda out: "finish:" in out, since)
        for question in ("What is 487 + 356?", "What is 4873 + 3568?", "What is 48731 + 35689?"):
            since = chat.ask(question)
            chat.wait_for(lambda out: "\033[2m" in out and len(out) > 12, since)  # it is replying
            chat.proc.send_signal(signal.SIGINT)
            reply = chat.wait_for(lambda out: ("[stopped" in out or "finish:" in out) and out.endswith("> \033[0m"),
                                  since)
            if "[stopped" in reply:
                break  # else the reply ended before Ctrl-C arrived: try a longer one
        assert "[stopped" in reply, "every reply finished before Ctrl-C arrived"
        since = chat.ask(QUESTION)
        third = chat.wait_for(lambda out: "finish:" in out, since)
        code, err = chat.close()
    finally:
        if chat.proc.poll() is None:
            chat.proc.kill()
    assert code == 0 and "Traceback" not in err, err[-2000:]

    engine = phi4flash.load("embedded")
    greedy = GenerationConfig(temperature=0, max_new_tokens=4096)
    first = engine.generate([{"role": "user", "content": QUESTION}], greedy).answer.strip()
    fresh = engine.generate([{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first},
                             {"role": "user", "content": QUESTION}], greedy)
    assert fresh.answer.strip() and fresh.answer.strip() in third, (fresh.answer, third)
    assert fresh.reasoning.strip().splitlines()[0] in third


def test_ctrl_c_and_ctrl_d_at_the_prompt_quit_cleanly() -> None:
    for quit_key in ("ctrl-c", "ctrl-d"):
        chat = Chat()
        try:
            chat.wait_for(lambda out: "> " in out)
            if quit_key == "ctrl-c":
                chat.proc.send_signal(signal.SIGINT)
            code, err = chat.close()
        finally:
            if chat.proc.poll() is None:
                chat.proc.kill()
        assert code == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err, (quit_key, err)


def test_a_damaged_checkpoint_gives_the_clear_message_alone(tmp_path: Path) -> None:
    import shutil

    from phi4flash.weights import EMBEDDED_DIR

    shutil.copytree(EMBEDDED_DIR, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    result = _run(["chat", str(tmp_path / "ckpt")], stdin="hi\n")
    assert result.returncode == 1
    assert "damaged or incomplete" in result.stderr and str(weights) in result.stderr
    assert "Traceback" not in result.stderr and "--debug" in result.stderr
    debug = _run(["chat", str(tmp_path / "ckpt"), "--debug"], stdin="hi\n")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr


def test_bench_prints_both_models_the_ratios_and_the_spread() -> None:
    """A tiny run of `phi4flash bench`: every row and ratio is printed, with the spread of the repeated runs
    (the numbers themselves go to docs/benchmarks.md from full runs, not to tests)."""
    result = _run(["bench", "--hidden", "64", "--layers", "8", "--vocab", "256", "--window", "32",
                   "--lengths", "64,160", "--new-tokens", "3", "--chunk", "48", "--repeat", "2"])
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for name in ("phi4flash", "phi4flash (no prefill skip)", "transformers Phi3"):
        rows = [line for line in out.splitlines() if line.startswith(f"| {name} |")]
        assert [row.split(" | ")[1] for row in rows] == ["64", "160"], name
        assert all(re.search(r"\| \d+% / \d+% \|$", row) for row in rows), rows
    ratios = [line for line in out.splitlines() if line.startswith(("| 64 |", "| 160 |"))]
    assert len(ratios) == 2 and all(line.count("x |") == 5 for line in ratios)
    assert "ratio ours/baseline" in out and "prefill chunks of 48" in out and "best of 2 runs" in out


def test_bench_warns_when_the_runs_disagree() -> None:
    from phi4flash.bench import BenchResult, Measured, disagreement_warnings

    def run(ttft: float, decode: float) -> BenchResult:
        return BenchResult("phi4flash", 512, ttft, 512 / ttft, decode, 1)

    steady = {("phi4flash", 512): Measured([run(1.0, 20.0), run(1.05, 19.5), run(1.02, 20.4)])}
    assert disagreement_warnings(steady, 0.25, {"phi4flash": 0.5}) == []
    busy = {("phi4flash", 512): Measured([run(1.0, 20.0), run(3.1, 19.0), run(1.1, 20.0)])}
    warnings = disagreement_warnings(busy, 0.25, {"phi4flash": -0.2})
    assert any("prefill of phi4flash at 512 tokens varied by 210%" in w for w in warnings), warnings
    assert any("shrank as the context grew" in w for w in warnings), warnings
    assert busy[("phi4flash", 512)].best.ttft_s == 1.0 and busy[("phi4flash", 512)].best.decode_tok_s == 20.0
