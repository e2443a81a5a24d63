"""The web chat in a real browser: Playwright driving Debian chromium against the launched app."""

from __future__ import annotations

import shutil
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
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshot.png"


@pytest.fixture
def page(url: str) -> Any:
    """A fresh page on the chat (a new browser context: its own history and session)."""
    yield from _page(url)


@pytest.fixture
def long_page(long_url: str) -> Any:
    """A fresh page on the chat whose generations run to max new tokens."""
    yield from _page(long_url)


def _page(url: str) -> Any:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.wait_for_selector("#input textarea")
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

    page.get_by_text("Settings", exact=True).first.click()  # fold the settings away for the picture
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(300)
    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot))
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)


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
        page.locator("#input button.stop-button").click(timeout=5_000)
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
