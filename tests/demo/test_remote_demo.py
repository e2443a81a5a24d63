"""`phi4flash demo --remote`: the API key (flag or environment), the server's model in the header, and a page
that explains a refused key instead of failing every message."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("gradio")
pytest.importorskip("fastapi", reason="the server side of this test needs the 'serve' extra")

from phi4flash.server.app import create_app, serve_in_background  # noqa: E402
from phi4flash_demo import build_demo  # noqa: E402
from phi4flash_demo.cli import load_engine, parse_args  # noqa: E402

KEY = "demo-remote-key"


@pytest.fixture(scope="module")
def api_root(engine: Any) -> Iterator[str]:
    with serve_in_background(create_app(engine, api_key=KEY, model_name="phi4flash-served")) as url:
        yield f"{url}/v1"


@pytest.fixture
def no_key_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("PHI4FLASH_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("how", ["flag", "PHI4FLASH_API_KEY", "OPENAI_API_KEY"])
def test_the_key_comes_from_the_flag_or_the_environment(api_root: str, engine: Any, no_key_env: Any,
                                                        how: str) -> None:
    argv = ["--remote", api_root]
    if how == "flag":
        argv += ["--api-key", KEY]
    else:
        no_key_env.setenv(how, KEY)
    remote = load_engine(parse_args(argv))
    assert not isinstance(remote, BaseException), remote
    assert remote.model_name == "phi4flash-served" and remote.dtype == engine.dtype
    header = str(build_demo(remote).config)
    assert "`phi4flash-served` · remote " + api_root in header and f"· {engine.dtype} ·" in header
    reply = remote.generate([{"role": "user", "content": "What is 2 + 3?"}])
    assert reply.finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0


def test_a_missing_or_wrong_key_gets_a_page_that_says_so(api_root: str, no_key_env: Any) -> None:
    for argv in (["--remote", api_root], ["--remote", api_root, "--api-key", "wrong"],
                 ["--remote", api_root, "--api-key", KEY, "--model", "other"]):
        error = load_engine(parse_args(argv))
        assert isinstance(error, Exception), argv
        page = str(build_demo(error).config)
        assert "The model failed to load" in page and "--api-key" in page
    assert "401" in str(load_engine(parse_args(["--remote", api_root])))
    assert "serves 'phi4flash-served'" in str(error)
