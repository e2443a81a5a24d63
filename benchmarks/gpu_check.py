"""One prepared GPU check: the ``gpu``-marked tests and a real-size bfloat16 benchmark, in one table.

    bash scripts/gpu_check.sh                  # on a machine with an NVIDIA GPU: under 8 minutes on an H200
    python benchmarks/gpu_check.py --tiny      # every section at tiny sizes (on CUDA when there is one)
    python benchmarks/gpu_check.py --dry-run   # the same on CPU, in seconds (what CI runs)

Sections, in this order, each guarded: an exception becomes a failed row naming it, a measurement the
time budget cannot fit a skipped row, and the table is printed whatever happens.

- environment: torch and the GPU, transformers, the optional CUDA kernels, and what
  scripts/gpu_check.sh could not install;
- tests: ``pytest -m gpu`` (CUDA kernels against the pure path, bfloat16 parity with float32 within the
  bounds the tests document): passed / failed / skipped counts;
- prefill: phi4flash at the real size (tests/data/checkpoint/config.json, random weights, bfloat16),
  tokens/s of one prompt of 2K, 8K and 32K tokens in the engine's chunks;
- decode: tokens/s of all rows together, greedy eager one-token steps at batch 1, 16 and 64 after a 2K prompt;
- paper: the paper's setting, a 2K prompt and a long generation, aggregate generated tokens/s of a batch
  (prefill included), phi4flash against transformers' Phi3ForCausalLM at Phi-4-mini-reasoning's real
  shape (random weights, bfloat16) driven by its own ``generate()`` with its static cache and SDPA; the
  two run in turns, and the generation is shortened (and says so) when the time left cannot fit it;
- quantized: int8 / int4 weight-only decode, or the refusal where PyTorch lacks the CUDA kernels;
- compiled: the decode step as CUDA graphs (``compile=True`` on CUDA): the time to capture them, then the
  decode's rows.

Speeds are the best of ``--rounds`` rounds with the spread (slowest / fastest) beside them. The table is
also written to ``--output`` (default $OUT/gpu_check.md when OUT is set), the rows to a .json beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from gpu_models import (
    PHI4_MINI_REASONING,
    TINY_BASELINE,
    build_phi3,
    build_phi4flash,
    millions,
    ours_config,
    ours_decode,
    ours_generate_seconds,
    ours_prefill,
    parameter_count,
    phi3_generate_seconds,
    random_ids,
    timed,
)

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "tests", "prefill", "decode", "paper", "quantized", "compiled")
STATUSES = ("ok", "failed", "skipped")
QUANTIZED_RESERVE = 100  # seconds the paper's setting leaves for the quantized section (real size)
GRAPH_SECONDS = 30  # the compiled section's capture of the decode step's CUDA graphs at the real size

# Sizes per mode; a flag given on the command line wins over both.
REAL_SIZES = {"prefill_lengths": [2048, 8192, 32768], "decode_batches": [1, 16, 64], "decode_context": 2048,
              "decode_steps": 32, "paper_prompt": 2048, "paper_new_tokens": 2048, "paper_batch": 16, "rounds": 2}
TINY_SIZES = {"prefill_lengths": [64, 128, 256], "decode_batches": [1, 2, 4], "decode_context": 32,
              "decode_steps": 4, "paper_prompt": 32, "paper_new_tokens": 8, "paper_batch": 2, "rounds": 2}


@dataclass
class Row:
    """One line of the table."""

    section: str
    item: str
    status: str  # one of STATUSES
    result: str = ""
    detail: str = ""


class SkipMeasurement(Exception):
    """A measurement that is not run (no time left for it, nothing to run on): a skipped row."""


class OutOfTime(BaseException):
    """SIGTERM from the shell's hard time limit: stop measuring and print what there is.

    A BaseException so that no ``except Exception`` on the way (ours or a library's) swallows it.
    """


def format_table(rows: Sequence[Row]) -> str:
    """The rows as one markdown table (``|`` in a cell escaped, newlines folded)."""

    def cell(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    lines = ["| section | what | status | result | detail |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell(v) for v in (r.section, r.item, r.status, r.result, r.detail)) + " |"
              for r in rows]
    return "\n".join(lines)


class Budget:
    """Seconds left until the deadline; a measurement that would not fit is skipped, not started."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + seconds

    def left(self) -> float:
        """Seconds to the deadline (negative once past it)."""
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the check started."""
        return time.monotonic() - self.start

    def need(self, seconds: float, what: str) -> None:
        """Raise :class:`SkipMeasurement` unless ``seconds`` are left for ``what``."""
        if self.left() < seconds:
            raise SkipMeasurement(f"{what} needs about {seconds:.0f} s; {max(0.0, self.left()):.0f} s of the "
                                  "budget left")


@dataclass
class Check:
    """Everything a section needs: the plan, the device, the budget, the log, the models built so far."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    budget: Budget
    log_file: Path | None = None
    models: dict[str, Any] = field(default_factory=dict)

    def log(self, message: str) -> None:
        """A progress line on stderr (and in the log file)."""
        line = f"[gpu_check {self.budget.elapsed():6.1f} s] {message}"
        print(line, file=sys.stderr, flush=True)
        if self.log_file is not None:
            with self.log_file.open("a") as f:
                f.write(line + "\n")

    def measure(self, rows: list[Row], section: str, item: str, fn: Callable[[], tuple[str, str]]) -> bool:
        """Run one measurement ``fn() -> (result, detail)`` into a row: ok, failed (the exception) or skipped."""
        try:
            result, detail = fn()
        except SkipMeasurement as why:
            rows.append(Row(section, item, "skipped", "", str(why)))
        except Exception as err:  # noqa: BLE001 - any failure becomes a row; the check goes on
            rows.append(Row(section, item, "failed", "", describe(err)))
            self.log(f"{section} / {item} failed:\n{traceback.format_exc()}")
            free_memory()
        else:
            rows.append(Row(section, item, "ok", result, detail))
            self.log(f"{section} / {item}: {result} {detail}")
            return True
        return False

    def ours(self) -> Any:
        """The phi4flash model of this run (built once): the real config at real size, tiny with --tiny."""
        if "ours" not in self.models:
            self.log("building phi4flash (random weights) ...")
            self.models["ours"] = build_phi4flash(ours_config(self.args.tiny), self.device, self.dtype)
        return self.models["ours"]


def describe(err: BaseException) -> str:
    """``Type: message`` on one line, cut to a readable length."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= 400 else text[:397] + "..."


def plural(count: int, noun: str) -> str:
    """``1 file``, ``3 files``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def free_memory() -> None:
    """Give cached GPU memory back after a failure (an out-of-memory error, say) so the next row can run."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rate(value: float) -> str:
    """A speed for the table: no decimals from 100 up."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def best_of(rates: Sequence[float]) -> tuple[float, str]:
    """The best rate and ``best of N (spread S)``: spread = fastest / slowest."""
    best = max(rates)
    return best, f"best of {len(rates)} (spread {best / min(rates):.2f}x)"


def prefill_chunk(args: argparse.Namespace) -> int:
    """Prompt tokens per forward call: the engine's default unless --prefill-chunk says otherwise."""
    from phi4flash.engine import PREFILL_CHUNK

    return args.prefill_chunk or PREFILL_CHUNK


# -- sections ---------------------------------------------------------------------------------------------------


def section_environment(check: Check, rows: list[Row]) -> None:
    """Versions, the GPU, the optional kernels, and what the shell script could not install."""
    cuda = torch.version.cuda or "none (CPU build)"
    rows.append(Row("environment", "python / torch", "ok", f"{sys.version.split()[0]} / {torch.__version__}",
                    f"CUDA build {cuda}; {torch.get_num_threads()} CPU threads"))
    if check.device.type == "cuda":
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(check.device)
            rows.append(Row("environment", "GPU", "ok", props.name, f"{props.total_memory / 2**30:.0f} GiB, "
                            f"compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs"))
        else:
            rows.append(Row("environment", "GPU", "failed", "no CUDA device",
                            f"torch {torch.__version__} sees none: the GPU sections are skipped"))
    else:
        rows.append(Row("environment", "device", "ok", str(check.device), "tiny sizes" if check.args.tiny else ""))

    def transformers_version() -> tuple[str, str]:
        import transformers

        return transformers.__version__, "the baseline's generate()"

    check.measure(rows, "environment", "transformers", transformers_version)

    def kernels() -> tuple[str, str]:
        import importlib.util

        found = [n for n in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(n) is not None]
        return ", ".join(found) or "none", "optional CUDA kernels; without them phi4flash runs its pure PyTorch path"

    check.measure(rows, "environment", "optional kernels", kernels)
    if check.args.environment_report:
        for line in Path(check.args.environment_report).read_text().splitlines():
            item, status, result, detail = (line.split("\t") + ["", "", ""])[:4]
            if item:
                rows.append(Row("environment", item, status if status in STATUSES else "failed", result, detail))


@dataclass
class TestCounts:
    """What one pytest run did, from its JUnit XML."""

    passed: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count
    not_collected: list[str] = field(default_factory=list)  # "file (missing module X)", "file (needs ...)"

    def summary(self) -> str:
        """``N passed, N failed, N skipped[, N files not collected]``."""
        text = f"{self.passed} passed, {len(self.failed)} failed, {sum(self.skipped.values())} skipped"
        return text + (f", {plural(len(self.not_collected), 'file')} not collected" if self.not_collected else "")


def parse_junit(path: Path) -> TestCounts:
    """Counts and names from pytest's JUnit XML. A file that could not be imported for a missing module, or for
    a version older than phi4flash needs (its ImportError says ``needs X>=V (found W)``), is ``not collected``
    (the environment lacks an extra: the GPU image's transformers was 5.17 on 2026-12-04, phi4flash.hf needs
    5.24); any other collection error is a failure."""
    counts = TestCounts()
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}.{case.get('name')}".strip(".")
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if error is not None and error.get("message") == "collection failure":
            missing = re.search(r"No module named '([^']+)'", error.text or "")
            # the last: the traceback quotes the raising line (an f-string's braces) before the message
            too_old = re.findall(r"needs (\S+) \(found ([^)]+)\)", error.text or "")[-1:]
            why = (f"missing module {missing.group(1)}" if missing else
                   f"needs {too_old[0][0]}, found {too_old[0][1]}" if too_old else None)
            if why:
                counts.not_collected.append(f"{name} ({why})")
                continue
        if failure is not None or error is not None:
            counts.failed.append(name)
        elif skipped is not None:
            counts.skipped[(skipped.get("message") or "").strip()] += 1
        else:
            counts.passed += 1
    return counts


