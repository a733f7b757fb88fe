"""Run a bundle on its target's own runtime for evaluation, and decide whether this machine can.

The evaluation asks two things here:
- `missing_eval_device(target)`: None when this machine can run the target's evaluation runtime, else why
  not (a CUDA bundle on a build host without a GPU). `keep_unevaluated` then keeps the staged bundle and
  `DeviceNeeded` says where it is, which device its gates need and the commands that finish the job.
- `load(bundle, variant)`: a `TargetModel` on the runtime that target.eval_runtime names (targets.py):
  greedy ids from prompt ids, logits of a sequence, and `describe()` (runtime, provider, device,
  cpu_fallback, simulated) for eval.json and report.md.

onnxruntime-genai bundles (cpu, cuda, webgpu, dml) keep going through generate.BundleModel; this module adds
the runtimes onnxruntime-genai cannot stand in for on a build machine: OpenVINO (its CPU device runs the IR an
Intel NPU runs) and the QNN HTP backend's x86-64 simulator. No torch import; runtimes import lazily.
"""

from __future__ import annotations

import ctypes
import json
import shlex
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from phi_pipeline.bundle import MANIFEST, variant_dir
from phi_pipeline.errors import PipelineError, UsageError
from phi_pipeline.targets import Target, get_target

if TYPE_CHECKING:
    from phi_pipeline.plan import Plan

# The folder under a run's folder where a bundle whose gates cannot run here is kept.
UNEVALUATED_DIR = "unevaluated-bundle"
_CUDA_SUCCESS = 0


class DeviceNeeded(PipelineError):
    """The staged bundle is built and kept, but its gates need a device this machine lacks (exit code 1)."""


@dataclass(frozen=True)
class RuntimeDescription:
    """What actually ran an evaluation: recorded so a CPU-fallback figure is never taken for the target's own."""

    runtime: str
    """Runtime package and version, e.g. `openvino 2026.4.1`."""
    provider: str
    """Execution provider or plugin that ran the graph, e.g. `OpenVINO CPU device`."""
    device: str
    """The device the figures come from, e.g. `cpu`, `npu (simulated on x86-64)`."""
    cpu_fallback: bool
    """True when the target's own provider did not run and the same graph ran on CPU kernels instead."""
    simulated: bool = False
    """True when the target's accelerator was simulated on this host (QNN HTP simulator)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class TargetModel(Protocol):
    """One bundle variant loaded on a target runtime: what the evaluation needs from it."""

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of `prompt_ids` (the new ids only, EOS included if produced)."""
        ...

    def logits(self, ids: Sequence[int]) -> np.ndarray | None:
        """Next-token logits at every position of `ids` ([len(ids), vocab]); None if the runtime gives none."""
        ...

    def describe(self) -> RuntimeDescription: ...


# ---------------------------------------------------------------------------------------------- devices


def cuda_device_problem() -> str | None:
    """None when a CUDA device answers through the driver API, else what is missing.

    onnxruntime-gpu lists CUDAExecutionProvider as available with or without a GPU, and the CUDA build of
    onnxruntime-genai then fails inside og.Model; the driver library and a device are the real test.
    """
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver on this machine (libcuda.so.1 cannot be loaded)"
    rc = cuda.cuInit(0)
    if rc != _CUDA_SUCCESS:
        return f"the CUDA driver found no usable device (cuInit returned {rc})"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != _CUDA_SUCCESS or count.value < 1:
        return "the CUDA driver reports no device"
    return None


_DEVICE_CHECKS = {"cuda": cuda_device_problem}


def missing_eval_device(target: Target) -> str | None:
    """Why this machine cannot run `target`'s evaluation runtime, or None when it can."""
    check = _DEVICE_CHECKS.get(target.eval_device_required or "")
    return check() if check else None


def keep_unevaluated(plan: "Plan", staged: Path, reason: str, spec_path: str) -> DeviceNeeded:
    """Move the staged bundle to the run folder (the run's cleanup leaves it there) and return the error
    that tells the user how to finish: gates on the device, or publish without them."""
    kept = plan.paths.run_dir / UNEVALUATED_DIR
    shutil.rmtree(kept, ignore_errors=True)
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staged), kept)
    device = plan.target.eval_device_required
    return DeviceNeeded(
        f"the {plan.target.name} bundle is built and verified, but its publish gates need a {device} device: "
        f"{reason}.\n"
        f"  staged bundle: {kept}\n"
        f"  on a machine with a {device} device (same project folder, for the eval splits and the base model): "
        f"phi-pipeline eval {shlex.quote(kept.as_posix())}\n"
        f"  or publish here without the gates (recorded in manifest.json): "
        f"phi-pipeline run {shlex.quote(spec_path)} --target {plan.target.name} --no-gate"
    )


def skipped_gates(target: Target, reason: str) -> dict[str, Any]:
    """manifest.json's `gates` for a bundle published with --no-gate where its gates could not run."""
    return {
        "enforced": False,
        "passed": None,
        "failures": [],
        "skipped": f"not evaluated: {reason}; its gates need a {target.eval_device_required} device",
    }


# ---------------------------------------------------------------------------------------------- runtimes


def _manifest(bundle: Path) -> dict[str, Any]:
    try:
        return json.loads((bundle / MANIFEST).read_text())
    except FileNotFoundError:
        raise UsageError(str(bundle), [f"no {MANIFEST} here; give a folder published by phi-pipeline run"]) from None


def _variant_folder(bundle: Path, manifest: dict[str, Any], variant: str) -> Path:
    names = [a["name"] for a in manifest["adapters"]]
    if variant not in names:
        raise UsageError(str(bundle), [f"no adapter {variant!r}; this bundle has {', '.join(names)}"])
    return bundle / variant_dir(variant)


def load(bundle: Path, variant: str) -> TargetModel:
    """One variant (adapter) of a merged NPU bundle on its target's evaluation runtime."""
    bundle = Path(bundle)
    manifest = _manifest(bundle)
    target = get_target(manifest["target"])
    loader = _LOADERS.get(target.eval_runtime)
    if loader is None:
        raise UsageError(
            str(bundle), [f"target {target.name!r} evaluates through onnxruntime-genai (generate.BundleModel), not here"]
        )
    return loader(_variant_folder(bundle, manifest, variant))
