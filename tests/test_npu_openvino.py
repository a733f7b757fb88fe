"""--target openvino end to end on this x86-64 CPU machine: Olive's OpenVINO chain (its passes in
.venv-openvino), the bundle published and verified, and each variant run on OpenVINO's CPU device."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from phi_pipeline.bundle import verify
from phi_pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent
PASS_VENV = ROOT / ".venv-openvino"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (PASS_VENV / "bin" / "python").exists() or importlib.util.find_spec("openvino") is None,
        reason="needs .venv-openvino and the openvino extra in this venv (.ci/npu-venvs.sh, or make venv TARGET=openvino)",
    ),
]


@pytest.fixture(scope="module")
def openvino_bundle(fast_project) -> Path:
    """The fast spec built for openvino in the fast project: its adapters come from the cpu run's cache."""
    old = Path.cwd()
    os.chdir(fast_project)
    try:
        if not Path(".venv-openvino").exists():
            Path(".venv-openvino").symlink_to(PASS_VENV)  # Olive's PythonEnvironment path is project-relative
        assert main(["run", "pipelines/fast.yaml", "--target", "openvino"]) == 0
    finally:
        os.chdir(old)
    return fast_project / "dist/fast/openvino"


def test_openvino_bundle_publishes_an_encapsulated_ir_per_adapter_and_verifies(openvino_bundle):
    manifest = json.loads((openvino_bundle / "manifest.json").read_text())
    assert manifest["target"] == "openvino" and manifest["layout"] == "merged"
    for a in manifest["adapters"]:
        names = {p.name for p in (openvino_bundle / a["model_dir"]).iterdir()}
        assert {"genai_config.json", "openvino_model_dy.xml", "openvino_model_dy.bin"} <= names
    assert verify(openvino_bundle) == []


def test_openvino_bundle_runs_on_the_openvino_cpu_device_like_pytorch(openvino_bundle):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phi_pipeline import target_runtime

    manifest = json.loads((openvino_bundle / "manifest.json").read_text())
    base = manifest["base_model"]["name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    for a in manifest["adapters"]:
        model = target_runtime.load(openvino_bundle, a["name"])
        described = model.describe()
        assert described.runtime.startswith("openvino ") and described.cpu_fallback is False
        ids = tokenizer("the quick brown fox jumps over", add_special_tokens=False)["input_ids"]
        new = model.generate(ids, 8)
        assert 1 <= len(new) <= 8
        logits = model.logits(ids)
        assert logits.shape[0] == len(ids)
        peft_dir = Path(a["cache_key"]).name
        adapter_dir = Path(".phi-pipeline/cache/adapters") / peft_dir / "adapter"
        with torch.no_grad():
            reference = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32), adapter_dir
            ).merge_and_unload()(torch.tensor([ids])).logits[0].numpy()
        agreement = float(np.mean(np.argmax(logits, -1) == np.argmax(reference, -1)))
        assert agreement >= 0.8, f"{a['name']}: int4 OpenVINO and PyTorch agree on {agreement:.0%} of next tokens"
