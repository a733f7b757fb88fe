"""--target qnn on this x86-64 CPU machine: Olive's QNN chain (GPTQ and activation calibration on the
adapter's own train split, context binaries prepared by onnxruntime-qnn's HTP backend) builds every variant,
the HTP simulator loads them, and the gates, which cannot run on x86-64 (README "What was executed on this
machine"), stop the run with the kept bundle's path, or are recorded as skipped with --no-gate."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from phi_pipeline.bundle import verify

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("onnxruntime_qnn") is None,
        reason="needs the qnn extra in this venv (.ci/npu-venvs.sh, or make venv TARGET=qnn)",
    ),
    pytest.mark.skipif(platform.machine().lower() in ("arm64", "aarch64"), reason="the x86-64 host path"),
]

ROOT = Path(__file__).resolve().parent.parent


def _cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    # a subprocess: onnxruntime-genai's QNN sessions are best kept out of the test process
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=project, env=env, capture_output=True, text=True, timeout=3600)


@pytest.fixture(scope="module")
def qnn_runs(fast_project) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """The fast spec for qnn in the fast project (adapters from the cpu run's cache): gated, then --no-gate."""
    if not (fast_project / ".venv").exists():  # Olive's QNN system: a PythonEnvironment on this venv
        (fast_project / ".venv").symlink_to(Path(sys.prefix))
    run = ["-m", "phi_pipeline.cli", "run", "pipelines/fast.yaml", "--target", "qnn"]
    return _cli(fast_project, *run), _cli(fast_project, *run, "--no-gate")


def test_qnn_gates_stop_with_the_kept_bundle_and_the_device_they_need(qnn_runs, fast_project):
    gated, _ = qnn_runs
    kept = fast_project / ".phi-pipeline/runs/fast/qnn/unevaluated-bundle"
    assert gated.returncode == 1, gated.stderr[-2000:]
    assert "error: the qnn bundle is built and verified, but its publish gates need a snapdragon device" in gated.stderr
    assert f"phi-pipeline eval {kept.relative_to(fast_project).as_posix()}" in gated.stderr
    assert "Traceback" not in gated.stderr


def test_qnn_bundle_publishes_context_binaries_per_adapter_with_no_gate_and_verifies(qnn_runs, fast_project):
    _, ungated = qnn_runs
    assert ungated.returncode == 0, ungated.stderr[-2000:]
    bundle = fast_project / "dist/fast/qnn"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["gates"]["enforced"] is False and "need a snapdragon device" in manifest["gates"]["skipped"]
    for a in manifest["adapters"]:
        folder = bundle / a["model_dir"]
        genai = json.loads((folder / "genai_config.json").read_text())
        assert {"embeddings", "context_ctx", "iterator_ctx", "lm_head"} <= {n for s in genai["model"]["decoder"]["pipeline"] for n in s}
        assert len(list(folder.glob("context_*_ctx_qnn.bin"))) == len(list(folder.glob("iterator_*_ctx_qnn.bin"))) == 4
    assert verify(bundle) == []


def test_qnn_variants_load_on_the_simulated_htp(qnn_runs, fast_project):
    probe = (
        "import json, sys; from phi_pipeline import target_runtime; "
        "print(json.dumps(target_runtime.load(sys.argv[1], sys.argv[2]).describe().to_json()))"
    )
    for name in ("tone", "antonyms"):
        loaded = _cli(fast_project, "-c", probe, "dist/fast/qnn", name)
        assert loaded.returncode == 0, loaded.stderr[-2000:]
        described = json.loads(loaded.stdout.strip().splitlines()[-1])
        assert described["simulated"] is True and described["cpu_fallback"] is False
        assert described["provider"].startswith("QNNExecutionProvider, HTP backend")
