"""--target qnn on this x86-64 CPU machine: Olive's QNN chain (GPTQ and activation calibration on the
adapter's own train split, context binaries prepared by onnxruntime-qnn's HTP backend) builds every variant,
and the publish gates run each variant on that HTP backend (simulated here) against PyTorch+PEFT."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from phi_pipeline.bundle.staging import verify

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("onnxruntime_qnn") is None,
        reason="needs the qnn extra in this venv (make test installs it; or make venv TARGET=qnn)",
    ),
    pytest.mark.skipif(platform.machine().lower() in ("arm64", "aarch64"), reason="the x86-64 host path"),
]

ROOT = Path(__file__).resolve().parent.parent


def _cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    # a subprocess: onnxruntime-genai's QNN sessions are best kept out of the test process
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=project, env=env, capture_output=True, text=True, timeout=3600)


@pytest.fixture(scope="module")
def qnn_run(fast_project) -> subprocess.CompletedProcess:
    """The fast spec for qnn in the fast project (adapters from the cpu run's cache), gates enforced."""
    if not (fast_project / ".venv").exists():  # Olive's QNN system: a PythonEnvironment on this venv
        (fast_project / ".venv").symlink_to(Path(sys.prefix))
    return _cli(fast_project, "-m", "phi_pipeline.cli", "run", "pipelines/fast.yaml", "--target", "qnn")


def test_qnn_gates_ran_on_the_simulated_htp_against_pytorch(qnn_run, fast_project):
    assert qnn_run.returncode == 0, qnn_run.stderr[-3000:]
    assert "Traceback" not in qnn_run.stderr
    bundle = fast_project / "dist/fast/qnn"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["gates"]["enforced"] is True and manifest["gates"]["passed"] is True
    evaluation = json.loads((bundle / "eval.json").read_text())
    for name, figures in manifest["evaluation"]["adapters"].items():
        assert figures["adapter_onnx"] is not None and figures["adapter_pytorch"] is not None, name
        assert figures["token_agreement"] is not None and figures["perplexity_ratio"] is not None, name
        runtime = evaluation["adapters"][name]["runtime"]
        assert runtime["simulated"] is True and runtime["cpu_fallback"] is False
        assert runtime["provider"].startswith("QNNExecutionProvider, HTP backend")


def test_qnn_bundle_publishes_context_binaries_per_adapter_and_verifies(qnn_run, fast_project):
    from phi_pipeline.bundle import qnn_graph

    assert qnn_run.returncode == 0, qnn_run.stderr[-3000:]
    bundle = fast_project / "dist/fast/qnn"
    manifest = json.loads((bundle / "manifest.json").read_text())
    for a in manifest["adapters"]:
        folder = bundle / a["model_dir"]
        genai = json.loads((folder / "genai_config.json").read_text())
        assert {"embeddings", "context_ctx", "iterator_ctx", "lm_head"} <= {n for s in genai["model"]["decoder"]["pipeline"] for n in s}
        assert len(list(folder.glob("context_*_ctx_qnn.bin"))) == len(list(folder.glob("iterator_*_ctx_qnn.bin"))) == 4
        assert qnn_graph.widen_first_window(folder) == []  # staging rewired the prompt graph already
    assert verify(bundle) == []


def test_qnn_variant_generates_past_its_prompt_window_on_the_simulated_htp(qnn_run, fast_project):
    """A prompt longer than the prompt graph's window: its first W tokens through the prompt graph, the rest
    through the iterator; the logits of the greedy continuation pick the generated tokens again."""
    probe = (
        "import json, sys, numpy as np; from phi_pipeline.runtime import target_models as target_runtime; "
        "m = target_runtime.load(sys.argv[1], sys.argv[2]); ids = list(range(5, 5 + m.window + 9)); "
        "new = m.generate(ids, 4); logits = m.logits(ids + new[:-1]); "
        "print(json.dumps({'new': new, 'again': [int(t) for t in logits[len(ids) - 1:].argmax(-1)], "
        "'rows': len(logits), 'n': len(ids)}))"
    )
    for name in ("tone", "antonyms"):
        out = _cli(fast_project, "-c", probe, "dist/fast/qnn", name)
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["rows"] == got["n"] + len(got["new"]) - 1
        # teacher-forced logits agree with the greedy tokens, except after an EOS stop
        assert got["again"][: len(got["new"])] == got["new"], (name, got)
