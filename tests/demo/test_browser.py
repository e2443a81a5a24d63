"""The web chat in a real browser: Playwright driving Debian chromium against the launched app."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from demo_helpers import number, parse_stats

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="Debian chromium is missing at /usr/bin/chromium (apt-get install -y chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (test extra)")

from phi4flash_demo.app import EXAMPLES  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NO_SPINNER = "document.querySelectorAll('#chatbot .loading-spinner').length === 0"
# Visible copy/retry/undo rows in each reply of the chat.
BUTTON_ROWS = """() => Array.from(document.querySelectorAll('#chatbot .bot-row')).map(row =>
    Array.from(row.querySelectorAll('.message-buttons')).filter(b => b.offsetParent !== null).length)"""


@pytest.fixture
def page(url: str) -> Any:
    """A fresh page on the chat (a new browser context: its own history and session)."""
    yield from _page(url)


@pytest.fixture
def long_page(long_url: str) -> Any:
    """A fresh page on the chat whose generations run to max new tokens."""
    yield from _page(long_url)


@pytest.fixture(scope="module")
def error_url() -> Any:
    """The page of a model that failed to load, with a long unbroken message (a path, a traceback line)."""
    from phi4flash_demo import CSS, build_error_demo

    long_path = "/models/" + "a-very-long-folder-name/" * 12 + "model.safetensors"
    app = build_error_demo(OSError(f"{long_path} ({4_449_396:,} bytes) is damaged or incomplete"))
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, css=CSS)
    yield app.local_url
    app.close()


def _page(url: str, ready: str = "#input textarea") -> Any:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.wait_for_selector(ready)
            yield page
        finally:
            browser.close()


def _open_settings(page: Any) -> None:
    if not page.locator('input[aria-label="number input for Max new tokens"]').is_visible():
        page.get_by_text("Settings", exact=True).first.click()
        page.wait_for_selector('input[aria-label="number input for Max new tokens"]')


def _settings(page: Any, *, temperature: float, max_new_tokens: int, seed: int) -> None:
    _open_settings(page)
    for label, value in (("number input for Temperature (0 = greedy)", temperature),
                         ("number input for Max new tokens", max_new_tokens)):
        box = page.locator(f'input[aria-label="{label}"]')
        box.fill(str(value))
        box.press("Enter")
    seed_box = page.get_by_label("Seed (-1 = random)")
    seed_box.fill(str(seed))
    seed_box.press("Tab")


def _ask(page: Any, text: str) -> None:
    page.fill("#input textarea", text)
    page.keyboard.press("Enter")


def _stats(page: Any) -> dict[str, str]:
    return parse_stats(page.locator("#stats").inner_html())


def test_question_streams_thinking_then_answer_with_latency_panel(page: Any, engine: Any, tmp_path: Path) -> None:
    _settings(page, temperature=0, max_new_tokens=512, seed=0)
    _ask(page, EXAMPLES[2])  # one the embedded model can answer, for the picture
    page.wait_for_selector("#chatbot .thought-group .loading-spinner", timeout=20_000)  # live thinking: spinner
    page.wait_for_selector('#stats [data-phase^="done"]')
    stats = _stats(page)
    # Wait on the chatbot, not the panel: the last chat update may render after the panel's.
    if stats["finish"] == "stop":
        page.wait_for_function("document.querySelectorAll('#chatbot .bot.message').length >= 1")

    prompt = number(stats["prompt"])
    assert prompt == engine.count_tokens([{"role": "user", "content": EXAMPLES[2]}])
    generated = number(stats["reasoning"]) + number(stats["answer"])
    assert 0 < generated <= 512
    assert number(stats["context"].split("/")[0]) == prompt + generated
    assert 0 < number(stats["ttft"]) < 60_000  # ms
    assert number(stats["prefill"]) > 0 and 0 < number(stats["decode"]) < 100_000
    assert 0 < number(stats["total"]) < 600
    assert stats["finish"] in ("stop", "length") and engine.dtype in stats["device"]
    page.wait_for_function(NO_SPINNER, timeout=10_000)  # the spinner ended
    assert page.locator("#chatbot .thought-group").first.inner_text().startswith("Thought")
    assert page.locator("#stats svg.p4f-spark").count() == 1

    assert page.evaluate(BUTTON_ROWS) == [1]  # one copy/retry/undo row for the reply, not one per message
    page.screenshot(path=str(tmp_path / "chat.png"))  # docs/screenshot.png is made by scripts/screenshot.py

    page.get_by_role("button", name="New chat").click()
    page.wait_for_selector('#stats [data-phase="idle"]', timeout=10_000)
    assert _stats(page)["finish"] == "–" and _stats(page)["reasoning"] == "0"


def test_a_blank_message_is_refused_before_it_enters_the_chat(page: Any) -> None:
    _ask(page, "   ")
    page.get_by_text("Type a question first").first.wait_for(timeout=10_000)
    assert page.locator("#chatbot .user-row").count() == 0  # no empty bubble
    assert "__i18n__" not in page.inner_text("body")  # nor a nameless chat in the history list
    _settings(page, temperature=0, max_new_tokens=64, seed=0)
    _ask(page, "What is 2 + 3?")  # the next message goes through
    page.wait_for_selector('#stats [data-phase^="done"]', timeout=60_000)
    assert page.locator("#chatbot .user-row").count() == 1


def test_the_load_error_page_wraps_a_long_message(error_url: str) -> None:
    for page in _page(error_url, "#load-error"):
        page.wait_for_selector("#load-error pre")
        widths = page.evaluate("""() => ({page: document.documentElement.scrollWidth, view: window.innerWidth,
            block: document.querySelector('#load-error pre').scrollWidth,
            box: document.querySelector('#load-error pre').clientWidth})""")
        assert widths["page"] <= widths["view"] and widths["block"] <= widths["box"], widths


def test_stop_button_stops_the_generation(long_page: Any, long_demo: Any, tmp_path: Path) -> None:
    page, runtime = long_page, long_demo.phi4flash_runtime
    _open_settings(page)
    limit = int(page.locator('input[aria-label="number input for Max new tokens"]').get_attribute("max") or 4096)
    for seed in (1, 2, 3):  # a trained model may finish before the click: try another sample
        done_before = len(runtime.finished)
        _settings(page, temperature=1.0, max_new_tokens=limit, seed=seed)
        _ask(page, EXAMPLES[1])
        deadline = time.monotonic() + 30
        while not runtime.active and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # let it decode a little
        try:
            page.locator("#input button.stop-button").click(timeout=5_000)
        except sync_api.TimeoutError:  # the button went away: only right if the answer ended before the click
            assert not runtime.active, "the Stop button could not be clicked while the engine was generating"
            page.wait_for_function(NO_SPINNER, timeout=10_000)
            continue
        deadline = time.monotonic() + 5
        while len(runtime.finished) == done_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(runtime.finished) == done_before + 1, "the engine did not end the generation after Stop"
        if runtime.finished[-1].finish_reason == "cancelled":
            break
    assert runtime.finished[-1].finish_reason == "cancelled"
    page.wait_for_selector('#stats [data-phase="stopped"]', timeout=10_000)
    assert _stats(page)["finish"] == "cancelled"
    page.wait_for_function(NO_SPINNER, timeout=10_000)
    page.screenshot(path=str(tmp_path / "stopped.png"))

    # The next message works at once.
    _settings(page, temperature=0, max_new_tokens=32, seed=0)
    _ask(page, "What is 2 + 3?")
    page.wait_for_selector('#stats [data-phase^="done"]', timeout=60_000)
