"""``phi4flash bench``: prefill and decode speed of phi4flash against the model a user would pick instead.

The baseline is transformers' own ``Phi3ForCausalLM`` with Phi-4-mini-reasoning's layout (32 layers,
GQA, SwiGLU, RoPE, full attention everywhere), scaled to the same width as ours, random weights,
driven by its own ``generate()``. Both run in the same process, same dtype, same threads; the
table gives ours / baseline ratios. Ours also runs with the prefill skip off, to show what it buys.
Every measurement is repeated in interleaved rounds; the best run is reported with the spread of the
runs, and a warning says when they disagree (a busy machine), instead of printing noise as a result.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cli import HelpFormatter
from .compiled import CompiledDecoder, wants_compile
from .config import Phi4FlashConfig
from .engine import PREFILL_CHUNK
from .model import Phi4FlashForCausalLM
from .quant import quantize_model_


@dataclass
class BenchResult:
    """Speed of one model at one prompt length."""

    name: str
    prompt_tokens: int
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    state_bytes: int


def our_config(hidden: int, layers: int, vocab: int, window: int) -> Phi4FlashConfig:
    """Our architecture at ``hidden`` width (head_dim 64, MLP 4x, the real 512 window)."""
    heads = max(4, hidden // 64)  # differential attention pairs heads, and kv heads pair too
    heads += heads % 2
    # kv heads = heads / 2 as in the real model, or the nearest even count that pairs evenly
    kv_heads = next(k for k in range(heads // 2, 1, -1) if k % 2 == 0 and (heads // 2) % (k // 2) == 0)
    return Phi4FlashConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv_heads, sliding_window=window,
                           context_length=131072, torch_dtype="float32")


def baseline_model(hidden: int, layers: int, vocab: int, dtype: torch.dtype) -> torch.nn.Module:
    """Phi-4-mini-reasoning's layout (Phi3ForCausalLM: 24 q / 8 kv heads at 3072) scaled to ``hidden``."""
    try:
        from transformers import Phi3Config, Phi3ForCausalLM
    except ImportError as err:
        raise ImportError("the bench baseline is transformers' Phi3ForCausalLM: pip install 'phi4flash[hf]', "
                          "or pass --no-baseline") from err

    head_dim = 128 if hidden >= 1536 else 64
    heads = max(1, hidden // head_dim)
    kv_heads = next(k for k in range(max(1, heads // 3), heads + 1) if heads % k == 0)  # KV width ~ hidden / 3
    config = Phi3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        max_position_embeddings=131072, tie_word_embeddings=True, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    model = Phi3ForCausalLM(config).to(dtype).eval()
    return model


def _time(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def bench_ours(model: Phi4FlashForCausalLM, prompt: torch.Tensor, new_tokens: int, *, skip: bool = True,
               chunk: int = PREFILL_CHUNK, name: str = "phi4flash", decoder: CompiledDecoder | None = None
               ) -> BenchResult:
    """Prefill in chunks as the engine does (skip on/off), then ``new_tokens`` greedy one-token steps (through
    the compiled step when ``decoder`` is given, as the engine runs it once compiled)."""
    length = prompt.shape[1]
    cache = model.new_cache(1, length + new_tokens + 1)
    logits: list[torch.Tensor] = []

    def prefill() -> None:
        if skip:  # as the engine: the self-decoder alone on all but the last token, which gives the logits
            model.prefill(prompt[:, :-1], cache, chunk=chunk)
            logits.append(model(prompt[:, -1:], cache=cache, logits_to_keep=1)[:, -1])
        else:
            for start in range(0, length, chunk):
                logits.append(model(prompt[:, start:start + chunk], cache=cache, logits_to_keep=1,
                                    skip_cross_decoder=False)[:, -1])
        logits.append(logits[-1].argmax(-1))

    ttft = _time(prefill)
    token = logits[-1]

    def decode() -> None:
        nonlocal token
        for _ in range(new_tokens):
            token = (decoder(token, cache) if decoder is not None else model.step(token, cache)).argmax(-1)

    decode_s = _time(decode)
    return BenchResult(name, length, ttft, length / ttft, new_tokens / decode_s, cache.bytes_per_sequence(length))


class _TokenClock:
    """A transformers streamer that notes when each token arrives: ``put`` is called once with the
    prompt, then once per generated token, inside ``generate()``'s own loop."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:  # noqa: ARG002 - only the time matters
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def bench_baseline(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> BenchResult:
    """transformers' generate(), timed per token in one call: the first token gives the time to first
    token, the next ``new_tokens`` the decode speed."""
    clock = _TokenClock()
    start = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0,
                   max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, streamer=clock)
    if len(clock.times) != new_tokens + 2:
        raise RuntimeError(f"expected {new_tokens + 1} generated tokens, the streamer saw {len(clock.times) - 1}")
    first, last = clock.times[1], clock.times[-1]  # times[0]: the prompt, before any work
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    dtype_bytes = next(model.parameters()).element_size()
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * prompt.shape[1] * dtype_bytes
    return BenchResult("transformers Phi3", prompt.shape[1], first - start, prompt.shape[1] / (first - start),
                       new_tokens / max(last - first, 1e-9), kv)


@dataclass
class Measured:
    """Several runs of one model at one prompt length: the best of each quantity and how far the runs spread."""

    runs: list[BenchResult]

    @property
    def best(self) -> BenchResult:
        """The fastest TTFT/prefill and the fastest decode over the runs (the least disturbed ones)."""
        first = self.runs[0]
        ttft = min(r.ttft_s for r in self.runs)
        return BenchResult(first.name, first.prompt_tokens, ttft, first.prompt_tokens / ttft,
                           max(r.decode_tok_s for r in self.runs), first.state_bytes)

    def spread(self, quantity: str) -> float:
        """(slowest - fastest) / fastest of ``quantity`` ("ttft_s" or "decode_tok_s") over the runs."""
        values = [getattr(r, quantity) for r in self.runs]
        return (max(values) - min(values)) / min(values) if min(values) > 0 else float("inf")


def disagreement_warnings(results: dict[tuple[str, int], Measured], max_spread: float,
                          slopes: dict[str, float] | None = None) -> list[str]:
    """Warnings for numbers that should not be trusted: runs whose spread exceeds ``max_spread``, and a decode
    time per token that shrinks as the context grows (noise larger than the effect being measured)."""
    warnings = []
    for (name, length), measured in results.items():
        for quantity, label in (("ttft_s", "prefill"), ("decode_tok_s", "decode")):
            spread = measured.spread(quantity)
            if len(measured.runs) > 1 and spread > max_spread:
                warnings.append(f"{label} of {name} at {length} tokens varied by {spread:.0%} over "
                                f"{len(measured.runs)} runs (limit {max_spread:.0%})")
    for name, slope in (slopes or {}).items():
        if slope < 0:
            warnings.append(f"decode time per token of {name} shrank as the context grew ({slope:.3f} us per token)")
    return warnings


def _row(m: Measured) -> str:
    r = m.best
    return (f"| {r.name} | {r.prompt_tokens} | {r.ttft_s * 1000:.0f} | {r.prefill_tok_s:.0f} | {r.decode_tok_s:.1f} | "
            f"{r.state_bytes / 2**20:.2f} | {m.spread('ttft_s'):.0%} / {m.spread('decode_tok_s'):.0%} |")


def build_parser(prog: str = "phi4flash bench") -> argparse.ArgumentParser:
    """The ``phi4flash bench`` options."""
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter,
        description="Prefill and decode speed of phi4flash against transformers' own Phi3ForCausalLM in "
                    "Phi-4-mini-reasoning's layout (full attention everywhere), at the same width, random weights, "
                    "same dtype and threads. Each measurement is repeated (--repeat), interleaving the models; the "
                    "table gives the best run and the spread, and a warning when the runs disagree.")
    parser.add_argument("--hidden", type=int, default=384, help="model width (2560 = the real model)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of both models")
    parser.add_argument("--vocab", type=int, default=4096, help="vocab size (200064 = the real model)")
    parser.add_argument("--window", type=int, default=512, help="sliding-window size of our attention layers")
    parser.add_argument("--lengths", default="512,2048,8192", help="prompt lengths, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per run")
    parser.add_argument("--chunk", type=int, default=PREFILL_CHUNK, help="prompt tokens per prefill chunk (ours)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the best one is reported")
    parser.add_argument("--max-spread", type=float, default=0.25,
                        help="warn when runs of one measurement differ by more than this fraction")
    parser.add_argument("--real", action="store_true", help="the real dimensions (hidden 2560, vocab 200064)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of both models")
    parser.add_argument("--dtype", default=None, help="dtype of both models (default: bfloat16 on CUDA and with "
                                                      "--quantize, else float32)")
    parser.add_argument("--quantize", default=None,
                        help="weight-only quantization of ours: int8, int4 or int4-g<group size> (default: none)")
    parser.add_argument("--no-baseline", action="store_true", help="time phi4flash only")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="decode ours through the compiled step, as the engine does with compile=True (auto: "
                             "where it pays, small models on the CPU and any on CUDA, unless PHI4FLASH_COMPILE=0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a markdown table plus ratios (and warnings when the runs disagree)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.real:
        args.hidden, args.vocab = 2560, 200064
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.cuda.is_available() or args.quantize else "float32"
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.manual_seed(0)
    ours = Phi4FlashForCausalLM(our_config(args.hidden, args.layers, args.vocab, args.window))
    ours.init_weights()
    ours = ours.to(device).to_dtype(dtype).eval().tune_weight_layout()  # as the engine runs it
    if args.quantize:
        quantize_model_(ours, args.quantize, dtype)
    decoder = None
    if wants_compile({"on": True, "off": False}.get(args.compile, "auto"), ours, default=True):
        decoder = CompiledDecoder(ours)
        if not decoder.compile(1, 64):
            print(f"# decode step not compiled ({decoder.error}): eager", file=sys.stderr)
            decoder = None
    baseline = None if args.no_baseline else baseline_model(args.hidden, args.layers, args.vocab, dtype).to(device)
    n_ours = sum(p.numel() for p in ours.parameters())
    print(f"# phi4flash bench: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype} on "
          f"{device}, {torch.get_num_threads()} threads, {args.new_tokens} new tokens, prefill chunks of "
          f"{args.chunk}, best of {args.repeat} runs" + (f", ours quantized {args.quantize}" if args.quantize else "")
          + (f", ours decoding through the compiled step (compiled in {decoder.seconds:.0f} s)" if decoder else
             ", ours decoding eagerly"))
    print(f"# parameters: phi4flash {n_ours / 1e6:.1f}M" + (
        f", baseline {sum(p.numel() for p in baseline.parameters()) / 1e6:.1f}M" if baseline is not None else ""))
    print("\n| model | prompt | TTFT ms | prefill tok/s | decode tok/s | state MiB/seq | spread prefill / decode |")
    print("|---|---|---|---|---|---|---|")
    results: dict[tuple[str, int], Measured] = {}
    for length in lengths:
        prompt = torch.randint(3, args.vocab, (1, length), device=device)
        # warm-up at this length's cache size: a compiled step may recompile for a new size, never inside a timed run
        bench_ours(ours, prompt if decoder is not None else prompt[:, :64], 2, decoder=decoder)
        if baseline is not None:
            bench_baseline(baseline, prompt[:, :64], 2)
        for _ in range(args.repeat):  # rounds interleave the models, so a busy spell hits all of them
            runs = [bench_ours(ours, prompt, args.new_tokens, chunk=args.chunk, decoder=decoder),
                    bench_ours(ours, prompt, args.new_tokens, chunk=args.chunk, skip=False, decoder=decoder,
                               name="phi4flash (no prefill skip)")]
            if baseline is not None:
                runs.append(bench_baseline(baseline, prompt, args.new_tokens))
            for r in runs:
                results.setdefault((r.name, length), Measured([])).runs.append(r)
        for name in dict.fromkeys(name for name, n in results if n == length):
            print(_row(results[(name, length)]), flush=True)
    slopes: dict[str, float] = {}
    if baseline is not None:
        print("\n| prompt | prefill ours/baseline | decode ours/baseline | TTFT baseline/ours | state baseline/ours "
              "| prefill skip speed-up |")
        print("|---|---|---|---|---|---|")
        for length in lengths:
            o, b = results[("phi4flash", length)].best, results[("transformers Phi3", length)].best
            n = results[("phi4flash (no prefill skip)", length)].best
            print(f"| {length} | {o.prefill_tok_s / b.prefill_tok_s:.2f}x | {o.decode_tok_s / b.decode_tok_s:.2f}x | "
                  f"{b.ttft_s / o.ttft_s:.2f}x | {b.state_bytes / o.state_bytes:.2f}x | {n.ttft_s / o.ttft_s:.2f}x |")
        lo, hi = lengths[0], lengths[-1]
        if hi > lo:
            def slope(name: str) -> float:
                a, z = results[(name, lo)].best, results[(name, hi)].best
                return (1 / z.decode_tok_s - 1 / a.decode_tok_s) / (hi - lo) * 1e6  # us per context token

            slopes = {"phi4flash": slope("phi4flash"), "transformers Phi3": slope("transformers Phi3")}
            s_ours, s_base = slopes["phi4flash"], slopes["transformers Phi3"]
            print(f"\ndecode time per token grows by {s_ours:.3f} us (ours) vs {s_base:.3f} us (baseline) per context "
                  f"token from {lo} to {hi}; ratio ours/baseline = {s_ours / s_base:.2f}")
    warnings = disagreement_warnings(results, args.max_spread, slopes)
    if warnings:
        lines = "".join(f"\nwarning: {w}" for w in warnings)
        print(f"{lines}\nwarning: the runs disagree, so these numbers are not reliable: the machine is probably busy "
              "(other processes, CPU contention). Rerun on an idle machine, or with a larger --repeat.",
              file=sys.stderr)
    return 0
