"""`phi4flash serve` as a real process: loads, binds loopback and serves; a model that cannot load ends it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest
from _process import free_port, stop

from .server_helpers import MODEL_SOURCE


@pytest.mark.timeout(300)
def test_serve_command_serves_the_embedded_model() -> None:
    openai = pytest.importorskip("openai")
    port = free_port()
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
    port = free_port()
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


@pytest.mark.parametrize("ray", [False, True])
def test_a_port_in_use_ends_the_command_before_the_model_loads(capsys, ray: bool) -> None:
    from phi4flash.server.cli import main

    port = free_port()
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", port))
        other_server.listen()
        # A model that cannot load would end the command with another message: the port is checked first.
        code = main(["--model", "/nonexistent", "--port", str(port)] + (["--ray"] if ray else []))
    assert code == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert "pick another --port" in err
    assert "cannot load" not in err


def test_a_host_that_is_not_this_machines_ends_the_command() -> None:
    from phi4flash.server.cli import _cannot_listen

    assert _cannot_listen("127.0.0.1", free_port()) is None
    assert "is not an address of this machine" in (_cannot_listen("no-such-host.invalid", 8000) or "")


def test_joining_a_ray_cluster_leaves_the_port_to_its_proxy(monkeypatch) -> None:
    from phi4flash.server.cli import _listens_here, build_parser

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _listens_here(build_parser().parse_args([]))
    assert _listens_here(build_parser().parse_args(["--ray"]))
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # a running cluster, whose Serve may already listen on the port
    assert not _listens_here(build_parser().parse_args(["--ray"]))
    assert _listens_here(build_parser().parse_args([]))
