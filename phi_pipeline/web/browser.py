"""Headless chromium for the page's test and benchmark: Debian's chromium driven by Playwright (Playwright's
own browser download is not reachable here; .ci/run installs chromium with apt)."""

from __future__ import annotations

import contextlib
import shutil
from typing import Any, Iterator

CHROMIUM = shutil.which("chromium")
# no GPU here: --disable-gpu keeps chromium off its software GL path; the page then runs on the WASM backend
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A Playwright browser on the system chromium."""
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        raise RuntimeError("no chromium on PATH: apt-get install chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_settled(page: Any, timeout_ms: int = 180_000) -> str:
    """Wait until the web page has loaded its model or failed; its state (ready or failed)."""
    page.wait_for_selector("body[data-state=ready], body[data-state=failed]", timeout=timeout_ms)
    return page.get_attribute("body", "data-state")


@contextlib.contextmanager
def web_page(url: str) -> Iterator[Any]:
    """The web page at `url` in a fresh headless chromium, once it has settled (ready, or failed with its message)."""
    with chromium() as browser:
        page = browser.new_page()
        page.goto(url)
        wait_settled(page)
        yield page
