"""Decode and prefill speed of the real-size model with int8 / int4 weights against bfloat16, on this machine.

    python benchmarks/bench_quant.py                       # speed table (about 10 minutes on 2 cores)
    python benchmarks/bench_quant.py --memory /tmp/real    # + resident memory when loading from disk

The real config.json with random weights (3.85B parameters), bfloat16 activations everywhere. The three
models share every non-quantized tensor and are measured in turns within each round (bf16, int8, int4,
bf16, ...), so that the noise of a shared machine hits all alike; each number is the best of the rounds,
with the spread (worst / best) beside it. Per model:

- floor: one matrix-vector product over every weight the decode step reads (each linear's kernel once,
  LM head included), timed alone: what a decode step would cost with zero overhead;
- "bfloat16-torch" is the same bfloat16 weights behind PyTorch's ``F.linear`` (today's path before phi4flash's
  decode kernel), "bfloat16" with it;
- decode tokens/s after a prompt of each context length, and decode time / floor;
- the GB/s a decode step streams (weight bytes / step time) against the machine's read bandwidth
  (a float32 sum over 1 GiB, measured in the same run);
- prefill tokens/s of one prompt (in the engine's 512-token chunks, cross-decoder skipped).

With ``--compile`` each format also decodes through the compiled static step (:class:`phi4flash.compiled.
CompiledDecoder`, what ``phi4flash.load(..., compile=True)`` runs): rows "<format> compiled", same weights, so the
same floor and prefill; the compile time of each is printed (bfloat16-torch, the baseline, is not compiled).

With ``--memory DIR`` a real-size bfloat16 checkpoint is written to DIR once (7.7 GB), then loaded in a
fresh process per format with ``load_model(DIR, quantize=...)``: peak and final resident memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from gpu_models import build_phi4flash  # noqa: E402 - benchmarks/ is on sys.path when run as a script

from phi4flash import Phi4FlashConfig, Phi4FlashForCausalLM
from phi4flash.compiled import CompiledDecoder
from phi4flash.engine import PREFILL_CHUNK
from phi4flash.quant import QuantizedLinear, QuantSpec, model_weight_bytes, quantizable_linears, quantize_modules_

REAL_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "checkpoint" / "config.json"


def float_model(config: Phi4FlashConfig) -> Phi4FlashForCausalLM:
    """The real-size model in bfloat16 with random weights (built on meta, materialised once)."""
    return build_phi4flash(config, "cpu", torch.bfloat16)


def quantized_copy(source: Phi4FlashForCausalLM, spec: QuantSpec) -> Phi4FlashForCausalLM:
    """A quantized model of ``source``'s weights that shares every tensor it does not quantize."""
    with torch.device("meta"):
        model = Phi4FlashForCausalLM(source.config)
    weights = {name: module.weight for name, module in quantizable_linears(source)}
    weights["model.embed_tokens"] = source.model.embed_tokens.weight
    targets = quantize_modules_(model, spec)
    for name, param in source.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        if not (prefix in targets and leaf == "weight") and name != "model.embed_tokens.weight":
            model.get_submodule(prefix)._parameters[leaf] = param
    for prefix, module in targets.items():
        module.set_weight(weights[prefix], device=torch.device("cpu"), dtype=torch.bfloat16)
    return model.eval().tune_weight_layout()  # as the engine runs it (dt_proj through the decode kernel)


@torch.no_grad()
def floor_step(model: Phi4FlashForCausalLM) -> None:
    """One matrix-vector product through every weight a decode step reads, each with the kernel that runs it."""
    for module in list(model.modules()):
        if isinstance(module, (QuantizedLinear, torch.nn.Linear)):
            module(torch.zeros(1, module.in_features, dtype=torch.bfloat16))


def plain_copy(source: Phi4FlashForCausalLM) -> Phi4FlashForCausalLM:
    """The same bfloat16 weights (shared) behind PyTorch's own ``nn.Linear``: today's path, to compare with."""
    with torch.device("meta"):
        model = Phi4FlashForCausalLM(source.config)
    for name, param in source.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        model.get_submodule(prefix)._parameters[leaf] = param
    model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


