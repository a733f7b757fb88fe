"""CUDA end to end: only where a CUDA GPU is present (skipped in CI, which has none)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, write_fast_spec
from phi_pipeline.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="session")
def cuda_project(tmp_path_factory) -> Path:
    """A scratch project with the few-step spec; its first run builds the tiny base (no CPU run first)."""
    project = tmp_path_factory.mktemp("cuda-project")
    shutil.copytree(ROOT / "pipelines", project / "pipelines")
    write_fast_spec(project)
    return project


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_cuda_pipeline_publishes_a_bundle_that_runs_on_the_cuda_provider(cuda_project, monkeypatch, method):
    import yaml

    monkeypatch.chdir(cuda_project)
    spec = yaml.safe_load(Path("pipelines/fast.yaml").read_text())
    spec["name"] = f"fast-cuda-{method}"
    spec["lora"]["method"] = method
    spec["export"]["precision"] = "fp16"
    Path(f"pipelines/{spec['name']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["run", f"pipelines/{spec['name']}.yaml", "--target", "cuda"]) == 0

    import onnxruntime_genai as og

    bundle = Path(f"dist/{spec['name']}/cuda")
    assert json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"]["session_options"][
        "provider_options"
    ][0].get("cuda") is not None
    model = og.Model(str(bundle))
    adapters = og.Adapters(model)
    adapters.load(str(bundle / "adapters/tone.onnx_adapter"), "tone")
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=32, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_active_adapter(adapters, "tone")
    generator.append_tokens(tokenizer.encode("<|user|>\nClassify the tone: the day was amazing<|end|>\n<|assistant|>\n"))
    while not generator.is_done():
        generator.generate_next_token()
