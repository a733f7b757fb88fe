"""The in-browser page (phi_pipeline/web): the web graph and page manifest a bundle carries, the JavaScript
adapter reader, the site served at /web/ and written by `phi-pipeline web`, and the page itself in headless
chromium on the WASM backend, held to the Python runtime's greedy answers."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

from phi_pipeline.bundle.adapters import graph_lora_inputs, read_onnx_adapter
from phi_pipeline.bundle.layout import MANIFEST, MODEL_FILE, WEB_GRAPH, WEB_MANIFEST
from phi_pipeline.cli import main
from phi_pipeline.errors import UsageError
from phi_pipeline.serve.app import ServeSettings
from phi_pipeline.web.browser import CHROMIUM, wait_settled, web_page
from phi_pipeline.web.site import ISOLATION_HEADERS, MEDIA_TYPES, NODE_MODULES, PAGE, SITE_MARK, site_files, write_site
from serve_support import CHAT_ADAPTER, TEMPLATE_ADAPTER, running
from web_support import PythonAnswers

NODE = shutil.which("node")
needs_packages = pytest.mark.skipif(not NODE_MODULES.is_dir(), reason="needs the page's packages: `make web` (npm ci)")
needs_node = pytest.mark.skipif(NODE is None or not NODE_MODULES.is_dir(), reason="needs node and `make web`")
needs_browser = pytest.mark.skipif(CHROMIUM is None or not NODE_MODULES.is_dir(),
                                   reason="needs chromium (`apt-get install chromium`, .ci/run does) and `make web`")
# Where the base model's two best tokens are this close in logits, the WASM kernels and onnxruntime's x86 ones
# may pick either: a tie. Measured gaps at such rows: up to 0.004 on the webgpu bundle (float16: one step is
# 1/256 at magnitudes 4-8), up to 0.015 on the cpu bundle (its int4 MatMuls take int8-quantized activations on
# x86, accuracy level 4). Anything wider is a real difference.
TIE = 0.05


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_bundle(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    return dest


def _relist(bundle: Path, rel: str) -> None:
    """Record `rel`'s current sha256 in the manifest, as a republished bundle would."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"][rel] = _sha256(bundle / rel)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))


# --- the bundle's web graph and page manifest -------------------------------------------------------------

def test_web_graph_requires_every_lora_input_and_reads_the_bundles_weights(random_bundle):
    web = json.loads((random_bundle / WEB_MANIFEST).read_text())
    graph = onnx.load(str(random_bundle / WEB_GRAPH), load_external_data=False)
    original = onnx.load(str(random_bundle / MODEL_FILE), load_external_data=False)
    lora = graph_lora_inputs(random_bundle / MODEL_FILE)
    assert web["graph"] == WEB_GRAPH and web["external_data"] == ["model.onnx.data"]
    assert set(web["lora_inputs"]) == set(lora)
    assert all(web["lora_inputs"][n]["shape"] == list(shape) for n, (shape, _) in lora.items())
    initializers = {i.name for i in graph.graph.initializer}
    assert not initializers & set(lora)  # no defaults: onnxruntime-web lists them in inputNames
    assert initializers == {i.name for i in original.graph.initializer} - set(lora)
    assert [n.op_type for n in graph.graph.node] == [n.op_type for n in original.graph.node]
    assert (random_bundle / WEB_GRAPH).stat().st_size < (random_bundle / MODEL_FILE).stat().st_size + 4096
    manifest = json.loads((random_bundle / MANIFEST).read_text())
    assert {WEB_GRAPH, WEB_MANIFEST} <= set(manifest["files"])  # verify() and the signature cover them


