"""Adapters changed while the server runs: what the bundle on disk now holds, checked before anything serves.

`phi-pipeline run` republishes a bundle with a new or retrained adapter (the base graph unchanged). The server
then serves it without a restart, on SIGHUP (every adapter of the new manifest) or through vLLM's routes
(`POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`). Before a file serves:
- the whole bundle passes `phi-pipeline verify` (every file's sha256 against manifest.json, every adapter fits
  the graph) and, with `serve --public-key`, its signature;
- the base graph is the one being served (model.onnx and its data, by digest): a new graph needs a restart;
- a file named in a request lies inside the bundle and is the manifest's file of that adapter.
The engine then swaps the weights between two steps; requests already running finish on the weights they
started with (engine.py, BatchedEngine.swap_adapters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phi_pipeline.bundle.layout import MANIFEST, MODEL_FILE

Changes = dict[str, "tuple[Path, dict[str, Any]] | None"]
"""adapter name -> (file to serve it from, its prompt format), or None: stop serving it"""


class AdapterChangeError(Exception):
    """A reload or load refused: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _graph(manifest: dict[str, Any]) -> dict[str, str]:
    return {f: d for f, d in manifest["files"].items() if f.startswith(MODEL_FILE)}


class ServedAdapters:
    """Which adapter files the server serves (by digest), and the checks a change passes first."""

    def __init__(self, bundle: Path, public_key: Path | None = None):
        self.bundle = bundle
        self.public_key = public_key
        manifest = json.loads((bundle / MANIFEST).read_text())
        self.graph = _graph(manifest)
        self.digests = {a["name"]: manifest["files"][a["file"]] for a in manifest["adapters"] if "file" in a}
        self._planned: dict[str, str] = {}
        """the verified manifest's digest of each file the last reload or load planned to serve"""

    def _checked_manifest(self) -> dict[str, Any]:
        from phi_pipeline.bundle.staging import verify

        problems = verify(self.bundle, self.public_key)
        if problems:
            raise AdapterChangeError(400, f"{self.bundle} fails verification, nothing changed: " + "; ".join(problems[:5]))
        manifest = json.loads((self.bundle / MANIFEST).read_text())
        if _graph(manifest) != self.graph:
            raise AdapterChangeError(409, f"{self.bundle}: the base model ({MODEL_FILE}) is not the one being served; "
                                     "restart the server to serve the new one")
        return manifest

    def _change(self, manifest: dict[str, Any], adapter: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        self._planned[adapter["name"]] = manifest["files"][adapter["file"]]
        return self.bundle / adapter["file"], adapter["prompt_format"]

    def reload(self) -> Changes:
        """Every adapter the bundle now lists that is new or changed, and None for each one it no longer lists."""
        manifest = self._checked_manifest()
        listed = {a["name"]: a for a in manifest["adapters"] if "file" in a}
        changes: Changes = {name: None for name in self.digests if name not in listed}
        for name, a in listed.items():
            if self.digests.get(name) != manifest["files"][a["file"]]:
                changes[name] = self._change(manifest, a)
        return changes

    def load(self, name: str, path: str) -> Changes:
        """vLLM's load_lora_adapter: `path` must be the bundle's file of adapter `name` (relative to the bundle or
        absolute, inside it)."""
        given = Path(path)
        resolved = (given if given.is_absolute() else self.bundle / given).resolve()
        if not resolved.is_relative_to(self.bundle.resolve()):
            raise AdapterChangeError(400, f"lora_path {path!r} is outside the served bundle {self.bundle}; "
                                     "publish the adapter into it with phi-pipeline run")
        manifest = self._checked_manifest()
        adapter = next((a for a in manifest["adapters"] if a["name"] == name and "file" in a), None)
        if adapter is None or (self.bundle / adapter["file"]).resolve() != resolved:
            listed = {a["name"]: a.get("file") for a in manifest["adapters"]}
            raise AdapterChangeError(400, f"{self.bundle}/{MANIFEST} does not list {path!r} as adapter {name!r} "
                                     f"(it lists {listed})")
        if self.digests.get(name) == manifest["files"][adapter["file"]]:
            raise AdapterChangeError(400, f"The lora adapter '{name}' has already been loaded.")
        return {name: self._change(manifest, adapter)}

    def unload(self, name: str) -> Changes:
        if name not in self.digests:
            raise AdapterChangeError(404, f"The lora adapter '{name}' cannot be found.")
        return {name: None}

    def applied(self, changes: Changes) -> None:
        """Record what the engine now serves (the digests verification checked: no second read of the files)."""
        for name, change in changes.items():
            if change is None:
                self.digests.pop(name, None)
            else:
                self.digests[name] = self._planned[name]