def gpu_test_files(tests_dir: Path) -> list[Path]:
    """The test files that mark anything ``gpu``."""
    return sorted(p for p in tests_dir.rglob("test_*.py") if "mark.gpu" in p.read_text(errors="replace"))


def section_tests(check: Check, rows: list[Row]) -> None:
    """``pytest -m gpu`` over the files that have GPU tests, in a subprocess with a time limit."""
    files = gpu_test_files(Path(check.args.tests_dir))
    if not files:
        raise SkipMeasurement(f"no gpu-marked tests under {check.args.tests_dir}")
    check.budget.need(20, "pytest")
    limit = max(10.0, min(check.args.tests_timeout, check.budget.left() - 10))
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors", f"--junitxml={report}", *map(str, files)]
        try:
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"pytest ran past its {limit:.0f} s limit") from err
        output = proc.stdout + proc.stderr
        if check.log_file is not None:
            (check.log_file.parent / "gpu_tests.log").write_text(output)
        if not report.exists():
            raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {output.strip()[-300:]}")
        counts = parse_junit(report)
    details = [f"failed: {', '.join(counts.failed[:4])}"] if counts.failed else []
    details += [f"{n} skipped: {reason}" for reason, n in counts.skipped.most_common(2)]
    details += [f"not collected: {', '.join(counts.not_collected)}"] if counts.not_collected else []
    rows.append(Row("tests", f"pytest -m gpu ({plural(len(files), 'file')})", "failed" if counts.failed else "ok",
                    counts.summary(), "; ".join(details)))
    check.log(f"tests: {counts.summary()}")


