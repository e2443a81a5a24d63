"""The llama.cpp comparison's own parts: the GGUF it writes, llama-bench's output, its errors; llama.cpp itself
when a build is named by PHI4FLASH_LLAMA_CPP (not on CI: building it takes longer than the suite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_llamacpp  # noqa: E402

TINY = bench_llamacpp.LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, mlp=160, vocab=300)


def test_the_gguf_holds_every_weight_at_its_shape_aligned(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    weight_bytes = bench_llamacpp.write_gguf(path, TINY)
    metadata, infos = bench_llamacpp.read_gguf_header(path)
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.attention.head_count_kv"] == 2 and metadata["llama.vocab_size"] == 300
    assert metadata["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert infos["token_embd.weight"] == ((300, 64), bench_llamacpp.GGML_BF16)
    assert infos["blk.1.attn_k.weight"] == ((32, 64), bench_llamacpp.GGML_BF16)
    assert infos["blk.1.ffn_down.weight"] == ((64, 160), bench_llamacpp.GGML_BF16)
    assert infos["output_norm.weight"] == ((64,), bench_llamacpp.GGML_F32)
    assert "output.weight" not in infos  # tied, as Phi-4-mini's
    assert len(infos) == 2 + 9 * TINY.layers
    parameters = 300 * 64 + 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 160)
    assert weight_bytes == 2 * parameters + 4 * 64 * (1 + 2 * TINY.layers)
    # the data region ends the file: every tensor padded to the alignment, the last one included
    padded = sum(size + (-size % 32) for size in (torch.Size(d).numel() * (4 if k == 0 else 2)
                                                   for d, k in infos.values()))
    data = path.read_bytes()[-padded:]
    embedding = torch.frombuffer(bytearray(data[:300 * 64 * 2]), dtype=torch.bfloat16).float()
    assert 0.015 < embedding.std().item() < 0.025


def test_llama_bench_output_is_read_and_anything_else_refused() -> None:
    one = [{"n_prompt": 0, "n_gen": 16, "n_depth": 2048, "avg_ts": 7.25, "stddev_ts": 0.1}]
    assert bench_llamacpp.parse_llama_bench(json.dumps(one)) == 7.25
    with pytest.raises(ValueError, match="expected one llama-bench test, got 2"):
        bench_llamacpp.parse_llama_bench(json.dumps(one * 2))


def test_a_missing_build_and_an_unknown_format_are_named(tmp_path: Path) -> None:
    script = str(ROOT / "benchmarks" / "bench_llamacpp.py")
    result = subprocess.run([sys.executable, script, "--llama-cpp", str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "llama-bench not found: build llama.cpp" in result.stderr
    result = subprocess.run([sys.executable, script, "--llama-cpp", str(tmp_path), "--formats", "q4_0,q3_k"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "unknown llama.cpp format(s) ['q3_k']" in result.stderr


@pytest.mark.skipif(not os.environ.get("PHI4FLASH_LLAMA_CPP"), reason="set PHI4FLASH_LLAMA_CPP to a llama.cpp build")
def test_llama_cpp_loads_quantizes_and_runs_the_gguf(tmp_path: Path) -> None:
    build = Path(os.environ["PHI4FLASH_LLAMA_CPP"])
    source, quantized = tmp_path / "bf16.gguf", tmp_path / "q8_0.gguf"
    bench_llamacpp.write_gguf(source, bench_llamacpp.LlamaShape(hidden=256, layers=2, heads=4, kv_heads=2,
                                                                 mlp=512, vocab=1024))
    subprocess.run([str(build / "bin" / "llama-quantize"), str(source), str(quantized), "Q8_0"], check=True,
                   capture_output=True)
    for model in (source, quantized):
        assert bench_llamacpp.llama_decode(build / "bin" / "llama-bench", model, 64, 8, 1) > 0
