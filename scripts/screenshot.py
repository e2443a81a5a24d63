"""Make docs/screenshot.png: the web chat on the embedded model, in Debian chromium, after one answered question.

    .venv/bin/python scripts/screenshot.py [--out docs/screenshot.png]

The picture the README and docs/web-chat.md show. Tests never write it (they keep their screenshots in
temporary folders); run this after a change to the page's look.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def main(argv: list[str] | None = None) -> int:
    """Launch the chat, ask the example the embedded model answers, and save the page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png", help="where to write the PNG")
    parser.add_argument("--chromium", default=CHROMIUM, help="the chromium binary")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from playwright.sync_api import sync_playwright

    import phi4flash
    from phi4flash_demo import CSS, build_demo
    from phi4flash_demo.app import EXAMPLES

    app = build_demo(phi4flash.load("embedded"))
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, css=CSS)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--headless", "--no-sandbox",
                                                                              "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(app.local_url)
            page.wait_for_selector("#input textarea")
            page.get_by_text("Settings", exact=True).first.click()
            for label, value in (("Temperature (0 = greedy)", 0), ("Max new tokens", 512)):
                box = page.locator(f'input[aria-label="number input for {label}"]')
                box.fill(str(value))
                box.press("Enter")
            page.get_by_label("Seed (-1 = random)").fill("0")
            page.get_by_text("Settings", exact=True).first.click()  # folded away for the picture
            page.fill("#input textarea", EXAMPLES[2])
            page.keyboard.press("Enter")
            page.wait_for_selector('#stats [data-phase^="done"]')
            page.wait_for_function("document.querySelectorAll('#chatbot .loading-spinner').length === 0")
            page.evaluate("window.scrollTo(0, 0)")
            page.wait_for_timeout(500)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            browser.close()
    finally:
        app.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