def section_prefill(check: Check, rows: list[Row]) -> None:
    """phi4flash prefill tokens/s at each prompt length, batch 1, in the engine's chunks."""
    model, chunk, args = check.ours(), prefill_chunk(check.args), check.args
    vocab, warm = model.config.vocab_size, min(2 * chunk, args.prefill_lengths[0])
    ours_prefill(model, random_ids((1, warm), vocab, check.device), model.new_cache(1, warm + 1), chunk)
    seconds_per_token = None  # from the previous length: sizes the budget check of the next
    for length in args.prefill_lengths:
        def run(length: int = length) -> tuple[str, str]:
            nonlocal seconds_per_token
            if seconds_per_token is not None:
                check.budget.need(seconds_per_token * length * args.rounds * 1.5, f"prefill of {length} tokens")
            prompt = random_ids((1, length), vocab, check.device, seed=length)
            times = [timed(lambda: ours_prefill(model, prompt, model.new_cache(1, length + 1), chunk), check.device)
                     for _ in range(args.rounds)]
            seconds_per_token = min(times) / length
            best, spread = best_of([length / t for t in times])
            return f"{rate(best)} tok/s", f"{spread}; chunks of {chunk}"

        check.measure(rows, "prefill", f"phi4flash, {length} tokens, batch 1", run)


