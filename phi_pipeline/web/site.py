"""The in-browser page as files: its own code (static/), the JavaScript packages it imports (node_modules/,
installed by `make web` with `npm ci` from package-lock.json) and the bundle files it reads.

Site layout, the same served (`phi-pipeline serve`, under /web/) and written (`phi-pipeline web BUNDLE OUT`):
    index.html, *.js     the page (static/)
    vendor/...           onnxruntime-web, @huggingface/tokenizers, @huggingface/jinja, flatbuffers
    bundle/...           manifest.json and the files the page loads, each checked there against its sha256
    _headers             cross-origin isolation for static hosts that read it (Netlify, Cloudflare Pages)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from phi_pipeline.bundle.layout import MANIFEST, WEB_MANIFEST
from phi_pipeline.bundle.publish import publish_dir
from phi_pipeline.bundle.web import read_web_manifest
from phi_pipeline.errors import UsageError

HERE = Path(__file__).parent
PAGE = HERE / "static"
NODE_MODULES = HERE / "node_modules"
# served name under vendor/ -> its file in node_modules (static/index.html's import map names these)
_ORT = "onnxruntime-web/dist/"
VENDOR = {
    "ort.wasm.min.mjs": _ORT + "ort.wasm.min.mjs",
    "ort-wasm-simd-threaded.mjs": _ORT + "ort-wasm-simd-threaded.mjs",
    "ort-wasm-simd-threaded.wasm": _ORT + "ort-wasm-simd-threaded.wasm",
    "ort.webgpu.min.mjs": _ORT + "ort.webgpu.min.mjs",
    "ort-wasm-simd-threaded.asyncify.mjs": _ORT + "ort-wasm-simd-threaded.asyncify.mjs",
    "ort-wasm-simd-threaded.asyncify.wasm": _ORT + "ort-wasm-simd-threaded.asyncify.wasm",
    "tokenizers.min.mjs": "@huggingface/tokenizers/dist/tokenizers.min.mjs",
    "jinja.js": "@huggingface/jinja/dist/index.js",
    **{f"flatbuffers/{m}.js": f"flatbuffers/mjs/{m}.js"
       for m in ("flatbuffers", "builder", "byte-buffer", "constants", "encoding", "utils")},
}
# WASM threads need SharedArrayBuffer, which a page has only when cross-origin isolated
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}
MEDIA_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
               ".html": "text/html", ".json": "application/json", ".jinja": "text/plain", ".onnx": "application/octet-stream"}
SITE_MARK = ".phi-pipeline-web"  # names the bundle a written site came from; a folder with it may be replaced


def vendor_files() -> dict[str, Path]:
    files = {f"vendor/{name}": NODE_MODULES / rel for name, rel in VENDOR.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise UsageError(str(NODE_MODULES), [
            f"the page's JavaScript packages are not installed ({len(missing)} files missing, e.g. {missing[0]}): "
            "run `make web` (npm ci in phi_pipeline/web)"])
    return files


def bundle_files(bundle: Path) -> list[str]:
    """The bundle's files the page reads, manifest.json first; a UsageError for a bundle without a web graph."""
    web = read_web_manifest(bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    if web is None:
        raise UsageError(str(bundle), [
            f"no {WEB_MANIFEST}: this {manifest.get('target')} bundle has no web graph; bundles published for --target "
            "webgpu or cpu by this version of phi-pipeline have one (republish it: phi-pipeline run SPEC --target ...)"])
    listed = manifest.get("files", {})
    wanted = [WEB_MANIFEST, web["graph"], *web["external_data"], "genai_config.json", "tokenizer.json",
              "tokenizer_config.json", "chat_template.jinja", *(a["file"] for a in manifest["adapters"] if "file" in a)]
    return [MANIFEST, *(rel for rel in wanted if rel in listed)]


def site_files(bundle: Path) -> dict[str, Path]:
    """Every file of the page's site: its path in the site -> the file to serve."""
    bundled = {f"bundle/{rel}": bundle / rel for rel in bundle_files(bundle)}  # first: a bundle without a page says so
    return {**{p.name: p for p in sorted(PAGE.iterdir()) if p.is_file()}, **vendor_files(), **bundled}


def write_site(bundle: Path, out: Path) -> Path:
    """Write the page of `bundle` into `out` as static files, after checking the bundle (verify). `out` is
    replaced whole and only when the new site is complete; a folder that is not an earlier site is refused."""
    from phi_pipeline.bundle.staging import verify

    out = out.resolve()
    if out.exists() and any(out.iterdir()) and not (out / SITE_MARK).is_file():
        raise UsageError(str(out), ["exists and is not a site phi-pipeline web wrote; name a new or empty folder"])
    problems = verify(bundle)
    if problems:
        raise UsageError(str(bundle), problems + ["the bundle fails verification; republish it (phi-pipeline run)"])
    files = site_files(bundle)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel, source in files.items():
            dest = staged / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
        headers = "".join(f"  {k}: {v}\n" for k, v in ISOLATION_HEADERS.items())
        (staged / "_headers").write_text(f"/*\n{headers}")
        (staged / SITE_MARK).write_text(json.dumps({"bundle": str(bundle.resolve())}) + "\n")
        staged.chmod(0o755)
        publish_dir(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out