@torch.no_grad()
def decode_rate(model: Phi4FlashForCausalLM, context: int, tokens: int,
                compiled: CompiledDecoder | None = None) -> float:
    """Decode tokens/s after a random prompt of ``context`` tokens (through ``compiled`` when given)."""
    prompt = torch.randint(0, 199_000, (1, context))
    cache = model.new_cache(1, context + tokens + 1)
    for start in range(0, context, PREFILL_CHUNK):
        model(prompt[:, start:start + PREFILL_CHUNK], cache=cache, logits_to_keep=1)
    step = compiled if compiled is not None else model.step
    token = torch.zeros(1, dtype=torch.long)
    step(token, cache)  # warm
    start = time.perf_counter()
    for _ in range(tokens):
        token = step(token, cache).argmax(-1)
    return tokens / (time.perf_counter() - start)


@torch.no_grad()
def prefill_rate(model: Phi4FlashForCausalLM, length: int) -> float:
    """Prefill tokens/s of a random prompt, as the engine runs it."""
    prompt = torch.randint(0, 199_000, (1, length))
    cache = model.new_cache(1, length + 1)
    start = time.perf_counter()
    for begin in range(0, length, PREFILL_CHUNK):
        model(prompt[:, begin:begin + PREFILL_CHUNK], cache=cache, logits_to_keep=1)
    return length / (time.perf_counter() - start)


def read_bandwidth() -> float:
    """GB/s of a float32 sum over 1 GiB (the memory bus's read speed, as near as PyTorch gets)."""
    data = torch.ones(2**28)
    start = time.perf_counter()
    data.sum()
    return data.numel() * 4 / (time.perf_counter() - start) / 1e9


