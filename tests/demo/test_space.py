"""The Hugging Face Space: app.py builds its demo on a machine without a GPU and without `spaces`, and the
folder `phi4flash space build` writes starts in a clean virtual environment from its requirements.txt alone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest
from _process import free_port, stop

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


def test_space_metadata() -> None:
    readme = (SPACE / "README.md").read_text(encoding="utf-8")
    front = readme.split("---")[1]
    for line in ("sdk: gradio", "sdk_version: 6.31.0", "app_file: app.py", "- microsoft/Phi-4-mini-flash-reasoning"):
        assert line in front, line
    assert "python_version:" in front


@pytest.mark.slow  # about two minutes, most of it pip installing torch and gradio into the fresh environment
@pytest.mark.timeout(900)
def test_the_built_space_starts_from_its_requirements_alone(tmp_path: Path) -> None:
    """What Hugging Face does with the folder: a fresh Python, `pip install -r requirements.txt`, `python app.py`."""
    gradio_client = pytest.importorskip("gradio_client")
    from phi4flash_demo.space import build_space

    out = build_space(tmp_path / "space")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "app.py", "phi4flash", "phi4flash_demo",
                                                     "requirements.txt"]
    assert (out / "phi4flash" / "embedded" / "model.safetensors").is_file()
    requirements = (out / "requirements.txt").read_text(encoding="utf-8")
    assert "phi4flash" not in requirements.replace("# phi4flash", "").split("\n", 2)[-1]  # nothing from elsewhere
    with pytest.raises(FileExistsError, match="--force"):
        build_space(out)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    pip = [python, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check"]
    # The CPU torch wheel first, as scripts/setup.sh does (a GPU Space resolves torch>=2.4 to its CUDA build).
    for args in (["torch==2.13.0"], ["-r", str(out / "requirements.txt")]):
        done = subprocess.run(pip + args, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]

    port = free_port()
    # PHI4FLASH_NATIVE=0: a fresh environment would build phi4flash's C++ kernels on first use (minutes here;
    # they are tested elsewhere in the suite), so this app runs the pure PyTorch path.
    env.update(GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", GRADIO_ANALYTICS_ENABLED="False",
               CUDA_VISIBLE_DEVICES="", PHI4FLASH_NATIVE="0")
    app = subprocess.Popen([python, "app.py"], cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 300
        while True:
            assert app.poll() is None, app.stdout.read() if app.stdout else ""
            assert time.monotonic() < deadline, "the Space app did not start listening"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        client = gradio_client.Client(url, verbose=False)
        try:
            messages, stats_html = client.predict("Solve 3x + 5 = 20", api_name="/chat")
        finally:
            client.close()
        assert 'data-metric="finish">stop<' in stats_html and "boxed{5}" in str(messages)
    finally:
        stop(app)
