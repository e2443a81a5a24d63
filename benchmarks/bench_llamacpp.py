"""phi4flash against llama.cpp on this CPU: decode speed and the memory bandwidth each one streams at.

    python benchmarks/bench_llamacpp.py --llama-cpp /tmp/llbuild           # bf16, q8_0 and q4_0 pairs
    python benchmarks/bench_llamacpp.py --llama-cpp /tmp/llbuild --formats q4_0,q4_k_m --compile

The project's targets cite llama.cpp's speed on "a same-size model" on this machine (BF16 5.9 tok/s, 4-bit 15.5):
this script measures both sides in one run, interleaved, so that the comparison holds on a shared, noisy machine.

- llama.cpp: a random-weight GGUF of Phi-4-mini-reasoning's shape (llama architecture, 3072 hidden, 32 layers,
  24 query / 8 key-value heads, 8192 MLP, 200,064 tied vocabulary: 3.84B parameters), written in bfloat16 by
  this script (once, into --workdir) and quantized by ``llama-quantize``; timed by ``llama-bench``
  (``-p 0 -n TOKENS -d CONTEXT``: generation after CONTEXT tokens of cache).
- phi4flash: the real config with random weights (3.85B parameters), as ``benchmarks/bench_quant.py`` builds it,
  decoding after a prompt of CONTEXT tokens (eager step; with ``--compile`` the compiled step as well).

Pairs: bf16 <-> bfloat16, q8_0 <-> int8, q4_0 and q4_k_m <-> int4 (group 128). The two models differ in
architecture but not in size, and a CPU decode step is bound by the weight bytes it reads, so besides tokens/s the
table gives GB/s: weight bytes per token (the tied embedding once, as the LM head) times tokens/s.

llama.cpp without internet access: PyPI's llama-cpp-python source package vendors it::

    pip download llama-cpp-python --no-deps --no-binary :all: -d /tmp/llsrc && cd /tmp/llsrc && tar xzf *.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B /tmp/llbuild -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON \
        -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON \
        -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON
    cmake --build /tmp/llbuild --target llama-bench llama-quantize -j2

(The AVX-512 extensions ggml has switches for, named one by one: the ``-DGGML_NATIVE=ON`` build, which also
takes in what the CPU reports beyond them (AMX, AVX512-FP16), died with SIGILL on a batch of prompt tokens in
Q8_0 on this virtual machine, while one-token decode ran; the build above runs both.)
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

GGUF_ALIGNMENT = 32
# ggml tensor types and GGUF value types used here (ggml.h, gguf.h)
GGML_F32, GGML_BF16 = 0, 30
GGUF_UINT32, GGUF_FLOAT32, GGUF_STRING = 4, 6, 8
# llama.cpp format -> the phi4flash weights it is compared with
PAIRS = {"bf16": "bfloat16", "q8_0": "int8", "q4_0": "int4", "q4_k_m": "int4"}


@dataclass(frozen=True)
class LlamaShape:
    """A llama-architecture model's size; the default is Phi-4-mini-reasoning's."""

    hidden: int = 3072
    layers: int = 32
    heads: int = 24
    kv_heads: int = 8
    mlp: int = 8192
    vocab: int = 200_064

    def tensors(self) -> list[tuple[str, tuple[int, ...], int]]:
        """(GGUF name, shape in PyTorch's order, ggml type) of every weight, tied embedding, norms in float32."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        found = [("token_embd.weight", (self.vocab, self.hidden), GGML_BF16),
                 ("output_norm.weight", (self.hidden,), GGML_F32)]
        for i in range(self.layers):
            found += [(f"blk.{i}.attn_norm.weight", (self.hidden,), GGML_F32),
                      (f"blk.{i}.attn_q.weight", (self.hidden, self.hidden), GGML_BF16),
                      (f"blk.{i}.attn_k.weight", (kv, self.hidden), GGML_BF16),
                      (f"blk.{i}.attn_v.weight", (kv, self.hidden), GGML_BF16),
                      (f"blk.{i}.attn_output.weight", (self.hidden, self.hidden), GGML_BF16),
                      (f"blk.{i}.ffn_norm.weight", (self.hidden,), GGML_F32),
                      (f"blk.{i}.ffn_gate.weight", (self.mlp, self.hidden), GGML_BF16),
                      (f"blk.{i}.ffn_up.weight", (self.mlp, self.hidden), GGML_BF16),
                      (f"blk.{i}.ffn_down.weight", (self.hidden, self.mlp), GGML_BF16)]
        return found

    def metadata(self) -> dict[str, int | float | str]:
        """The GGUF key-values llama.cpp needs to load it (no tokenizer: ``none`` with dummy tokens)."""
        return {"general.architecture": "llama", "general.name": "phi4-mini-shape-random",
                "llama.context_length": 131_072, "llama.embedding_length": self.hidden,
                "llama.block_count": self.layers, "llama.feed_forward_length": self.mlp,
                "llama.attention.head_count": self.heads, "llama.attention.head_count_kv": self.kv_heads,
                "llama.rope.dimension_count": self.hidden // self.heads,
                "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": self.vocab,
                "tokenizer.ggml.model": "none"}


