"""The target matrix: the one place that knows what each deployment target is.

Nothing else in the package hard-codes an execution provider, a precision list or a runtime
package name; workflows, validation, the manifest and the model card all read this table.
Pure data: no torch, Olive or onnxruntime import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Precision = Literal["int4", "int8", "fp16", "bf16", "fp32"]
Layout = Literal["multi-adapter", "merged"]


@dataclass(frozen=True)
class Target:
    """One deployment target and what its runtime can do."""

    name: str
    execution_provider: str
    """Olive's execution provider name for the accelerator spec of the export workflow."""
    device: Literal["cpu", "gpu", "npu"]
    precisions: tuple[Precision, ...]
    """Precisions Model Builder can produce for this execution provider; the first is the default."""
    runtime_packages: tuple[str, ...]
    """What a user installs to run the bundle on this target."""
    multi_lora: bool
    """Whether onnxruntime-genai can swap `.onnx_adapter` files at run time on this provider."""
    model_builder_options: dict[str, object] = field(default_factory=dict)
    """Extra Model Builder options always used for this target."""
    note: str = ""

    @property
    def default_precision(self) -> Precision:
        return self.precisions[0]

    @property
    def default_layout(self) -> Layout:
        return "multi-adapter" if self.multi_lora else "merged"


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            name="cpu",
            execution_provider="CPUExecutionProvider",
            device="cpu",
            precisions=("int4", "fp32", "int8"),
            runtime_packages=("onnxruntime-genai",),
            multi_lora=True,
        ),
        Target(
            name="cuda",
            execution_provider="CUDAExecutionProvider",
            device="gpu",
            precisions=("fp16", "int4", "bf16", "fp32"),
            runtime_packages=("onnxruntime-genai-cuda", "onnxruntime-gpu"),
            multi_lora=True,
        ),
        Target(
            name="webgpu",
            execution_provider="WebGpuExecutionProvider",
            device="gpu",
            precisions=("int4",),
            runtime_packages=("onnxruntime-genai",),
            multi_lora=True,
            note="WebGPU ships in the Windows and macOS onnxruntime-genai wheels and in onnxruntime-web.",
        ),
        Target(
            name="dml",
            execution_provider="DmlExecutionProvider",
            device="gpu",
            precisions=("int4", "fp16"),
            runtime_packages=("onnxruntime-genai-directml", "onnxruntime-genai-winml"),
            # The runtime skips adapters on DirectML ("EP DML does not support adapters").
            multi_lora=False,
        ),
    )
}


def get_target(name: str) -> Target:
    """The target called `name`, or a ValueError that lists the known ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}") from None


def check_precision(target: Target, precision: str) -> None:
    """Refuse a precision the target cannot build, naming what it allows."""
    if precision not in target.precisions:
        raise ValueError(
            f"precision {precision!r} is not available for target {target.name!r}; "
            f"choose one of: {', '.join(target.precisions)}"
        )
