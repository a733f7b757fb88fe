"""The merged layout on CPU: one complete model per adapter, for runtimes that cannot swap adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from phi_pipeline.bundle.staging import verify
from phi_pipeline.cli import main
from phi_pipeline.runtime.genai import BundleModel

pytestmark = pytest.mark.slow


def test_merged_layout_publishes_one_model_per_adapter(fast_project, monkeypatch, capsys):
    monkeypatch.chdir(fast_project)
    spec = yaml.safe_load(Path("pipelines/fast.yaml").read_text())
    spec["name"] = "fast-merged"
    spec["export"]["layout"] = "merged"
    Path("pipelines/fast-merged.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    assert main(["run", "pipelines/fast-merged.yaml"]) == 0
    bundle = Path("dist/fast-merged/cpu")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["layout"] == "merged"
    assert [a["model_dir"] for a in manifest["adapters"]] == ["variants/tone", "variants/antonyms"]
    for variant in ("tone", "antonyms"):
        names = {p.name for p in (bundle / "variants" / variant).iterdir()}
        assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= names
    assert not (bundle / "adapters").exists()
    assert verify(bundle) == []

    # the merged weights differ per adapter, and each variant runs on its own
    files = manifest["files"]
    assert files["variants/tone/model.onnx.data"] != files["variants/antonyms/model.onnx.data"]
    for v in ("tone", "antonyms"):
        assert isinstance(BundleModel(bundle, variant=v).generate("<|user|>\nhi<|end|>\n<|assistant|>\n", v, 4), str)

    assert main(["generate", str(bundle), "--prompt", "hi"]) == 2  # which variant? the user must say
    assert "one model per adapter (tone, antonyms); choose one with --adapter" in capsys.readouterr().err


def test_package_option_assembles_the_published_bundles(fast_project, monkeypatch):
    monkeypatch.chdir(fast_project)
    assert main(["run", "pipelines/fast.yaml", "--target", "cpu", "--package"]) == 0
    package = Path("dist/fast/fast.ortpackage")
    assert json.loads((package / "manifest.json").read_text())["components"] == ["decoder"]
    assert (package / "models/decoder/cpu/model.onnx").is_file()  # one variant per target, named after it
    index = json.loads((package / "package.json").read_text())
    assert set(index["targets"]) == {"cpu"}