def _string(out: BinaryIO, text: str) -> None:
    data = text.encode()
    out.write(struct.pack("<Q", len(data)) + data)


def _value(out: BinaryIO, value: int | float | str) -> None:
    if isinstance(value, str):
        out.write(struct.pack("<I", GGUF_STRING))
        _string(out, value)
    elif isinstance(value, float):
        out.write(struct.pack("<If", GGUF_FLOAT32, value))
    else:
        out.write(struct.pack("<II", GGUF_UINT32, value))


def _pad(out: BinaryIO) -> None:
    out.write(b"\0" * (-out.tell() % GGUF_ALIGNMENT))


def write_gguf(path: Path, shape: LlamaShape, seed: int = 0) -> int:
    """Write a random-weight bfloat16 GGUF (version 3) of ``shape`` to ``path``; returns the weight bytes."""
    generator = torch.Generator().manual_seed(seed)
    tensors = shape.tensors()
    sizes = [torch.Size(dims).numel() * (4 if kind == GGML_F32 else 2) for _, dims, kind in tensors]
    metadata = shape.metadata()
    with open(path, "wb") as out:
        out.write(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
        for key, value in metadata.items():
            _string(out, key)
            _value(out, value)
        offset = 0
        for (name, dims, kind), size in zip(tensors, sizes, strict=True):
            _string(out, name)
            out.write(struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *reversed(dims)))
            out.write(struct.pack("<IQ", kind, offset))
            offset += size + (-size % GGUF_ALIGNMENT)
        _pad(out)
        for _, dims, kind in tensors:
            if kind == GGML_F32:
                data = torch.ones(dims)
            else:  # the scale of a trained model's weights; the values do not change the speed
                data = (torch.randn(dims, generator=generator) * 0.02).to(torch.bfloat16).view(torch.int16)
            out.write(data.numpy().tobytes())
            _pad(out)
    return sum(sizes)


def read_gguf_header(path: Path) -> tuple[dict[str, int | float | str], dict[str, tuple[tuple[int, ...], int]]]:
    """The key-values and tensor infos (name -> (shape in PyTorch's order, ggml type)) of a GGUF written above."""
    with open(path, "rb") as f:
        def unpack(fmt: str) -> tuple:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))

        def string() -> str:
            return f.read(unpack("<Q")[0]).decode()

        magic, version, n_tensors, n_kv = f.read(4), *unpack("<IQQ")
        if magic != b"GGUF" or version != 3:
            raise ValueError(f"{path}: not a version-3 GGUF file")
        metadata: dict[str, int | float | str] = {}
        for _ in range(n_kv):
            key, kind = string(), unpack("<I")[0]
            metadata[key] = {GGUF_STRING: string, GGUF_UINT32: lambda: unpack("<I")[0],
                             GGUF_FLOAT32: lambda: unpack("<f")[0]}[kind]()
        infos = {}
        for _ in range(n_tensors):
            name, n_dims = string(), unpack("<I")[0]
            dims = unpack(f"<{n_dims}Q")
            kind, _offset = unpack("<IQ")
            infos[name] = (tuple(reversed(dims)), kind)
    return metadata, infos


