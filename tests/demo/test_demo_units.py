"""The web chat's pure parts: history normalisation, the latency panel, the error page, the CLI options."""

from __future__ import annotations

import pytest
from demo_helpers import number, parse_stats

gr = pytest.importorskip("gradio")

from phi4flash import LatencyMetrics  # noqa: E402
from phi4flash_demo import build_demo, build_error_demo  # noqa: E402
from phi4flash_demo.app import finalize_stopped, format_context, history_to_messages, render_stats  # noqa: E402
from phi4flash_demo.cli import parse_args  # noqa: E402


def test_history_from_the_browser_and_from_the_api_give_the_same_messages() -> None:
    browser = [
        {"role": "user", "content": [{"type": "text", "text": "Solve x + 1 = 3"}], "metadata": None},
        {"role": "assistant", "content": [{"type": "text", "text": "x minus..."}],
         "metadata": {"title": "Thought · 12 tokens", "status": "done"}},
        {"role": "assistant", "content": [{"type": "text", "text": "x = 2"}], "metadata": None},
        {"role": "user", "content": [{"type": "text", "text": "too long text"}], "metadata": None},
        {"role": "assistant", "content": "cannot", "metadata": {"title": "⚠️ Cannot answer"}},
        {"role": "user", "content": [{"type": "text", "text": "And x + 2 = 3?"}], "metadata": None},
        {"role": "assistant", "content": [{"type": "text", "text": "x = 1"}], "metadata": {}},
    ]
    api = [{**m, "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
           for m in browser]
    expected = [
        {"role": "user", "content": "Solve x + 1 = 3"},
        {"role": "assistant", "content": "x = 2"},
        {"role": "user", "content": "And x + 2 = 3?"},  # the unanswered turn before it is dropped
        {"role": "assistant", "content": "x = 1"},
    ]
    assert history_to_messages(browser) == expected
    assert history_to_messages(api) == expected


def test_a_trailing_unanswered_question_is_dropped() -> None:
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "thinking", "metadata":
                                                   {"title": "Thinking (stopped)", "status": "done"}}]
    assert history_to_messages(history) == []


def test_latency_panel_shows_the_engine_numbers() -> None:
    m = LatencyMetrics(prompt_tokens=1200, reused_prompt_tokens=1000, reasoning_tokens=30, answer_tokens=4,
                       time_to_first_token_s=0.25, prefill_tokens_per_s=800.0, decode_tokens_per_s=41.5,
                       decode_tokens_per_s_recent=40.0, total_time_s=1.5, finish_reason="stop",
                       context_length=65536, device="cuda:0", dtype="bfloat16",
                       decode_tokens_per_s_history=[38.0, 41.0, 40.0])
    stats = parse_stats(render_stats(m, "done (stop)", active=3))
    assert stats["phase"] == "done (stop)"
    assert number(stats["ttft"]) == 250 and number(stats["prefill"]) == 800
    assert number(stats["decode"]) == 41.5  # the average once finished
    assert stats["context"] == "1,234 / 64K" and stats["reused"] == "1,000"
    assert stats["device"] == "cuda:0 · bfloat16" and stats["active"] == "3"
    assert "<polyline" in render_stats(m, "done")
    live = parse_stats(render_stats(LatencyMetrics(decode_tokens_per_s=41.5, decode_tokens_per_s_recent=40.0),
                                    "thinking…"))
    assert number(live["decode"]) == 40.0 and live["finish"] == "–"
    assert format_context(4096) == "4K" and format_context(5000) == "5,000"


def test_stop_finalizer_ends_the_spinner_and_keeps_the_partial_answer() -> None:
    history = [{"role": "user", "content": "q"},
               {"role": "assistant", "content": "so far", "metadata": {"title": "Thinking", "status": "pending"}}]
    new_history, stats_html = finalize_stopped(history, render_stats(LatencyMetrics(reasoning_tokens=5), "thinking…"))
    assert new_history[1]["metadata"]["status"] == "done" and new_history[1]["content"] == "so far"
    assert "stopped" in new_history[1]["metadata"]["title"]
    stats = parse_stats(stats_html)
    assert stats["phase"] == "stopped" and stats["finish"] == "cancelled" and stats["reasoning"] == "5"


