"""`phi-pipeline serve`: uvicorn around the app, with a draining shutdown.

Ctrl-C / SIGTERM: new requests get 503 and /health turns 503, running and queued requests finish,
then the server exits; a second signal exits at once. SIGHUP: serve the adapters the bundle on disk now holds
(serve/adapters.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from phi_pipeline.bundle.layout import MANIFEST
from phi_pipeline.errors import UsageError
from phi_pipeline.runtime.genai import decoder_threads
from phi_pipeline.serve.app import API_KEY_ENV, ServeSettings, create_app
from phi_pipeline.runtime.engine import Engine

log = logging.getLogger("phi_pipeline.serve")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains the engine before stopping."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.engine.state == "draining":  # a second signal: stop now, unfinished streams are cut
            self.should_exit = self.force_exit = True
            return
        if self.engine.state != "ready":  # loading or failed: nothing to drain
            super().handle_exit(sig, frame)
            return
        log.info("draining: %d request(s) to finish; new ones get 503 (signal again to stop now)", self.engine.busy)
        self.engine.drain()
        threading.Thread(target=self._exit_when_idle, name="phi-pipeline-drain", daemon=True).start()

    def _exit_when_idle(self) -> None:
        self.engine.idle.wait()
        self.should_exit = True


def _exit_if_load_fails(server: DrainingServer) -> None:
    server.engine.ready.wait()
    if server.engine.state == "failed":
        server.should_exit = True


def _check_bundle(bundle: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((bundle / MANIFEST).read_text())
    except FileNotFoundError:
        raise UsageError(str(bundle), [f"no {MANIFEST} here; give a folder published by phi-pipeline run"]) from None
    if manifest.get("layout") == "merged":
        raise UsageError(str(bundle), ["this is a merged bundle (one model per adapter); serve needs the "
                                       "multi-adapter layout, whose adapters are swapped per request"])
    return manifest


ENGINE_WORDS = {"batched": "batched (continuous batching, an adapter per row)",
                "genai": "onnxruntime-genai (a generator per request, round-robin)"}


def build_server(settings: ServeSettings, host: str, port: int, log_level: str = "info",
                 engine: Engine | None = None) -> DrainingServer:
    """The server, not started: tests run it in a thread, the CLI in the foreground."""
    app = create_app(settings, engine)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
    return DrainingServer(config, app.state.engine)


@contextlib.contextmanager
def running(settings, *, wait_ready: bool = True, engine=None) -> Iterator[tuple[str, object]]:
    """The server of `settings` on 127.0.0.1, port 0, in a thread (uvicorn leaves signals alone
    outside the main thread), for tests and benchmarks: (base URL, uvicorn server)."""
    server = build_server(settings, "127.0.0.1", 0, log_level="warning", engine=engine)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    if wait_ready and not server.engine.ready.wait(120):
        server.should_exit = True
        raise RuntimeError("the model did not load in 120 s")
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)


def _web_page_words(bundle: Path, api_key: str | None, url: str) -> str:
    from phi_pipeline.bundle.web import read_web_manifest

    if read_web_manifest(bundle) is None:
        return "none (the bundle has no web graph: publish for --target webgpu or cpu)"
    if api_key:
        return "off while an API key is set (phi-pipeline web writes it as files)"
    return f"{url}/web/ (the model runs in the browser, on onnxruntime-web)"


def serve_cli(bundle: str, *, host: str, port: int, threads: int | None, api_key: str | None, max_active: int,
              max_queue: int, max_tokens: int, engine: str = "auto", prefix_cache_mb: int = 1024,
              public_key: str | None = None, prefill_pacing: str = "decode-step", prefill_min_tokens: int = 32) -> int:
    from phi_pipeline.runtime.engine import EngineSettings, engine_kind

    problems = [f"{name} must be >= 1" for name, v in
                (("--threads", threads or 1), ("--max-active", max_active), ("--max-tokens", max_tokens)) if v < 1]
    problems += [f"{name} must be >= 0" for name, v in (("--max-queue", max_queue), ("--prefix-cache-mb", prefix_cache_mb))
                 if v < 0]
    chunk = EngineSettings.prefill_chunk
    if not 1 <= prefill_min_tokens <= chunk:
        problems.append(f"--prefill-min-tokens must be between 1 and {chunk} (a run's most tokens)")
    if public_key is not None:
        from phi_pipeline.bundle.signing import check_public_key

        problems += check_public_key(Path(public_key))
    if problems:
        raise UsageError("phi-pipeline serve", problems)
    path = Path(bundle)
    manifest = _check_bundle(path)
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    try:
        kind = engine_kind(manifest, engine)
    except ValueError as exc:
        raise UsageError("phi-pipeline serve", [str(exc)]) from None
    settings = ServeSettings(path, threads=threads, api_key=api_key, max_tokens=max_tokens,
                             engine=EngineSettings(max_active=max_active, max_queue=max_queue,
                                                   prefix_cache_bytes=prefix_cache_mb << 20,
                                                   pace_prefill=prefill_pacing == "decode-step",
                                                   prefill_min_tokens=prefill_min_tokens), engine_kind=kind,
                             public_key=Path(public_key) if public_key else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")  # uvicorn's look
    server = build_server(settings, host, port)
    ids = [manifest["pipeline"], *(a["name"] for a in manifest["adapters"])]
    shown = f"[{host}]" if ":" in host else host
    print(f"phi-pipeline serve: http://{shown}:{port} (OpenAI API at /v1, chat page at /)", file=sys.stderr)
    print(f"  models: {', '.join(ids)} (base: {ids[0]})", file=sys.stderr)
    print(f"  engine: {ENGINE_WORDS[kind]}; decoder threads: {decoder_threads(path, threads)}", file=sys.stderr)
    cache = f"prefix cache {prefix_cache_mb} MB" if kind == "batched" and prefix_cache_mb else "no prefix cache"
    print(f"  max active {max_active}, queue {max_queue}; {cache}; API key {'required' if api_key else 'off'}",
          file=sys.stderr)
    print(f"  in-browser page: {_web_page_words(path, api_key, f'http://{shown}:{port}')}", file=sys.stderr)
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"  warning: --host {host} takes requests from other machines and no --api-key is set", file=sys.stderr)
    threading.Thread(target=_exit_if_load_fails, args=(server,), daemon=True).start()
    server.run()
    engine = server.engine
    if engine.state == "failed":
        print(f"error: loading {bundle} failed: {engine.error}", file=sys.stderr)
        return 1
    return 0
