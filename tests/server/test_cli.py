"""`phi4flash serve` as a real process: loads, binds loopback and serves; a model that cannot load ends it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest
from _process import stop

from .server_helpers import MODEL_SOURCE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_serve_command_serves_the_embedded_model() -> None:
    openai = pytest.importorskip("openai")
    port = _free_port()
    cmd = [sys.executable, "-m", "phi4flash.server.cli", "--model", MODEL_SOURCE, "--port", str(port),
           "--api-key", "cli-key", "--max-batch", "2", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        statuses = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                statuses.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if statuses[-1] == 200:
                break
            assert statuses[-1] == 503  # loading
            time.sleep(0.1)
        assert statuses and statuses[-1] == 200
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0)
        model_id = client.models.list().data[0].id
        r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}],
                                           temperature=0, max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        stop(proc)
    assert proc.returncode is not None


@pytest.mark.parametrize("background", [False, True])
def test_a_model_that_cannot_load_ends_the_command_with_its_error(tmp_path, background: bool) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "phi4flash", "serve", "--model", str(tmp_path / "nonexistent"), "--port", str(port)]
    result = subprocess.run(cmd + (["--load-in-background"] if background else []), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert f"cannot load the model '{tmp_path / 'nonexistent'}'" in result.stderr
    assert "neither a checkpoint folder nor a hub id" in result.stderr
    assert "Traceback" not in result.stderr.split("phi4flash serve: cannot load")[-1]


def test_bad_arguments_exit_2() -> None:
    from phi4flash.server.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--max-batch", "0"])
    assert e.value.code == 2
