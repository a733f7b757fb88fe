"""Adapters changed while the server runs (serve/adapters.py, BatchedEngine.swap_adapters): vLLM's load and unload
routes and SIGHUP serve what the republished bundle holds, after it passes verification; requests already running
finish on the weights they started with."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import pytest

from phi_pipeline.digests import file_sha256
from phi_pipeline.serve.app import ServeSettings
from serve_support import CHAT_ADAPTER, client, pace, running, write_random_adapter

ROOT = Path(__file__).resolve().parent.parent
FILE = f"adapters/{CHAT_ADAPTER}.onnx_adapter"


@pytest.fixture
def bundle(random_bundle, tmp_path) -> Path:
    """A copy of the random bundle that tests republish into."""
    return Path(shutil.copytree(random_bundle, tmp_path / "bundle"))


def republish(bundle: Path, name: str, seed: int, *, new: bool = False) -> None:
    """What `phi-pipeline run` leaves after retraining (or adding, `new`) adapter `name`: its file with other
    weights and the manifest's digest of it."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    rel = f"adapters/{name}.onnx_adapter"
    write_random_adapter(bundle / FILE, bundle / f"{rel}.tmp", rank=8, seed=seed, scale=0.5)
    os.replace(bundle / f"{rel}.tmp", bundle / rel)
    manifest["files"][rel] = file_sha256(bundle / rel)
    if new:
        like = next(a for a in manifest["adapters"] if a["name"] == CHAT_ADAPTER)
        manifest["adapters"].append({**like, "name": name, "file": rel, "sha256": manifest["files"][rel]})
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _answer(oa, model: str, tokens: int = 12) -> str:
    reply = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "a b c"}], temperature=0,
                                       max_tokens=tokens, extra_body={"min_tokens": tokens})
    return reply.choices[0].message.content


def _post(url: str, route: str, body: dict) -> httpx2.Response:
    return httpx2.post(f"{url}/v1/{route}", json=body, timeout=60)


def test_a_reloaded_adapter_serves_new_requests_while_running_ones_finish_on_the_old_weights(bundle, monkeypatch):
    settings = ServeSettings(bundle, max_tokens=64, engine_kind="batched")
    with running(settings) as (url, srv):
        oa = client(url)
        old_short, old_long = _answer(oa, CHAT_ADAPTER), _answer(oa, CHAT_ADAPTER, 40)
        pace(monkeypatch, 0.05)  # the long answer is still streaming when the reload happens
        during: list[str] = []
        runner = threading.Thread(target=lambda: during.append(_answer(oa, CHAT_ADAPTER, 40)))
        runner.start()
        time.sleep(0.5)
        republish(bundle, CHAT_ADAPTER, seed=7)
        reply = _post(url, "load_lora_adapter", {"lora_name": CHAT_ADAPTER, "lora_path": FILE})
        assert reply.status_code == 200 and reply.text == f"Success: LoRA adapter '{CHAT_ADAPTER}' added successfully."
        assert srv.engine.busy == 1  # the long request was running through the swap
        new_short = _answer(oa, CHAT_ADAPTER)
        runner.join(60)
        monkeypatch.undo()
        assert during == [old_long] and new_short != old_short
        # the old version goes in the round its last request leaves, which may end just after the client has its answer
        deadline = time.monotonic() + 10
        while set(srv.engine.decoder.adapters) != {f"{CHAT_ADAPTER}@1", "templ"} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(srv.engine.decoder.adapters) == {f"{CHAT_ADAPTER}@1", "templ"}  # the old version is gone
    with running(settings) as (url, _):  # a fresh server on the republished bundle answers the same
        assert _answer(client(url), CHAT_ADAPTER) == new_short


def test_unload_stops_serving_an_adapter_and_load_brings_it_back(bundle):
    with running(ServeSettings(bundle, max_tokens=64, engine_kind="batched")) as (url, _):
        oa = client(url)
        assert _post(url, "unload_lora_adapter", {"lora_name": CHAT_ADAPTER}).status_code == 200
        assert CHAT_ADAPTER not in [m.id for m in oa.models.list().data]
        assert httpx2.post(f"{url}/v1/chat/completions", json={"model": CHAT_ADAPTER, "messages": [
            {"role": "user", "content": "a"}]}).status_code == 404
        gone = _post(url, "unload_lora_adapter", {"lora_name": CHAT_ADAPTER})
        assert gone.status_code == 404 and "cannot be found" in gone.json()["error"]["message"]
        assert _post(url, "load_lora_adapter", {"lora_name": CHAT_ADAPTER, "lora_path": FILE}).status_code == 200
        assert _answer(oa, CHAT_ADAPTER)
        again = _post(url, "load_lora_adapter", {"lora_name": CHAT_ADAPTER, "lora_path": FILE})
        assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]


def test_loads_that_fail_their_checks_are_refused_and_change_nothing(bundle, tmp_path):
    import onnx

    with running(ServeSettings(bundle, max_tokens=64, engine_kind="batched")) as (url, srv):
        outside = tmp_path / "x.onnx_adapter"
        shutil.copy(bundle / FILE, outside)
        reply = _post(url, "load_lora_adapter", {"lora_name": CHAT_ADAPTER, "lora_path": str(outside)})
        assert reply.status_code == 400 and "outside the served bundle" in reply.json()["error"]["message"]
        write_random_adapter(bundle / FILE, bundle / FILE, rank=8, seed=3)  # the manifest's digest not updated
        reply = _post(url, "load_lora_adapter", {"lora_name": CHAT_ADAPTER, "lora_path": FILE})
        assert reply.status_code == 400
        assert f"{FILE}: sha256 differs from the manifest" in reply.json()["error"]["message"]
        republish(bundle, CHAT_ADAPTER, seed=3)
        model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)  # another base graph, republished
        onnx.helper.set_model_props(model, {"rebuilt": "yes"})
        onnx.save(model, str(bundle / "model.onnx.tmp"))
        os.replace(bundle / "model.onnx.tmp", bundle / "model.onnx")
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["files"]["model.onnx"] = file_sha256(bundle / "model.onnx")
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        reply = _post(url, "load_lora_adapter", {"lora_name": CHAT_ADAPTER, "lora_path": FILE})
        assert reply.status_code == 409 and "restart the server" in reply.json()["error"]["message"]
        assert set(srv.engine.decoder.adapters) == {CHAT_ADAPTER, "templ"}


def test_genai_engine_refuses_to_reload_adapters_with_the_reason(bundle):
    with running(ServeSettings(bundle, max_tokens=64, engine_kind="genai")) as (url, _):
        republish(bundle, CHAT_ADAPTER, seed=7)
        reply = _post(url, "load_lora_adapter", {"lora_name": CHAT_ADAPTER, "lora_path": FILE})
        assert reply.status_code == 400 and "restart the server" in reply.json()["error"]["message"]


def test_sighup_serves_an_adapter_added_to_the_bundle(bundle):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "phi_pipeline.cli", "serve", str(bundle), "--port", str(port)],
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        republish(bundle, "added", seed=11, new=True)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while "added" not in [m.id for m in client(url).models.list().data]:
            assert time.monotonic() < deadline, "SIGHUP did not load the new adapter"
            time.sleep(0.2)
        assert _answer(client(url), "added")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert "adapters reloaded: added new or changed, none no longer served" in proc.stderr.read()


def _healthy(url: str) -> bool:
    try:
        return httpx2.get(f"{url}/health", timeout=5).status_code == 200
    except httpx2.HTTPError:
        return False
