"""The GPU check's CPU-reachable parts: flags, the table, the builders, every section at tiny sizes, the script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_models  # noqa: E402

# Split so that this file, which writes GPU tests for the check to run, is not taken for one itself.
GPU_MARK = "@pytest.mark." + "gpu"


def _write_gpu_tests(folder: Path, *, failing: bool = True) -> Path:
    """A small suite of gpu-marked tests: one passes, one is skipped, one fails, three files cannot be imported."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test_kernels.py").write_text(textwrap.dedent(f"""\
        import pytest

        {GPU_MARK}
        def test_passes():
            assert 1 + 1 == 2

        {GPU_MARK}
        def test_is_skipped():
            pytest.skip("needs the real checkpoint")

        def test_unmarked_is_not_run():
            assert False
        """))
    if failing:
        (folder / "test_parity.py").write_text(f"import pytest\n\n{GPU_MARK}\ndef test_bound():\n"
                                               "    assert 0.2 < 0.1\n")
        (folder / "test_extra.py").write_text(f"import not_installed_extra  # {GPU_MARK}\n")
        (folder / "test_old_extra.py").write_text(  # as phi4flash.hf refuses an older transformers: the traceback
            # shows the raising line's f-string, then the message with the version in it
            f"found = '5.17.0'  # {GPU_MARK}\n"
            "raise ImportError(f'phi4flash.hf needs transformers>=5.24 (found {found}): pip install')\n")
        (folder / "test_broken.py").write_text(f"raise RuntimeError('broken at import')  # {GPU_MARK}\n")
    return folder


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[gpu_check.Row]]:
    code = gpu_check.main(argv)
    out = capsys.readouterr().out
    rows = [gpu_check.Row(*[c.strip() for c in line.strip("|").split(" | ")])
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| section ")]
    return code, out, rows


@pytest.fixture(autouse=True)
def _no_out_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    # $OUT is where the device tool collects files; the tests write only to their temporary folders.
    monkeypatch.delenv("OUT", raising=False)


# -- flags ------------------------------------------------------------------------------------------------------


def test_real_sizes_are_the_default() -> None:
    args = gpu_check.parse_args([])
    assert (args.device, args.dtype, args.tiny) == ("cuda", "bfloat16", False)
    assert args.prefill_lengths == [2048, 8192, 32768] and args.decode_batches == [1, 16, 64]
    assert (args.paper_prompt, args.paper_new_tokens, args.paper_batch) == (2048, 2048, 16)
    assert args.sections == list(gpu_check.SECTIONS) and args.quantize == ["int8", "int4"]
    assert args.output is None and args.baseline_compile == "auto"


def test_dry_run_is_tiny_on_cpu_and_flags_win(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    args = gpu_check.parse_args(["--dry-run", "--paper-new-tokens", "5", "--quantize", "none",
                                 "--sections", "tests,paper", "--decode-batches", "3,5"])
    assert (args.device, args.tiny) == ("cpu", True)
    assert args.prefill_lengths == gpu_check.TINY_SIZES["prefill_lengths"]
    assert (args.paper_new_tokens, args.decode_batches, args.quantize) == (5, [3, 5], [])
    assert args.sections == ["tests", "paper"]
    assert args.output == str(tmp_path / "gpu_check.md")  # the device tool collects $OUT


@pytest.mark.parametrize(("argv", "message"), [
    (["--prefill-lengths", "2k"], "comma-separated whole numbers"),
    (["--decode-batches", "0,16"], "positive whole numbers"),
    (["--sections", "tests,benchmark"], "unknown section(s) benchmark"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--baseline-compile", "max"], "invalid choice"),
])
def test_bad_flags_are_refused_with_the_reason(argv: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# -- the table --------------------------------------------------------------------------------------------------


def test_table_has_one_line_per_row_whatever_the_status() -> None:
    rows = [gpu_check.Row("prefill", "phi4flash, 2048 tokens", "ok", "12,345 tok/s", "best of 2 (spread 1.01x)"),
            gpu_check.Row("paper", "section", "failed", "", "RuntimeError: a | b\nsecond line"),
            gpu_check.Row("quantized", "int4: load", "skipped", "", "refused: no CUDA kernel")]
    lines = gpu_check.format_table(rows).splitlines()
    assert lines[:2] == ["| section | what | status | result | detail |", "|---|---|---|---|---|"]
    assert lines[2] == "| prefill | phi4flash, 2048 tokens | ok | 12,345 tok/s | best of 2 (spread 1.01x) |"
    assert lines[3] == "| paper | section | failed |  | RuntimeError: a \\| b second line |"  # still 5 cells
    assert lines[4] == "| quantized | int4: load | skipped |  | refused: no CUDA kernel |"
    assert len(lines) == 5


def test_rates_and_spreads_read_well() -> None:
    assert (gpu_check.rate(12345.6), gpu_check.rate(42.25)) == ("12,346", "42.2")
    assert gpu_check.best_of([100.0, 80.0]) == (100.0, "best of 2 (spread 1.25x)")
    assert (gpu_models.millions(3_836_021_760), gpu_models.millions(2_240_000)) == ("3,836M", "2.24M")


# -- the builders -----------------------------------------------------------------------------------------------


def test_phi3_baseline_at_phi4_mini_reasonings_shape() -> None:
    # Built on the meta device: the real shape without 7.7 GB of memory. 3.84B parameters, like the model.
    model = gpu_models.build_phi3(gpu_models.PHI4_MINI_REASONING, "meta", torch.bfloat16)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (3072, 32, 24, 8, 8192, 200064)
    assert config._attn_implementation == "sdpa" and config.tie_word_embeddings
    per_layer = 3072 * (3072 + 2 * 1024) + 3072 * 3072 + 3072 * 2 * 8192 + 8192 * 3072 + 2 * 3072
    assert gpu_models.parameter_count(model) == 200064 * 3072 + 32 * per_layer + 3072 == 3_836_021_760
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_phi3_baseline_tiny_generates_with_its_static_cache() -> None:
    model = gpu_models.build_phi3(gpu_models.TINY_BASELINE, "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and torch.get_default_dtype() == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prompt = gpu_models.random_ids((2, 12), gpu_models.TINY_BASELINE.vocab, torch.device("cpu"))
    assert gpu_models.phi3_generate_seconds(model, prompt, 6, compile_mode="off") > 0  # checks 6 tokens per row
    assert gpu_models.phi3_generate_seconds(model, prompt, 6, stop_after=2) > 0  # stopped early, checked too


def test_phi4flash_builder_real_config_and_tiny() -> None:
    real = gpu_models.build_phi4flash(gpu_models.ours_config(tiny=False), "meta", torch.bfloat16)
    assert gpu_models.parameter_count(real) == 3_852_562_944  # the checkpoint's count (docs/benchmarks.md)
    tiny = [gpu_models.build_phi4flash(gpu_models.ours_config(tiny=True), "cpu", torch.bfloat16) for _ in range(2)]
    model = tiny[0]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n.endswith("A_log"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), tiny[1].parameters(), strict=True))
    kinds = set(model.config.layer_kinds)
    assert len(kinds) >= 5, kinds  # every layer role, so the tiny run goes through each
    prompt = gpu_models.random_ids((2, 40), model.config.vocab_size, torch.device("cpu"))
    cache = model.new_cache(2, 48)
    token = gpu_models.ours_decode(model, gpu_models.ours_prefill(model, prompt, cache, chunk=16), cache, 3)
    assert token.shape == (2,) and cache.lengths.tolist() == [43, 43]
    assert gpu_models.ours_generate_seconds(model, prompt, 4, chunk=16) > 0


# -- the sections -----------------------------------------------------------------------------------------------


def test_dry_run_runs_every_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tests = _write_gpu_tests(tmp_path / "gpu_tests", failing=False)
    output = tmp_path / "out" / "gpu_check.md"
    code, out, rows = _run(["--dry-run", "--tests-dir", str(tests), "--output", str(output)], capsys)
    assert code == 0, out
    assert {r.section for r in rows} == set(gpu_check.SECTIONS)
    compiled = ("compiled", "phi4flash, the decode step's CUDA graphs")
    assert [r for r in rows if r.status != "ok" and (r.section, r.item) != compiled] == []
    by_item = {(r.section, r.item): r for r in rows}
    assert by_item[compiled].status == "skipped" and "CUDA only" in by_item[compiled].detail  # a dry run is on CPU
    assert by_item[("tests", "pytest -m gpu (1 file)")].result == "1 passed, 0 failed, 1 skipped"
    for length in gpu_check.TINY_SIZES["prefill_lengths"]:
        assert by_item[("prefill", f"phi4flash, {length} tokens, batch 1")].result.endswith(" tok/s")
    for batch in gpu_check.TINY_SIZES["decode_batches"]:
        assert by_item[("decode", f"phi4flash, batch {batch}")].result.endswith(" tok/s")
        assert by_item[("quantized", f"int4 decode, batch {batch}")].result.endswith(" tok/s")
    paper = [r for r in rows if r.section == "paper"]
    assert [r.item.split(":")[0] for r in paper] == ["phi4flash", "transformers Phi3 (static cache, SDPA)",
                                                     "phi4flash / Phi3"]
    assert paper[2].result.endswith("x")
    assert output.read_text().count("\n| ") == len(rows) + 1  # the same table, written for the device tool
    assert len(json.loads(output.with_suffix(".json").read_text())) == len(rows)
    assert "section paper" in output.with_suffix(".log").read_text()


def test_test_counts_name_failures_skips_and_missing_modules(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    tests = _write_gpu_tests(tmp_path / "gpu_tests")
    code, _, rows = _run(["--dry-run", "--sections", "tests", "--tests-dir", str(tests)], capsys)
    assert code == 1
    (row,) = rows
    assert (row.item, row.status) == ("pytest -m gpu (5 files)", "failed")
    assert row.result == "1 passed, 2 failed, 1 skipped, 2 files not collected"
    assert "test_parity.test_bound" in row.detail and "test_broken" in row.detail
    assert "1 skipped: needs the real checkpoint" in row.detail
    assert "missing module not_installed_extra" in row.detail
    assert "test_old_extra (needs transformers>=5.24, found 5.17.0)" in row.detail


def test_the_projects_gpu_tests_are_found() -> None:
    found = {p.name for p in gpu_check.gpu_test_files(ROOT / "tests")}
    assert {"test_model.py", "test_cache.py", "test_quant.py"} <= found
    assert "test_gpu_check.py" not in found


def test_a_failing_section_becomes_a_row_and_the_rest_still_runs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, rows = _run(["--dry-run", "--sections", "quantized,prefill", "--quantize", "int3,int8",
                            "--prefill-lengths", "32", "--decode-batches", "1"], capsys)
    assert code == 1
    statuses = {(r.section, r.item): r.status for r in rows}
    assert statuses[("quantized", "int3: load")] == "failed"
    assert "unknown quantization 'int3'" in next(r.detail for r in rows if r.item == "int3: load")
    assert statuses[("quantized", "int8 decode, batch 1")] == "ok"
    assert statuses[("prefill", "phi4flash, 32 tokens, batch 1")] == "ok"


def test_no_time_left_skips_sections_instead_of_starting_them(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, rows = _run(["--dry-run", "--budget", "0", "--sections", "environment,prefill,paper"], capsys)
    assert code == 0
    assert [(r.section, r.status) for r in rows if r.section != "environment"] == [
        ("prefill", "skipped"), ("paper", "skipped")]
    assert all(r.detail == "no time left in the budget" for r in rows if r.section != "environment")


def test_the_gpu_sections_say_so_when_there_is_no_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, rows = _run(["--device", "cuda", "--sections", "environment,decode"], capsys)
    assert code == 1
    assert ("GPU", "failed", "no CUDA device") in [(r.item, r.status, r.result) for r in rows]
    assert ("decode", "skipped", "no CUDA device") in [(r.section, r.status, r.detail) for r in rows]


def test_sigterm_stops_the_check_and_the_table_is_still_printed(tmp_path: Path) -> None:
    # What the shell's `timeout` does at the hard limit: the section in flight is stopped, the rest not started.
    # 2 rounds of 30,000 steps fit the context (131,072) and last minutes: the signal lands inside decode.
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--sections",
               "environment,decode,paper", "--decode-steps", "30000", "--decode-batches", "1"]
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        if "section decode" in line or time.monotonic() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "| decode | section | failed |  | stopped: the shell's time limit ran out |" in out
    assert "| paper | section | skipped |  | not started: out of time |" in out
    assert "| environment | python / torch | ok |" in out


# -- the shell script -------------------------------------------------------------------------------------------


def test_shell_script_parses() -> None:
    result = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shell_script_reports_what_it_could_not_install(tmp_path: Path) -> None:
    # llguidance present but unimportable (shadowed), no wheels: the table's environment rows say so, and
    # the sections that need phi4flash fail with the import error instead of the script dying.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "llguidance.py").write_text("raise ImportError('llguidance blocked by the test')\n")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(shadow), "PHI4FLASH_WHEELS": str(tmp_path),
           "PIP_NO_INDEX": "1", "OUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--sections",
                             "environment,prefill", "--prefill-lengths", "32"], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| environment | llguidance" in result.stdout  # printed, and written for the device tool
    line = next(line for line in table.splitlines() if line.startswith("| environment | llguidance"))
    assert "| failed | missing | needed by phi4flash;" in line
    assert "| prefill | section | failed |  | ImportError: llguidance blocked by the test |" in table
