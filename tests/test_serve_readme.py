"""docs/serving.md is what the tiny bundle really does: the `phi-pipeline serve` command's first
lines, the curl example's and the Python example's output, all read from the page itself (the one
place to update them when the tiny default's adapters change). README "Serve it" shows the first two
of those examples, and must show them exactly as the page does."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOWN_BUNDLE, SHOWN_URL = "dist/tiny-phi3/cpu", "127.0.0.1:8000"
SERVE_PAGE, SERVE_HEADING = "docs/serving.md", "# Serving"


def serve_section(page: str = SERVE_PAGE, heading: str = SERVE_HEADING) -> str:
    """From the heading to the next `## ` heading: the examples, not the API reference after them."""
    text = (ROOT / page).read_text()
    return text[text.index(heading):].split("\n## ", 1)[0]


def blocks(section: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def console(body: str) -> tuple[str, list[str]]:
    """A console block's command (continuation lines joined) and the output lines after it."""
    lines = body.rstrip("\n").split("\n")
    assert lines[0].startswith("$ ")
    command = [lines[0][2:]]
    i = 1
    while command[-1].endswith("\\"):
        command.append(lines[i])
        i += 1
    return "\n".join(command), lines[i:]


def test_readme_serve_section_has_the_examples_this_test_checks():
    kinds = [lang for lang, _ in blocks(serve_section())]
    assert kinds == ["console", "console", "python", "text"]


def test_readme_serve_example_is_the_one_this_test_checks():
    assert blocks(serve_section("README.md", "## Serve it")) == blocks(serve_section())[:2]


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="the serving page's curl example needs curl and jq")
def test_readme_serve_examples_print_what_the_tiny_bundle_answers(tiny_bundle):
    (_, serve_block), (_, curl_block), (_, python_code), (_, python_output) = blocks(serve_section())
    serve_command, serve_lines = console(serve_block)
    curl_command, curl_output = console(curl_block)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"127.0.0.1:{port}"
    argv = serve_command.replace(SHOWN_BUNDLE, str(tiny_bundle)).split()
    assert argv[:2] == ["phi-pipeline", "serve"]
    proc = subprocess.Popen([sys.executable, "-m", "phi_pipeline.cli", *argv[1:], "--port", str(port)],
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        first = [proc.stderr.readline().rstrip("\n") for _ in serve_lines]
        assert first == [line.replace(SHOWN_URL, url) for line in serve_lines]
        _wait_healthy(url, proc)

        curl = subprocess.run(["bash", "-c", curl_command.replace(SHOWN_URL, url)], capture_output=True, text=True,
                              timeout=120)
        assert curl.returncode == 0, curl.stderr
        assert curl.stdout.rstrip("\n").split("\n") == curl_output

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(python_code.replace(SHOWN_URL, url), f"{SERVE_PAGE} (python example)", "exec"), {})
        assert printed.getvalue() == python_output
    finally:
        proc.send_signal(signal.SIGTERM)  # drains, then exits 0
        assert proc.wait(60) == 0


def _wait_healthy(url: str, proc: subprocess.Popen) -> None:
    import httpx2

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        with contextlib.suppress(httpx2.HTTPError):
            if httpx2.get(f"http://{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError("the server did not become healthy")
