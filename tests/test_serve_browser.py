"""The chat page at `/` in a real headless browser: Debian's chromium driven by Playwright
(phi_pipeline/web/browser.py; .ci/run installs chromium)."""

from __future__ import annotations

import pytest

from phi_pipeline.serve.app import ServeSettings
from phi_pipeline.web.browser import CHROMIUM, chromium
from serve_support import CHAT_ADAPTER, client, pace, running

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: `apt-get install chromium` (.ci/run does)")


def test_chat_page_streams_an_adapter_answer(random_bundle, monkeypatch):

    pace(monkeypatch, 0.02)  # tokens far enough apart that the page shows each one as it comes
    with running(ServeSettings(random_bundle, max_tokens=32)) as (url, _):
        reply = client(url).chat.completions.create(
            model=CHAT_ADAPTER, messages=[{"role": "user", "content": "a b c"}], temperature=0)  # the server default: 32
        expected = reply.choices[0].message.content
        assert reply.usage.completion_tokens > 8
        with chromium() as browser:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("body[data-models=loaded]")
            assert page.locator("#model option").all_inner_texts()[1].startswith(CHAT_ADAPTER)
            page.select_option("#model", CHAT_ADAPTER)
            # count the answer's updates: streamed text arrives in several pieces
            page.evaluate("""() => { window.updates = 0;
                new MutationObserver(() => window.updates++).observe(
                    document.getElementById('log'), {childList: true, subtree: true, characterData: true}); }""")
            page.fill("#prompt", "a b c")
            page.click("#send")
            page.wait_for_selector(".assistant[data-state=done]", timeout=60_000)
            assert page.text_content(".assistant") == expected
            assert page.evaluate("window.updates") > 8  # the user's line, then the answer piece by piece