def test_a_model_that_failed_to_load_gets_a_page_that_says_why() -> None:
    for demo in (build_demo(FileNotFoundError("no checkpoint in /models/x")),
                 build_error_demo(FileNotFoundError("no checkpoint in /models/x"))):
        text = str(demo.config)
        assert "FileNotFoundError: no checkpoint in /models/x" in text
        assert "How to fix it" in text and "--model embedded" in text


def test_cli_defaults_and_options() -> None:
    args = parse_args([])
    assert (args.model, args.remote, args.host, args.port, args.share) == (None, None, "127.0.0.1", None, False)
    args = parse_args(["--model", "microsoft/Phi-4-mini-flash-reasoning", "--remote", "http://h:8000", "--host",
                       "0.0.0.0", "--port", "7861", "--share"])
    assert (args.model, args.remote, args.host, args.port, args.share) == (
        "microsoft/Phi-4-mini-flash-reasoning", "http://h:8000", "0.0.0.0", 7861, True)


def test_bare_boxed_answers_are_wrapped_for_math_rendering() -> None:
    from phi4flash_demo.app import display_math

    assert display_math(r"x = \boxed{35}") == r"x = $\boxed{35}$"
    assert display_math(r"\boxed{\frac{1}{2}}") == r"$\boxed{\frac{1}{2}}$"
    assert display_math(r"so $\boxed{3}$") == r"so $\boxed{3}$"  # already math: untouched
    assert display_math("no math here") == "no math here"
    # answers with several values box each one: each box renders
    assert display_math(r"x = \boxed{1/2} or x = \boxed{-3}") == r"x = $\boxed{1/2}$ or x = $\boxed{-3}$"
    assert display_math(r"Marketing = \boxed{60}, Sales = \boxed{75}") == (
        r"Marketing = $\boxed{60}$, Sales = $\boxed{75}$")


def test_every_example_card_is_a_problem_the_embedded_model_was_trained_on() -> None:
    from phi4flash.training import data
    from phi4flash_demo.app import EXAMPLES

    assert set(EXAMPLES) <= {d.question for d in data.demo_examples()}


def test_prefill_rate_says_over_how_many_tokens_it_was_measured() -> None:
    fresh = parse_stats(render_stats(LatencyMetrics(prompt_tokens=27, prefill_tokens_per_s=1309.0), "done"))
    assert number(fresh["prefill"]) == 1309
    reused = render_stats(LatencyMetrics(prompt_tokens=27, reused_prompt_tokens=26, prefill_tokens_per_s=66.0), "done")
    assert "Prefill (27 tokens)" in render_stats(LatencyMetrics(prompt_tokens=27), "done")
    assert "Prefill (1 new token)" in reused and number(parse_stats(reused)["prefill"]) == 66


def test_a_failed_turn_shows_the_error_without_an_empty_thought() -> None:
    import phi4flash
    from phi4flash import GenerationConfig
    from phi4flash_demo.app import DemoRuntime, build_turn

    dead = phi4flash.RemoteEngine("http://127.0.0.1:9/v1", "m", context_length=4096, timeout=5)
    updates = list(build_turn(dead, DemoRuntime())([{"role": "user", "content": "hi"}], GenerationConfig()))
    messages, stats_html = updates[-1]
    assert [m.metadata["title"] for m in messages] == ["⚠️ Cannot answer"], messages
    assert "cannot reach" in messages[0].content and parse_stats(stats_html)["phase"] == "error"


def test_system_prompt_has_a_default_in_the_chat_api() -> None:
    import phi4flash

    demo = build_demo(phi4flash.load("embedded"))
    info = demo.get_api_info()["named_endpoints"]["/chat"]["parameters"]
    required = [p["parameter_name"] for p in info if not p["parameter_has_default"]]
    assert required == ["message"], info


def test_a_load_error_is_logged_as_one_clear_line(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """The page explains the failure; the terminal gets the message alone (the traceback only with --debug)."""
    import logging
    import shutil

    from phi4flash.weights import EMBEDDED_DIR
    from phi4flash_demo.cli import load_engine

    shutil.copytree(EMBEDDED_DIR, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with caplog.at_level(logging.DEBUG):
        error = load_engine(parse_args(["--model", str(tmp_path / "ckpt")]))
    assert "damaged or incomplete" in str(error)
    shown = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("phi4flash_demo")]
    assert len(shown) == 1 and not shown[0].exc_info and "--debug" in shown[0].getMessage()
    assert "damaged or incomplete" in shown[0].getMessage()
    assert any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)  # there for --debug