def _timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def memory_report(directory: Path) -> None:
    """Write a real-size checkpoint once, then load it per format in a fresh process and report memory."""
    config = Phi4FlashConfig.from_json(REAL_CONFIG)
    if not (directory / "model.safetensors.index.json").exists():
        from phi4flash import save_checkpoint

        print(f"writing a real-size random bfloat16 checkpoint to {directory} ...", flush=True)
        model = float_model(config)
        save_checkpoint(model, directory, max_shard_bytes=5 * 2**30)
        del model
    probe = ("import resource, sys, time, torch; from phi4flash import load_model; torch.set_num_threads(2); "
             "t = time.perf_counter(); m = load_model(sys.argv[1], quantize=sys.argv[2]); t = time.perf_counter() - t; "
             "rss = int(open('/proc/self/statm').read().split()[1]) * 4096; "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss, t)")
    print("\n| weights | load s | peak RSS GB | RSS after load GB |\n|---|---|---|---|")
    for spec in ("int4", "int8"):
        out = subprocess.run([sys.executable, "-c", probe, str(directory), spec], capture_output=True, text=True,
                             check=True)
        peak, final, seconds = out.stdout.split()
        label = QuantSpec.parse(spec).label
        print(f"| {label} | {float(seconds):.0f} | {int(peak) / 1e9:.2f} | {int(final) / 1e9:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contexts", default="32,2048", help="decode after prompts of these lengths")
    parser.add_argument("--decode-tokens", type=int, default=12)
    parser.add_argument("--prefill", type=int, default=2048, help="prompt length for prefill speed (0: skip)")
    parser.add_argument("--formats", default="bfloat16-torch,bfloat16,int8,int4",
                        help="bfloat16 (phi4flash's decode kernel), bfloat16-torch (PyTorch's F.linear) and "
                             "quantize= specs")
    parser.add_argument("--memory", type=Path, default=None, help="also report memory, loading from this folder")
    parser.add_argument("--compile", action="store_true", help="also decode through the compiled step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = Phi4FlashConfig.from_json(REAL_CONFIG)
    start = time.perf_counter()
    base = float_model(config)
    models = {}
    for name in args.formats.split(","):
        if name == "bfloat16":
            models[name] = base
        elif name == "bfloat16-torch":
            models[name] = plain_copy(base)
        else:
            models[name] = quantized_copy(base, QuantSpec.parse(name))
    print(f"# real config, random weights, {args.threads} threads, bfloat16 activations; built in "
          f"{time.perf_counter() - start:.0f} s; {args.rounds} rounds, models measured in turns", flush=True)
    compiled: dict[str, tuple[str, CompiledDecoder]] = {}  # "<format> compiled" -> (format, its compiled step)
    if args.compile:
        for name, model in list(models.items()):
            if name == "bfloat16-torch":  # the stock path stays as it is: the baseline
                continue
            decoder = CompiledDecoder(model)
            if not decoder.compile(1, 64):
                raise SystemExit(f"{name}: the decode step did not compile: {decoder.error}")
            print(f"# {name}: decode step compiled in {decoder.seconds:.0f} s", flush=True)
            compiled[f"{name} compiled"] = (name, decoder)
    contexts = [int(c) for c in args.contexts.split(",")]
    runs: dict[tuple[str, str], list[float]] = {}

    def note(name: str, what: str, value: float) -> None:
        runs.setdefault((name, what), []).append(value)

    for _ in range(args.rounds):
        note("machine", "bandwidth", read_bandwidth())
        for name, model in models.items():
            note(name, "floor", _timed(lambda m=model: floor_step(m)))
            for context in contexts:
                note(name, f"decode@{context}", decode_rate(model, context, args.decode_tokens))
            if args.prefill:
                note(name, "prefill", prefill_rate(model, args.prefill))
            if f"{name} compiled" in compiled:
                for context in contexts:
                    note(f"{name} compiled", f"decode@{context}",
                         decode_rate(model, context, args.decode_tokens, compiled[f"{name} compiled"][1]))
    best = {key: (min(v) if key[1] == "floor" else max(v)) for key, v in runs.items()}
    spread = {key: (max(v) / min(v)) for key, v in runs.items()}
    bandwidth = best[("machine", "bandwidth")]
    print(f"\nmemory read bandwidth (float32 sum over 1 GiB): {bandwidth:.1f} GB/s (spread "
          f"{spread[('machine', 'bandwidth')]:.2f}x)")
    head = "| weights | GB read per token | floor ms | floor GB/s |"
    head += "".join(f" decode tok/s @{c} | decode/floor @{c} | GB/s @{c} |" for c in contexts)
    head += " prefill tok/s |" if args.prefill else ""
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    summary = {}
    rows = [(name, name) for name in models] + [(name, base_name) for name, (base_name, _) in compiled.items()]
    for name, base_name in rows:
        # the tied table once: the LM head reads all of it, the lookup a row
        nbytes = model_weight_bytes(models[base_name])
        floor = best[(base_name, "floor")]
        row = f"| {name} | {nbytes / 1e9:.2f} | {floor * 1e3:.0f} | {nbytes / floor / 1e9:.1f} |"
        for context in contexts:
            rate = best[(name, f"decode@{context}")]
            row += (f" {rate:.2f} ({spread[(name, f'decode@{context}')]:.2f}x) | {1 / rate / floor:.2f} | "
                    f"{nbytes * rate / 1e9:.1f} |")
            summary[(name, context)] = rate
        if args.prefill:
            row += (f" {best[(name, 'prefill')]:.1f} ({spread[(name, 'prefill')]:.2f}x) |" if name == base_name
                    else " (as above) |")
        print(row)
    for ref in ("bfloat16-torch", "bfloat16"):
        if ref not in models:
            continue
        print("\n| weights | " + " | ".join(f"decode vs {ref} @{c}" for c in contexts)
              + (f" | prefill vs {ref}" if args.prefill else "") + " |")
        print("|---|" + "---|" * (len(contexts) + bool(args.prefill)))
        for name, base_name in rows:
            if name == ref:
                continue
            row = f"| {name} |" + "".join(f" {summary[(name, c)] / summary[(ref, c)]:.2f}x |" for c in contexts)
            if args.prefill:
                row += f" {best[(base_name, 'prefill')] / best[(ref, 'prefill')]:.2f}x |"
            print(row)
    print("\n" + json.dumps({f"{k[0]} {k[1]}": [round(x, 4) for x in v] for k, v in runs.items()}))
    del models, base, compiled
    if args.memory is not None:
        memory_report(args.memory)


if __name__ == "__main__":
    main()
