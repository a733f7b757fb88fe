"""--target openvino end to end on this x86-64 CPU machine: Olive's OpenVINO chain (its passes in
.venv-openvino), the bundle published and verified, and each variant run on OpenVINO's CPU device."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from phi_pipeline.bundle.staging import verify
from phi_pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent
PASS_VENV = ROOT / ".venv-openvino"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (PASS_VENV / "bin" / "python").exists() or importlib.util.find_spec("openvino") is None,
        reason="needs .venv-openvino and the openvino extra in this venv (make test installs them; or make venv TARGET=openvino)",
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


def test_openvino_gates_ran_on_the_openvino_cpu_device_and_track_pytorch(openvino_bundle):
    from phi_pipeline.runtime import target_models as target_runtime

    manifest = json.loads((openvino_bundle / "manifest.json").read_text())
    assert manifest["gates"]["enforced"] is True and manifest["gates"]["passed"] is True
    for name, figures in manifest["evaluation"]["adapters"].items():
        assert figures["adapter_onnx"] is not None and figures["adapter_pytorch"] is not None
        # int4 (NNCF, group 128) against fp32 PyTorch+PEFT on the same prompt ids
        assert figures["token_agreement"] >= 0.8, (name, figures)
        assert figures["perplexity_ratio"] <= 1.5, (name, figures)
        model = target_runtime.load(openvino_bundle, name)
        described = model.describe()
        assert described.runtime.startswith("openvino 2026.") and described.cpu_fallback is False
        assert "OpenVINO CPU device" in described.provider
        prompt = [int(t) for t in target_runtime.TargetSide(openvino_bundle, name).bm.tokenizer.encode("hello there")]
        new = model.generate(prompt, 6)
        assert 1 <= len(new) <= 6
        assert model.logits(prompt + new[:-1]).shape[0] == len(prompt) + len(new) - 1


def test_cpu_and_openvino_come_from_one_training_and_the_package_holds_the_cpu_bundle(openvino_bundle, fast_project, monkeypatch, capsys):
    monkeypatch.chdir(fast_project)
    trained_before = sorted(p.name for p in Path(".phi-pipeline/cache/adapters").iterdir())
    assert main(["run", "pipelines/fast.yaml", "--target", "cpu,openvino", "--package"]) == 0
    assert "not in the package: dist/fast/openvino (merged layout" in capsys.readouterr().err
    cpu, openvino = (json.loads(Path(f"dist/fast/{t}/manifest.json").read_text()) for t in ("cpu", "openvino"))
    # one training: both bundles carry the same adapter cache entries, and neither run retrained them
    assert [a["cache_key"] for a in cpu["adapters"]] == [a["cache_key"] for a in openvino["adapters"]]
    assert sorted(p.name for p in Path(".phi-pipeline/cache/adapters").iterdir()) == trained_before  # nothing retrained
    assert json.loads(Path("dist/fast/fast.ortpackage/package.json").read_text())["targets"].keys() == {"cpu"}
    assert verify(Path("dist/fast/cpu")) == [] and verify(Path("dist/fast/openvino")) == []


def test_bench_times_an_openvino_variant_on_the_cpu_device_token_by_token(openvino_bundle):
    """The bench's openvino rows (bench/run.py openvino_rows): the variant as the gates run it (f32) and
    with the CPU plugin's defaults, exactly `new_tokens` tokens each (EOS ignored)."""
    from phi_pipeline.bench.decode import DecodeConfig
    from phi_pipeline.bench.worker import measure
    from phi_pipeline.bench.run import OPENVINO_CONFIGS

    manifest = json.loads((openvino_bundle / "manifest.json").read_text())
    variant = openvino_bundle / manifest["adapters"][0]["model_dir"]
    for config in OPENVINO_CONFIGS.values():
        result = measure(DecodeConfig("ov", "openvino", str(variant), prompt_lens=(8,), new_tokens=6, reps=2,
                                      session_options=config))
        assert result["threads_effective"] == "OpenVINO default"
        assert result["prompts"]["8"]["decode_tok_s"]["min"] > 0 and result["prompts"]["8"]["ttft_s"]["min"] > 0