def test_web_graph_runs_on_onnxruntime_with_lora_inputs_fed(random_bundle):
    """The web graph, fed the adapter's weights, gives the logits onnxruntime-genai's graph gives with that
    adapter: the defaults are all that changed."""
    import onnxruntime as ort

    from phi_pipeline.runtime.genai import BundleModel

    bm = BundleModel(random_bundle)
    ids = bm.encode(bm.user_prompt("a b c", CHAT_ADAPTER))
    want = bm.logits(ids, CHAT_ADAPTER, len(ids) - 1)[-1]
    session = ort.InferenceSession(str(random_bundle / WEB_GRAPH), providers=["CPUExecutionProvider"])
    genai = json.loads((random_bundle / "genai_config.json").read_text())["model"]["decoder"]
    web = json.loads((random_bundle / WEB_MANIFEST).read_text())
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    dtype = np.dtype(web["kv_dtype"])
    for i in range(genai["num_hidden_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, genai["num_key_value_heads"], 0, genai["head_size"]), dtype)
    feeds.update(read_onnx_adapter(random_bundle / "adapters" / f"{CHAT_ADAPTER}.onnx_adapter"))
    assert set(web["lora_inputs"]) <= {i.name for i in session.get_inputs()}
    got = session.run(["logits"], feeds)[0][0, -1].astype(np.float32)
    np.testing.assert_allclose(got, want, atol=1e-4)


# --- the JavaScript adapter reader (node, the same module the page imports) --------------------------------

READ_ADAPTER = """
import { readFileSync } from 'node:fs';
import { readAdapter } from '%s';
try {
  const a = readAdapter(new Uint8Array(readFileSync(process.argv[1])));
  const out = {};
  for (const [k, v] of a.parameters) out[k] = {type: v.type, dims: v.dims, bytes: Buffer.from(v.data.buffer).toString('hex')};
  console.log(JSON.stringify({formatVersion: a.formatVersion, parameters: out}));
} catch (err) { console.log(JSON.stringify({error: err.message})); }
"""


def _read_in_node(path: Path) -> dict:
    script = READ_ADAPTER % (PAGE / "adapter_format.js").as_posix()
    done = subprocess.run([NODE, "--input-type=module", "-e", script, str(path)], capture_output=True, text=True,
                          check=True, cwd=NODE_MODULES.parent)
    return json.loads(done.stdout)


@needs_node
def test_javascript_adapter_reader_reads_what_onnxruntime_wrote(random_bundle):
    path = random_bundle / "adapters" / f"{TEMPLATE_ADAPTER}.onnx_adapter"
    want = read_onnx_adapter(path)
    got = _read_in_node(path)
    assert got["formatVersion"] == 1 and set(got["parameters"]) == set(want)
    for name, w in want.items():
        p = got["parameters"][name]
        assert p["type"] == {np.float32: "float32", np.float16: "float16"}[w.dtype.type]
        assert p["dims"] == list(w.shape) and p["bytes"] == w.tobytes().hex()


@needs_node
def test_javascript_adapter_reader_refuses_a_file_that_is_not_an_adapter(tmp_path):
    bad = tmp_path / "x.onnx_adapter"
    bad.write_bytes(b"\x10\x00\x00\x00ONNX" + bytes(32))
    assert "no 'TORT' identifier" in _read_in_node(bad)["error"]


# --- the site: served at /web/, written by `phi-pipeline web` ------------------------------------------

@needs_packages
def test_site_has_the_page_its_packages_and_the_bundle_files_it_reads(random_bundle):
    files = site_files(random_bundle)
    assert {"index.html", "app.js", "model.js", "adapter_format.js"} <= set(files)
    assert "vendor/ort.wasm.min.mjs" in files and "vendor/ort-wasm-simd-threaded.wasm" in files
    bundle = {rel.removeprefix("bundle/") for rel in files if rel.startswith("bundle/")}
    assert {MANIFEST, WEB_MANIFEST, WEB_GRAPH, "model.onnx.data", "tokenizer.json", "genai_config.json",
            f"adapters/{CHAT_ADAPTER}.onnx_adapter", f"adapters/{TEMPLATE_ADAPTER}.onnx_adapter"} <= bundle
    assert MODEL_FILE not in bundle and "eval.json" not in bundle  # only what the page reads
    importmap = (PAGE / "index.html").read_text()
    for name in ("ort.wasm.min.mjs", "ort.webgpu.min.mjs", "tokenizers.min.mjs", "jinja.js", "flatbuffers/flatbuffers.js"):
        assert f"./vendor/{name}" in importmap and f"vendor/{name}" in files


def test_bundle_without_web_graph_is_refused_naming_its_target(random_bundle, tmp_path):
    bundle = _copy_bundle(random_bundle, tmp_path / "old")
    (bundle / WEB_MANIFEST).unlink()
    with pytest.raises(UsageError) as info:
        site_files(bundle)
    assert "no web.json: this cpu bundle has no web graph" in str(info.value)


@needs_packages
def test_web_command_writes_a_site_and_replaces_only_its_own(random_bundle, tmp_path, capsys):
    out = tmp_path / "site"
    assert main(["web", str(random_bundle), str(out)]) == 0
    assert (out / SITE_MARK).is_file() and "Cross-Origin-Embedder-Policy: require-corp" in (out / "_headers").read_text()
    for rel, source in site_files(random_bundle).items():
        assert (out / rel).read_bytes() == source.read_bytes(), rel
    (out / "stale.txt").write_text("from an earlier site")
    assert main(["web", str(random_bundle), str(out)]) == 0  # an earlier site is replaced whole
    assert not (out / "stale.txt").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert main(["web", str(random_bundle), str(other)]) == 2
    assert "is not a site phi-pipeline web wrote" in capsys.readouterr().err and (other / "notes.txt").is_file()


def test_web_command_refuses_a_bundle_that_fails_verification(random_bundle, tmp_path, capsys):
    bundle = _copy_bundle(random_bundle, tmp_path / "b")
    (bundle / "tokenizer.json").write_text("{}")
    assert main(["web", str(bundle), str(tmp_path / "site")]) == 2
    assert "tokenizer.json: sha256 differs from the manifest" in capsys.readouterr().err
    assert not (tmp_path / "site").exists()


@needs_packages
def test_web_page_is_served_cross_origin_isolated_beside_the_api(random_bundle):
    import httpx2 as httpx

    with running(ServeSettings(random_bundle), wait_ready=False) as (url, _):
        page = httpx.get(url + "/web/")
        assert page.status_code == 200 and "importmap" in page.text
        for k, v in ISOLATION_HEADERS.items():
            assert page.headers[k] == v
        wasm = httpx.get(url + "/web/vendor/ort-wasm-simd-threaded.wasm")
        assert wasm.headers["content-type"] == MEDIA_TYPES[".wasm"] and wasm.content[:4] == b"\0asm"
        assert httpx.get(url + "/web/bundle/eval.json").status_code == 404  # only the files the page reads
        assert httpx.get(url + "/web/bundle/../manifest.json").status_code == 404


def test_web_page_is_off_while_the_server_has_an_api_key(random_bundle):
    import httpx2 as httpx

    with running(ServeSettings(random_bundle, api_key="k"), wait_ready=False) as (url, _):
        answer = httpx.get(url + "/web/")
        assert answer.status_code == 404 and "off while the server has an API key" in answer.text


# --- the page in headless chromium (WASM backend) ------------------------------------------------------

def _python_answers(bundle: Path) -> PythonAnswers:
    """The Python runtime's greedy answers on every eval row of a bundle of the tiny project (its eval files)."""
    import os

    old = Path.cwd()
    os.chdir(bundle.parents[2])
    try:
        return PythonAnswers(bundle)
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def webgpu_answers(tiny_webgpu_bundle) -> PythonAnswers:
    return _python_answers(tiny_webgpu_bundle)


@pytest.mark.slow
@needs_browser
@pytest.mark.parametrize("target", ["webgpu", "cpu"])
def test_browser_answers_equal_the_python_runtime_on_every_eval_row(target, request):
    """The webgpu bundle (float16 activations) and the cpu bundle (float32) on the WASM backend."""
    bundle = request.getfixturevalue("tiny_webgpu_bundle" if target == "webgpu" else "tiny_bundle")
    answers = request.getfixturevalue("webgpu_answers") if target == "webgpu" else _python_answers(bundle)
    with running(ServeSettings(bundle, engine_kind="genai"), wait_ready=False) as (url, _):
        with web_page(url + "/web/") as page:
            assert page.get_attribute("body", "data-state") == "ready", page.text_content("#status")
            assert page.evaluate("[phi.backend, phi.threads]") == ["wasm", 2]  # served cross-origin isolated
            differences = answers.differences(page)
    rows = len(answers.rows)
    listed = "\n".join(map(str, differences))
    assert rows >= 100
    assert not [d for d in differences if d.which != "base"], listed  # every prompt and every adapter answer identical
    # the base model's free continuations may part at exact ties, each listed: both runtimes' gaps within TIE
    assert all(d.gaps and max(d.gaps) <= TIE for d in differences), listed
    print(f"{target}: {rows} rows x (adapter, base): {len(differences)} differ, at ties:", *differences, sep="\n  ")


def _say(page, adapter: str | None, text: str) -> str:
    """Type `text` into the page with `adapter` chosen, in a new chat; the answer as the page shows it."""
    page.click("#new")
    page.select_option("#adapter", adapter or "")
    page.fill("#prompt", text)
    page.click("#send")
    # attached, not visible: an answer that is only the end token leaves the line empty
    page.wait_for_selector(".assistant[data-state=done]", state="attached", timeout=60_000)
    return page.text_content(".assistant")


@pytest.mark.slow
@needs_browser
def test_browser_switches_adapters_back_and_forth_in_one_session_and_after_a_reload(tiny_webgpu_bundle, webgpu_answers):
    bm = webgpu_answers.model
    said = [("tone", "Classify the tone: the soup was awful"), ("antonyms", "the cold house"), (None, "hello"),
            ("tone", "Classify the tone: the staff were wonderful")]
    want = [bm.generate(bm.user_prompt(text, adapter), adapter, 128) for adapter, text in said]
    with running(ServeSettings(tiny_webgpu_bundle), wait_ready=False) as (url, _):
        with web_page(url + "/web/") as page:
            assert [_say(page, a, t) for a, t in said] == want
            assert want[0] == "negative" and want[3] == "positive"
            # one session: the graph and the weights were fetched once, switching only swapped LoRA tensors
            fetched = page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
            assert sum(n.endswith("/bundle/model.onnx.data") for n in fetched) == 1
            assert "first token" in page.text_content("#speed") and "tokens/s" in page.text_content("#speed")
            page.reload()
            assert wait_settled(page) == "ready"
            assert [_say(page, a, t) for a, t in reversed(said)] == list(reversed(want))


@pytest.mark.slow
@needs_browser
def test_browser_refuses_a_bundle_file_that_fails_its_hash(tiny_webgpu_bundle, tmp_path):
    bundle = _copy_bundle(tiny_webgpu_bundle, tmp_path / "tampered")
    data = bytearray((bundle / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx.data").write_bytes(bytes(data))
    with running(ServeSettings(bundle, engine_kind="genai"), wait_ready=False) as (url, _):
        with web_page(url + "/web/") as page:
            assert page.get_attribute("body", "data-state") == "failed"
            assert page.text_content("#status") == ("model.onnx.data: sha256 differs from the bundle's manifest "
                                                    "(modified or corrupted); run phi-pipeline verify on the bundle")


@pytest.mark.slow
@needs_browser
def test_browser_refuses_an_adapter_made_for_another_graph(tiny_webgpu_bundle, random_bundle, tmp_path):
    bundle = _copy_bundle(tiny_webgpu_bundle, tmp_path / "mixed")
    shutil.copyfile(random_bundle / "adapters" / f"{CHAT_ADAPTER}.onnx_adapter", bundle / "adapters" / "tone.onnx_adapter")
    _relist(bundle, "adapters/tone.onnx_adapter")  # its hash holds: only its fit to the graph is wrong
    with running(ServeSettings(bundle, engine_kind="genai"), wait_ready=False) as (url, _):
        with web_page(url + "/web/") as page:
            assert page.get_attribute("body", "data-state") == "ready"
            refused = page.evaluate("phi.refused")
            assert list(refused) == ["tone"] and refused["tone"].startswith("adapter 'tone' does not fit this model: ")
            assert "the model expects" in refused["tone"] or "not an input of the model" in refused["tone"]
            assert page.is_disabled("#adapter option[value=tone]")
            assert "adapter tone refused" in page.text_content("#log .error")
            assert _say(page, "antonyms", "the cold house")  # the others still answer


class _IsolatedFiles(http.server.SimpleHTTPRequestHandler):
    """A plain static host with the headers the written site's _headers asks for."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MEDIA_TYPES}

    def end_headers(self):
        for k, v in ISOLATION_HEADERS.items():
            self.send_header(k, v)
        super().end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.slow
@needs_browser
def test_written_site_runs_from_a_plain_static_host(tiny_webgpu_bundle, tmp_path):
    site = write_site(tiny_webgpu_bundle, tmp_path / "site")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_IsolatedFiles, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with web_page(f"http://127.0.0.1:{server.server_port}/") as page:
            assert page.get_attribute("body", "data-state") == "ready", page.text_content("#status")
            assert _say(page, "tone", "Classify the tone: the soup was awful") == "negative"
    finally:
        server.shutdown()
