"""The same app on Ray Serve: two replicas on a local, loopback-only Ray instance answer requests."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from _process import free_port

from phi4flash import GenerationConfig

from .server_helpers import MODEL_SOURCE

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'phi4flash[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'phi4flash[ray]'")


@pytest.mark.timeout(600)
def test_two_replicas_answer(engine: Any) -> None:
    from phi4flash.server.ray_app import build_app

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    try:
        port = free_port()  # after Ray has started its processes, which take ports too
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": MODEL_SOURCE, "replicas": 2, "max_batch": 4, "replica_cpus": 1}),
                  name="phi4flash", route_prefix="/")
        deployment = serve.status().applications["phi4flash"].deployments["phi4flash"]
        assert deployment.replica_states.get("RUNNING") == 2

        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/health", timeout=30).json()["status"] == "ok"
        model_id = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        conversations = [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(6)]

        def ask(messages: list[dict[str, str]]) -> dict[str, Any]:
            r = httpx.post(f"{base}/v1/chat/completions", timeout=300,
                           json={"model": model_id, "messages": messages, "temperature": 0, "max_tokens": 6})
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(len(conversations)) as pool:
            answers = list(pool.map(ask, conversations))
        config = GenerationConfig(temperature=0.0, max_new_tokens=6)
        for messages, got in zip(conversations, answers, strict=True):
            want = engine.generate(messages, config)
            message = got["choices"][0]["message"]
            assert (message.get("reasoning_content") or "", message["content"]) == (want.reasoning, want.answer)
            assert got["usage"]["completion_tokens"] == want.usage.completion_tokens
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.timeout(300)
def test_a_port_ray_serve_cannot_bind_shuts_its_ray_down() -> None:
    from phi4flash.server.ray_app import serve_with_ray

    port = free_port()
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", port))
        other_server.listen()
        with pytest.raises(Exception, match=f"127.0.0.1:{port}"):
            serve_with_ray(model=MODEL_SOURCE, replicas=1, port=port)
    assert not ray.is_initialized()