def llama_decode(bench: Path, model: Path, context: int, tokens: int, threads: int) -> float:
    """llama-bench's generation tokens/s after ``context`` tokens of cache (one repetition after its warm-up)."""
    command = [str(bench), "-m", str(model), "-p", "0", "-n", str(tokens), "-d", str(context), "-t", str(threads),
               "-r", "1", "-o", "json"]
    return parse_llama_bench(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def parse_llama_bench(stdout: str) -> float:
    """The tokens/s of the one test in ``llama-bench -o json`` output."""
    results = json.loads(stdout)
    if len(results) != 1:
        raise ValueError(f"expected one llama-bench test, got {len(results)}")
    return float(results[0]["avg_ts"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp build folder (has bin/llama-bench)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/phi4flash-llamacpp"), help="where GGUFs go")
    parser.add_argument("--formats", default="bf16,q8_0,q4_0", help=f"llama.cpp formats, of {sorted(PAIRS)}")
    parser.add_argument("--contexts", default="32,2048")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="phi4flash also through the compiled step")
    args = parser.parse_args()
    formats = args.formats.split(",")
    if unknown := [f for f in formats if f not in PAIRS]:
        raise SystemExit(f"unknown llama.cpp format(s) {unknown}: choose from {sorted(PAIRS)}")
    bench, quantize = args.llama_cpp / "bin" / "llama-bench", args.llama_cpp / "bin" / "llama-quantize"
    for binary in (bench, quantize):
        if not binary.exists():
            raise SystemExit(f"{binary} not found: build llama.cpp as this script's help says (--help)")
    # imported only now, so that a wrong argument is named at once
    from bench_quant import REAL_CONFIG, decode_rate, float_model, quantized_copy  # benchmarks/ is on sys.path

    from phi4flash import Phi4FlashConfig
    from phi4flash.compiled import CompiledDecoder
    from phi4flash.quant import QuantSpec, model_weight_bytes

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = args.workdir / "bf16.gguf"
    if not source.exists():
        started = time.perf_counter()
        write_gguf(source, LlamaShape())
        print(f"# wrote {source} in {time.perf_counter() - started:.0f} s", flush=True)
    ggufs = {}
    for name in formats:
        ggufs[name] = args.workdir / f"{name}.gguf"
        if not ggufs[name].exists():
            subprocess.run([str(quantize), str(source), str(ggufs[name]), name.upper(), str(args.threads)],
                           check=True, capture_output=True)
    base = float_model(Phi4FlashConfig.from_json(REAL_CONFIG))
    ours = {}
    for name in dict.fromkeys(PAIRS[f] for f in formats):
        ours[name] = base if name == "bfloat16" else quantized_copy(base, QuantSpec.parse(name))
    if "bfloat16" not in ours:
        del base
    compiled = {}
    if args.compile:
        for name, model in ours.items():
            decoder = CompiledDecoder(model)
            if not decoder.compile(1, 64):
                raise SystemExit(f"{name}: the decode step did not compile: {decoder.error}")
            compiled[name] = decoder
    contexts = [int(c) for c in args.contexts.split(",")]
    runs: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for context in contexts:
            for name in formats:
                runs.setdefault((f"llama.cpp {name}", context), []).append(
                    llama_decode(bench, ggufs[name], context, args.decode_tokens, args.threads))
            for name, model in ours.items():
                runs.setdefault((f"phi4flash {name}", context), []).append(
                    decode_rate(model, context, args.decode_tokens))
                if name in compiled:
                    runs.setdefault((f"phi4flash {name} compiled", context), []).append(
                        decode_rate(model, context, args.decode_tokens, compiled[name]))
    weight_bytes = {f"llama.cpp {name}": ggufs[name].stat().st_size for name in formats}
    for name, model in ours.items():
        weight_bytes[f"phi4flash {name}"] = weight_bytes[f"phi4flash {name} compiled"] = model_weight_bytes(model)
    print(f"\n# {args.threads} threads, {args.decode_tokens} tokens per measurement, best of {args.rounds} "
          "interleaved rounds (spread = worst / best)\n")
    head = "| model | GB per token |" + "".join(f" tok/s @{c} | GB/s @{c} |" for c in contexts)
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    best = {key: max(values) for key, values in runs.items()}
    for label in dict.fromkeys(label for label, _ in runs):
        row = f"| {label} | {weight_bytes[label] / 1e9:.2f} |"
        for c in contexts:
            spread = max(runs[(label, c)]) / min(runs[(label, c)])
            row += f" {best[(label, c)]:.2f} ({spread:.2f}x) | {weight_bytes[label] * best[(label, c)] / 1e9:.1f} |"
        print(row)
    print("\n| phi4flash / llama.cpp | " + " | ".join(f"tok/s @{c} | GB/s @{c}" for c in contexts) + " |")
    print("|---|" + "---|---|" * len(contexts))
    for name in formats:
        theirs = f"llama.cpp {name}"
        for label in (f"phi4flash {PAIRS[name]}", f"phi4flash {PAIRS[name]} compiled"):
            if (label, contexts[0]) not in best:
                continue
            row = f"| {label} / {name} |"
            for c in contexts:
                ratio = best[(label, c)] / best[(theirs, c)]
                row += f" {ratio:.2f}x | {ratio * weight_bytes[label] / weight_bytes[theirs]:.2f}x |"
            print(row)
    print("\n" + json.dumps({f"{k[0]} @{k[1]}": [round(x, 3) for x in v] for k, v in runs.items()}))


if __name__ == "__main__":
    main()
