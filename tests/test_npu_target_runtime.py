"""target_runtime's device decision: a CUDA bundle built on a machine without a GPU stops cleanly with
where its staged bundle is kept and what to run, or publishes ungated with --no-gate."""

from __future__ import annotations

import ctypes
import io
import json
from pathlib import Path

import pytest

from phi_pipeline.bundle import layout, staging as bundle
from phi_pipeline.errors import PipelineError
from phi_pipeline.pipeline import _evaluate_and_gate
from phi_pipeline.pipeline_spec.plan import make_plan
from phi_pipeline.orchestration.progress import Stages
from phi_pipeline.pipeline_spec.schema import parse_spec
from phi_pipeline.runtime.target_models import (
    UNEVALUATED_DIR,
    DeviceNeeded,
    cuda_device_problem,
    missing_eval_device,
)
from phi_pipeline.pipeline_spec.targets import TARGETS

SPEC = """\
name: nogpu
base_model: {name_or_path: base}
training: {max_steps: 2, torch_dtype: float32}
adapters:
  - name: plain
    data: {train: data/plain.jsonl, eval: data/plain_eval.jsonl, response_field: a, text_template: "Q: {q}\\nA: {a}"}
"""


def _has_cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


no_cuda = pytest.mark.skipif(_has_cuda_driver(), reason="this machine has a CUDA driver: the no-GPU path is not reachable")


@pytest.fixture
def cuda_plan(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    (tmp_path / "base/config.json").write_text(json.dumps({"model_type": "phi3", "num_hidden_layers": 2}))
    monkeypatch.chdir(tmp_path)
    return make_plan(parse_spec(SPEC, source="spec.yaml"), "cuda", source="pipelines/nogpu.yaml")


def _staged(tmp_path: Path) -> Path:
    staged = tmp_path / "dist/.staging/nogpu-cuda"
    staged.mkdir(parents=True)
    (staged / "model.onnx").write_bytes(b"graph")
    (staged / layout.MANIFEST).write_text(json.dumps({"target": "cuda", "files": {}}))
    bundle.finalize_manifest(staged, {})
    return staged


@no_cuda
def test_cuda_device_problem_names_the_missing_driver_when_no_gpu():
    assert "libcuda.so.1" in cuda_device_problem()


@no_cuda
def test_missing_eval_device_is_only_reported_for_targets_that_need_one():
    assert missing_eval_device(TARGETS["cuda"])
    for name in ("cpu", "webgpu", "dml", "openvino", "qnn"):  # qnn: the HTP backend simulates on x86-64
        assert missing_eval_device(TARGETS[name]) is None, name


@no_cuda
def test_cuda_gates_stop_with_staged_path_and_commands_when_no_gpu(cuda_plan, tmp_path):
    staged = _staged(tmp_path)
    with pytest.raises(DeviceNeeded) as info:
        _evaluate_and_gate(cuda_plan, staged, [], Stages(io.StringIO()), no_gate=False)
    kept = cuda_plan.paths.run_dir / UNEVALUATED_DIR
    message = str(info.value)
    assert isinstance(info.value, PipelineError)  # the CLI prints it without a traceback, exit 1
    assert not staged.exists() and (kept / "model.onnx").is_file()
    assert bundle.verify(kept) == []  # the kept bundle is whole: `phi-pipeline eval` can run on it
    assert f"staged bundle: {kept}" in message
    assert "need a cuda device" in message and "libcuda.so.1" in message
    assert f"phi-pipeline eval {kept.as_posix()}" in message
    assert "phi-pipeline run pipelines/nogpu.yaml --target cuda --no-gate" in message


@no_cuda
def test_cuda_gates_are_recorded_as_skipped_when_no_gpu_and_no_gate(cuda_plan, tmp_path):
    staged = _staged(tmp_path)
    out = io.StringIO()
    _evaluate_and_gate(cuda_plan, staged, [], Stages(out), no_gate=True)
    manifest = json.loads((staged / layout.MANIFEST).read_text())
    assert manifest["gates"]["enforced"] is False and manifest["gates"]["passed"] is None
    assert manifest["gates"]["skipped"].endswith("its gates need a cuda device")
    assert "not evaluated (--no-gate)" in out.getvalue()
    assert bundle.verify(staged) == []


def test_genai_description_names_the_cpu_provider_when_it_stood_in():
    from phi_pipeline.runtime.target_models import genai_description

    fallback = genai_description("WebGpuExecutionProvider", cpu_fallback=True)
    assert fallback.cpu_fallback is True and fallback.provider == "CPUExecutionProvider" and fallback.device == "cpu"
    own = genai_description("CUDAExecutionProvider", cpu_fallback=False).to_json()
    assert own["provider"] == "CUDAExecutionProvider" and own["device"] == "gpu" and own["simulated"] is False
    assert own["runtime"].startswith("onnxruntime-genai 0.18")
