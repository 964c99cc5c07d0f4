"""A real browser for the step-credit page: Debian's chromium driven by Playwright.

Playwright's own browser download (`playwright install`) is never used: scripts/dev.py
installs Debian's chromium, and these tests skip, naming the reason, where it is missing.
Screenshots go to tests/ui/screenshots/ (gitignored): look at them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
LAUNCH_ARGS = [
    "--headless=new",
    "--no-sandbox",  # root in CI containers; the pages under test are our own
    "--disable-gpu",
    "--disable-dev-shm-usage",  # a small /dev/shm in containers crashes tabs
    "--disable-background-networking",
    "--no-first-run",
    "--disable-extensions",
]


@pytest.fixture(scope="module")
def browser():
    # Module scope, never session: Playwright's sync API keeps its event loop marked running on
    # the main thread while it is open, and every later test that calls asyncio.run would fail.
    # CI sets STEPCREDIT_REQUIRE_BROWSER (.ci/run): there a missing browser fails the run
    # instead of passing it with the browser tests quietly skipped.
    missing = pytest.fail if os.environ.get("STEPCREDIT_REQUIRE_BROWSER") else pytest.skip
    if not CHROMIUM.exists():
        missing(f"chromium is not installed at {CHROMIUM}: `python3 scripts/dev.py test` installs it "
                "(apt-get install chromium, as root or through sudo)")  # fmt: skip
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        missing(f"playwright is not installed ({exc}): `pip install -e .[test]`")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield launched
        launched.close()


class Watched:
    """A page whose console errors, uncaught exceptions and network requests are kept."""

    def __init__(self, page) -> None:
        self.page, self.errors, self.requests = page, [], []
        page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("request", lambda r: self.requests.append(r.url))

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path


@pytest.fixture
def new_page(browser):
    contexts = []

    def make(**context_options) -> Watched:
        context = browser.new_context(viewport={"width": 1280, "height": 900}, **context_options)
        contexts.append(context)
        return Watched(context.new_page())

    yield make
    for context in contexts:
        context.close()
