"""The Hugging Face Space's app.py builds its demo on a machine without a GPU and without `spaces`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gradio")

ROOT = Path(__file__).resolve().parents[2]
SPACE = ROOT / "spaces"

# Runs in a fresh interpreter: `spaces` made unimportable, CUDA hidden, then app.py executed as a module.
PROBE = r"""
import json, runpy, sys
sys.modules["spaces"] = None  # import spaces -> ImportError, as on a machine without it
ns = runpy.run_path(sys.argv[1], run_name="space_app")
import gradio as gr
engine = ns["engine"]
print(json.dumps({
    "spaces": ns["spaces"] is None,
    "source": ns["MODEL_SOURCE"],
    "blocks": isinstance(ns["demo"], gr.Blocks),
    "engine_error": repr(engine) if isinstance(engine, BaseException) else None,
    "endpoints": sorted(d.get("api_name") or "" for d in ns["demo"].config["dependencies"]
                        if d.get("api_visibility", "public") == "public"),
    "durations": [ns["gpu_seconds"](n) for n in (1, 1024, 4096, 32768, 10**6)],
}))
"""


def test_space_app_builds_without_gpu_and_without_spaces() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("SPACES_ZERO_GPU", None)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(SPACE / "app.py")], cwd=SPACE, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["spaces"] and result["blocks"]
    assert result["source"] == "embedded"
    assert result["engine_error"] is None, result["engine_error"]
    assert "chat" in result["endpoints"]
    durations = result["durations"]
    assert durations == sorted(durations) and 0 < durations[0] and durations[-1] <= 300


def test_space_metadata_and_requirements() -> None:
    readme = (SPACE / "README.md").read_text(encoding="utf-8")
    front = readme.split("---")[1]
    for line in ("sdk: gradio", "sdk_version: 6.31.0", "app_file: app.py", "- microsoft/Phi-4-mini-flash-reasoning"):
        assert line in front, line
    assert "python_version:" in front
    requirements = (SPACE / "requirements.txt").read_text(encoding="utf-8")
    assert "phi4flash[demo] @ git+https://" in requirements