def decode_rows(check: Check, rows: list[Row], model: Any, section: str, label: str,
                step: Callable[[Any, Any], Any] | None = None) -> None:
    """Decode tokens/s of ``model`` at each batch size after a prompt of --decode-context tokens."""
    args, chunk = check.args, prefill_chunk(check.args)
    for batch in args.decode_batches:
        def run(batch: int = batch) -> tuple[str, str]:
            check.budget.need(5 if not args.tiny else 0, f"decode at batch {batch}")
            steps = args.decode_steps
            cache = model.new_cache(batch, args.decode_context + steps * args.rounds + 2)
            prompt = random_ids((batch, args.decode_context), model.config.vocab_size, check.device, seed=batch)
            token = ours_decode(model, ours_prefill(model, prompt, cache, chunk), cache, 1, step)  # warm
            times = []
            for _ in range(args.rounds):
                times.append(timed(lambda: ours_decode(model, token, cache, steps, step), check.device))
            best, spread = best_of([batch * steps / t for t in times])
            return f"{rate(best)} tok/s", f"{spread}; {steps} steps after {args.decode_context} tokens"

        check.measure(rows, section, f"{label}, batch {batch}", run)


def section_decode(check: Check, rows: list[Row]) -> None:
    """phi4flash decode tokens/s (all rows together) at each batch size, the eager step."""
    decode_rows(check, rows, check.ours(), "decode", "phi4flash")


def section_compiled(check: Check, rows: list[Row]) -> None:
    """The decode step as ``phi4flash.load(..., compile=True)`` runs it on CUDA: CUDA graphs of the eager static
    step (:mod:`phi4flash.compiled`), captured for one row and the largest batch on a scratch cache (the time to
    get ready), then the decode's rows, each on its own cache (whose graphs are captured on its first step)."""
    from phi4flash.compiled import CompiledDecoder

    if check.device.type != "cuda":  # minutes of inductor C++ on a small CPU; tests/test_compiled.py covers it there
        rows.append(Row("compiled", "phi4flash, the decode step's CUDA graphs", "skipped", "",
                        "CUDA only here (the CPU's compiled step is tested by tests/test_compiled.py)"))
        return
    model = check.ours()
    ready: list[Any] = []

    def capture() -> tuple[str, str]:
        check.budget.need(0 if check.args.tiny else GRAPH_SECONDS, "capturing the decode step")
        decoder = CompiledDecoder(model)
        if not decoder.compile(max(check.args.decode_batches), check.args.decode_context + 8):
            raise RuntimeError(decoder.error)
        ready.append(decoder)
        return f"{decoder.seconds:.1f} s", f"batches of 1 and {max(check.args.decode_batches)} on a scratch cache"

    check.measure(rows, "compiled", "phi4flash, the decode step's CUDA graphs", capture)
    if ready:
        decode_rows(check, rows, model, "compiled", "phi4flash (CUDA graphs)", step=ready[0])


