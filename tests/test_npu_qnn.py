"""--target qnn end to end on this x86-64 CPU machine: Olive's QNN chain (GPTQ and activation calibration on
the adapter's own train split, context binaries prepared by onnxruntime-qnn's HTP backend), the bundle
published and verified, and each variant run by the QNN EP's HTP backend in simulation."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from phi_pipeline.bundle import verify
from phi_pipeline.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("onnxruntime_qnn") is None,
        reason="needs the qnn extra in this venv (.ci/npu-venvs.sh, or make venv TARGET=qnn)",
    ),
]


@pytest.fixture(scope="module")
def qnn_bundle(fast_project) -> Path:
    """The fast spec built for qnn in the fast project: its adapters come from the cpu run's cache."""
    old = Path.cwd()
    os.chdir(fast_project)
    try:
        if not Path(".venv").exists():  # Olive's QNN system is a PythonEnvironment on this venv, project-relative
            Path(".venv").symlink_to(Path(os.sys.prefix))
        assert main(["run", "pipelines/fast.yaml", "--target", "qnn"]) == 0
    finally:
        os.chdir(old)
    return fast_project / "dist/fast/qnn"


def test_qnn_bundle_publishes_context_binaries_per_adapter_and_verifies(qnn_bundle):
    manifest = json.loads((qnn_bundle / "manifest.json").read_text())
    assert manifest["target"] == "qnn" and manifest["layout"] == "merged"
    for a in manifest["adapters"]:
        folder = qnn_bundle / a["model_dir"]
        assert (folder / "genai_config.json").is_file() and list(folder.glob("*.bin")), a["name"]
    assert verify(qnn_bundle) == []


def test_qnn_gates_ran_on_the_simulated_htp(qnn_bundle):
    from phi_pipeline import target_runtime

    manifest = json.loads((qnn_bundle / "manifest.json").read_text())
    assert manifest["gates"]["enforced"] is True and manifest["gates"]["passed"] is True
    for name, figures in manifest["evaluation"]["adapters"].items():
        assert figures["adapter_onnx"] is not None and figures["adapter_pytorch"] is not None, (name, figures)
        described = target_runtime.load(qnn_bundle, name).describe()
        assert described.simulated is True and described.cpu_fallback is False
        assert "QNNExecutionProvider" in described.provider