def section_paper(check: Check, rows: list[Row]) -> None:
    """The paper's setting: aggregate generated tokens/s, phi4flash vs transformers' Phi3, in turns."""
    from phi4flash.compiled import CompiledDecoder

    args, device = check.args, check.device
    ours = check.ours()
    # ours as served with compile=True: on CUDA the decode step replays CUDA graphs (transformers compiles its own)
    step = CompiledDecoder(ours) if device.type == "cuda" else None
    ours_label = "phi4flash (CUDA graphs)" if step is not None else "phi4flash"
    shape = TINY_BASELINE if args.tiny else PHI4_MINI_REASONING
    check.log("building transformers Phi3ForCausalLM (random weights) ...")
    baseline = build_phi3(shape, device, check.dtype)
    prompt = random_ids((args.paper_batch, args.paper_prompt), min(shape.vocab, ours.config.vocab_size), device)
    chunk, wanted = prefill_chunk(args), args.paper_new_tokens
    setting = f"batch {args.paper_batch}, {args.paper_prompt}-token prompts"

    # Calibrate (this also warms both up, and compiles the baseline's step where transformers does):
    # two short runs each give a prefill time and a per-token time, which size the generation.
    check.log("calibrating (the baseline compiles its decode step here where transformers does so) ...")
    compile_mode, compile_note = args.baseline_compile, ""
    start = time.perf_counter()
    try:
        phi3_generate_seconds(baseline, prompt, wanted, compile_mode=compile_mode, stop_after=2)
    except Exception as err:  # noqa: BLE001 - one GPU run is precious: an eager baseline beats none
        if compile_mode == "off":
            raise
        check.log(f"the baseline's compiled generate() failed, going on eager:\n{traceback.format_exc()}")
        compile_mode, compile_note = "off", f" (compiled step failed: {describe(err)[:120]})"
        phi3_generate_seconds(baseline, prompt, wanted, compile_mode=compile_mode, stop_after=2)
    warmup = time.perf_counter() - start
    long = min(36, wanted)
    short = max(1, min(4, long // 4))
    hf = [phi3_generate_seconds(baseline, prompt, wanted, compile_mode=compile_mode, stop_after=n)
          for n in (short, long)]
    try:
        ours_times = [ours_generate_seconds(ours, prompt, n, chunk, step) for n in (short, long)]
    except Exception as err:  # noqa: BLE001 - one GPU run is precious: the eager step beats no row
        if step is None:
            raise
        check.log(f"phi4flash's CUDA graphs failed, going on eager:\n{traceback.format_exc()}")
        step, ours_label = None, f"phi4flash (eager steps; CUDA graphs failed: {describe(err)[:120]})"
        ours_times = [ours_generate_seconds(ours, prompt, n, chunk) for n in (short, long)]
    per_token = sum((t[1] - t[0]) / max(1, long - short) for t in (hf, ours_times))
    fixed = sum(t[0] for t in (hf, ours_times))
    # leave the quantized section its time too: the paper's setting is shortened first
    reserve = QUANTIZED_RESERVE if "quantized" in args.sections[args.sections.index("paper"):] and not args.tiny else 0
    room = (check.budget.left() - 10 - reserve) / args.rounds - fixed
    new_tokens = min(wanted, int(room / max(per_token, 1e-9)))
    if new_tokens < min(wanted, 64):
        raise SkipMeasurement(f"the paper's setting needs about {(fixed + 64 * per_token) * args.rounds:.0f} s for "
                              f"64 tokens; {check.budget.left():.0f} s left")
    note = f"; shortened from {wanted} to fit the time budget" if new_tokens < wanted else ""
    runs: dict[str, list[float]] = {"ours": [], "baseline": []}
    for _ in range(args.rounds):  # in turns, so that a slow spell of the machine hits both
        runs["ours"].append(ours_generate_seconds(ours, prompt, new_tokens, chunk, step))
        runs["baseline"].append(phi3_generate_seconds(baseline, prompt, new_tokens,
                                                      compile_mode=compile_mode))
    produced = args.paper_batch * new_tokens
    best = {}
    for name, label in (("ours", ours_label), ("baseline", "transformers Phi3 (static cache, SDPA)")):
        best[name], spread = best_of([produced / t for t in runs[name]])
        extra = f"; first call {warmup:.0f} s, compile {compile_mode}{compile_note}" if name == "baseline" else ""
        rows.append(Row("paper", f"{label}: {setting} + {new_tokens} new", "ok", f"{rate(best[name])} tok/s",
                        f"aggregate, prefill included; {spread}{extra}{note}"))
    rows.append(Row("paper", "phi4flash / Phi3", "ok", f"{best['ours'] / best['baseline']:.2f}x",
                    f"parameters {millions(parameter_count(ours))} vs {millions(parameter_count(baseline))}"))


def section_quantized(check: Check, rows: list[Row]) -> None:
    """int8 / int4 weight-only decode at each batch size (on CUDA, eager and through the CUDA graphs), or the
    refusal when the kernels are missing."""
    from phi4flash.qkernels import KernelUnavailableError
    from phi4flash.quant import QuantSpec, quantize_model_

    check.models.pop("ours", None)  # the float model is not needed any more: room for the quantized one
    free_memory()
    for spec in check.args.quantize:
        model = None

        def quantize(spec: str = spec) -> tuple[str, str]:
            nonlocal model
            QuantSpec.parse(spec)  # a bad spec fails here, before a model is built for it
            check.budget.need(0 if check.args.tiny else 60, f"quantizing to {spec}")
            start = time.perf_counter()
            model = build_phi4flash(ours_config(check.args.tiny), check.device, check.dtype)
            try:
                quantize_model_(model, spec, check.dtype)  # the check that load(quantize=) makes, then the work
            except KernelUnavailableError as err:
                model = None
                raise SkipMeasurement(f"refused: {err}") from err
            return "quantized", f"built and quantized in {time.perf_counter() - start:.0f} s"

        if check.measure(rows, "quantized", f"{spec}: load", quantize) and model is not None:
            decode_rows(check, rows, model, "quantized", f"{spec} decode")
            if check.device.type == "cuda":  # as served on CUDA: the step's CUDA graphs (phi4flash.compiled)
                from phi4flash.compiled import CompiledDecoder

                decode_rows(check, rows, model, "quantized", f"{spec} decode (CUDA graphs)",
                            step=CompiledDecoder(model))
        del model
        free_memory()


SECTION_FUNCTIONS: dict[str, Callable[[Check, list[Row]], None]] = {
    "environment": section_environment, "tests": section_tests, "prefill": section_prefill,
    "decode": section_decode, "paper": section_paper, "quantized": section_quantized,
    "compiled": section_compiled}


def run_section(check: Check, name: str, rows: list[Row]) -> None:
    """One section, guarded: what it raises becomes a row; OutOfTime goes on up."""
    check.log(f"section {name}")
    needs_gpu = name not in ("environment", "tests")
    try:
        if needs_gpu and check.device.type == "cuda" and not torch.cuda.is_available():
            raise SkipMeasurement("no CUDA device")
        if name != "environment" and check.budget.left() <= 0:
            raise SkipMeasurement("no time left in the budget")
        SECTION_FUNCTIONS[name](check, rows)
    except SkipMeasurement as why:
        rows.append(Row(name, "section", "skipped", "", str(why)))
    except Exception as err:  # noqa: BLE001 - the table is printed whatever a section does
        rows.append(Row(name, "section", "failed", "", describe(err)))
        check.log(f"section {name} failed:\n{traceback.format_exc()}")
    free_memory()  # what a section built for itself is gone now


# -- command line -----------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip() and x.strip() != "none"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags; sizes not given take the real defaults, or the tiny ones with --tiny / --dry-run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="every section at tiny sizes (seconds)")
    parser.add_argument("--dry-run", action="store_true", help="--tiny on CPU: the whole script's logic, no GPU")
    parser.add_argument("--device", default=None, help="default: cuda (--tiny: cuda if there is one, else cpu)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--sections", type=_names, default=list(SECTIONS), help=f"of {','.join(SECTIONS)}")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check (default 420)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per measurement (best of, with spread)")
    parser.add_argument("--prefill-lengths", type=_int_list, default=None, help="default 2048,8192,32768")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="default: the engine's")
    parser.add_argument("--decode-batches", type=_int_list, default=None, help="default 1,16,64")
    parser.add_argument("--decode-context", type=int, default=None, help="prompt tokens before decode (2048)")
    parser.add_argument("--decode-steps", type=int, default=None, help="timed steps per round (32)")
    parser.add_argument("--paper-prompt", type=int, default=None, help="the paper's prompt length (2048)")
    parser.add_argument("--paper-new-tokens", type=int, default=None,
                        help="generation length in the paper's setting (2048; shortened to fit the budget)")
    parser.add_argument("--paper-batch", type=int, default=None, help="sequences generated together (16)")
    parser.add_argument("--baseline-compile", choices=("auto", "off"), default="auto",
                        help="auto: as transformers' generate() does (it compiles the static-cache step on "
                             "CUDA); off: eager")
    parser.add_argument("--quantize", type=_names, default=["int8", "int4"], help="specs, or none (int8,int4)")
    parser.add_argument("--tests-dir", default=str(ROOT / "tests"), help="where to look for gpu-marked tests")
    parser.add_argument("--tests-timeout", type=float, default=150.0, help="seconds for pytest at most")
    parser.add_argument("--environment-report", default=None, help="tab-separated rows from gpu_check.sh")
    parser.add_argument("--output", default=None, help="write the table here (default $OUT/gpu_check.md)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.dry_run:
        args.tiny = True
        args.device = args.device or "cpu"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() or not args.tiny else "cpu"
    for name, default in (TINY_SIZES if args.tiny else REAL_SIZES).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("rounds", "decode_context", "decode_steps", "paper_prompt", "paper_new_tokens", "paper_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.output is None and os.environ.get("OUT"):
        args.output = str(Path(os.environ["OUT"]) / "gpu_check.md")
    return args


def _out_of_time(signum: int, frame: Any) -> None:  # noqa: ARG001 - the signal handler's signature
    raise OutOfTime


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sections, print the table (and write it); exit status 1 when any row failed."""
    args = parse_args(argv)
    output = Path(args.output) if args.output else None
    log_file = output.with_suffix(".log") if output else None
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("")
    check = Check(args, torch.device(args.device), getattr(torch, args.dtype), Budget(args.budget), log_file)
    signal.signal(signal.SIGTERM, _out_of_time)
    rows: list[Row] = []
    for index, name in enumerate(args.sections):
        try:
            run_section(check, name, rows)
        except OutOfTime:
            rows.append(Row(name, "section", "failed", "", "stopped: the shell's time limit ran out"))
            rows += [Row(rest, "section", "skipped", "", "not started: out of time")
                     for rest in args.sections[index + 1:]]
            break
    check.models.clear()
    mode = "tiny sizes" if args.tiny else "real size, random weights"
    title = (f"phi4flash GPU check: {mode}, {args.dtype} on {args.device}, {time.strftime('%Y-%m-%d')}, "
             f"{check.budget.elapsed():.0f} s")
    table = format_table(rows)
    print(f"\n{title}\n\n{table}", flush=True)
    if output:
        output.write_text(f"{title}\n\n{table}\n")
        output.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 1 if any(r.status == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
