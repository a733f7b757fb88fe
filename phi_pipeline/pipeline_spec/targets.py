"""The target matrix: the one place that knows what each deployment target is.

Nothing else in the package hard-codes an execution provider, a precision list, an export route
or a package name; workflows, validation, the Makefile's install step, the manifest and the model
card all read this table. Pure data: no torch, Olive or onnxruntime import (the Makefile imports it
with the system Python before any virtual environment exists).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Precision = Literal["int4", "int8", "fp16", "bf16", "fp32"]
Layout = Literal["multi-adapter", "merged"]
ExportRoute = Literal["model_builder", "qnn", "openvino"]
TrainingDevice = Literal["cpu", "cuda"]
# What runs a bundle for its evaluation gates (phi_pipeline/runtime/target_models.py): onnxruntime-genai with the
# target's provider (or the CPU provider where it is absent), OpenVINO on its CPU device, or onnxruntime-qnn's
# HTP backend simulated on an x86-64 host.
# Extras that install a build of onnxruntime(-genai) other than the CPU one: the same Python modules.
OTHER_ORT_BUILDS = {"cuda"}
EvalRuntime = Literal["onnxruntime-genai", "openvino", "qnn-htp-simulator"]


@dataclass(frozen=True)
class Target:
    """One deployment target: how it is built and what its runtime can do."""

    name: str
    execution_provider: str
    """Olive's execution provider name for the accelerator spec of the export workflow."""
    device: Literal["cpu", "gpu", "npu"]
    export_route: ExportRoute
    """How the ONNX model is built: Model Builder, or Olive's QNN / OpenVINO pass chain (workflows/npu.py)."""
    precisions: tuple[Precision, ...]
    """Weight precisions the export route produces for this execution provider; the first is the default."""
    runtime_packages: tuple[str, ...]
    """What a user installs to run the bundle on this target."""
    install_extras: tuple[str, ...]
    """pyproject extras of phi-pipeline that build for this target (`make venv TARGET=...` installs them)."""
    multi_lora: bool
    """Whether onnxruntime-genai can swap `.onnx_adapter` files at run time on this provider."""
    training_device: TrainingDevice
    """Where adapters train when the spec says `training.device: auto` and this target is built."""
    pass_environment: str | None = None
    """pyproject dependency group of a separate virtual environment (`.venv-<group>`) that this target's
    export workflows run in, whole (Olive's engine included), when they cannot share the main environment's pins."""
    eval_runtime: EvalRuntime = "onnxruntime-genai"
    """What runs the bundle for the evaluation gates on a build machine."""
    eval_device_required: Literal["cuda"] | None = None
    """A device without which the eval runtime cannot load the bundle: the run then keeps the staged bundle
    and stops with the command to evaluate it there (or publishes ungated with --no-gate)."""
    model_builder_options: dict[str, object] = field(default_factory=dict)
    """Extra Model Builder options always used for this target."""
    decoder_session_options: dict[str, object] = field(default_factory=dict)
    """onnxruntime session options written into a published bundle's genai_config.json (the decoder's)."""
    web_page: bool = False
    """Whether the bundle also gets the web graph and page manifest (bundle/web.py): its operators run on
    onnxruntime-web, so `phi-pipeline serve` and `phi-pipeline web` give a page that runs it in the browser."""
    export_search: bool = False
    """Whether the spec's export.search runs for this target: its bundles run on the build machine's CPU,
    so the variants can be timed where they are built."""
    note: str = ""

    @property
    def default_precision(self) -> Precision:
        return self.precisions[0]

    @property
    def default_layout(self) -> Layout:
        return "multi-adapter" if self.multi_lora else "merged"

    @property
    def venv(self) -> str:
        """The virtual environment that builds this target: `.venv` for every target whose extras add to
        the CPU build (plugin execution providers, OpenVINO), so they share one venv and one training;
        `.venv-<name>` where an extra installs another build of the same modules (onnxruntime-gpu)."""
        return f".venv-{self.name}" if set(self.install_extras) & OTHER_ORT_BUILDS else ".venv"

    @property
    def pass_venv(self) -> str | None:
        return f".venv-{self.pass_environment}" if self.pass_environment else None

    @property
    def export_python(self) -> str | None:
        """The interpreter the export workflows run with, when not this process's."""
        return f"{self.pass_venv}/bin/python" if self.pass_venv else None


# Prefill computes the LM head for the last position only (logits [batch, 1, vocab]), as llama.cpp
# does: the model's largest MatMul runs once per prompt instead of once per prompt token. The
# evaluation, which needs every position's logits, feeds the tokens it scores one at a time
# (GenaiModel.logits). The NPU chains build their own graphs and keep every position.
PRUNED_LM_HEAD: dict[str, object] = {"prune_lm_head": True}

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            name="cpu",
            execution_provider="CPUExecutionProvider",
            device="cpu",
            export_route="model_builder",
            precisions=("int4", "fp32", "int8"),
            runtime_packages=("onnxruntime-genai",),
            install_extras=("cpu",),
            multi_lora=True,
            training_device="cpu",
            model_builder_options=PRUNED_LM_HEAD,
            # 0: one intra-op thread per core; onnxruntime-genai's default when none is named is one thread
            # (1.6x slower decode on 2 cores, bench/report.md). --threads / a config overlay still override it.
            decoder_session_options={"intra_op_num_threads": 0},
            web_page=True,  # on the WASM backend
            export_search=True,
        ),
        Target(
            name="cuda",
            execution_provider="CUDAExecutionProvider",
            device="gpu",
            export_route="model_builder",
            precisions=("fp16", "int4", "bf16", "fp32"),
            runtime_packages=("onnxruntime-genai-cuda", "onnxruntime-gpu"),
            # qlora: the real Phi-3 spec fine-tunes with QLoRA on this target.
            install_extras=("cuda", "qlora"),
            multi_lora=True,
            training_device="cuda",
            model_builder_options=PRUNED_LM_HEAD,
            # The CUDA build of onnxruntime-genai cannot load a model without the CUDA libraries and a GPU.
            eval_device_required="cuda",
        ),
        Target(
            name="webgpu",
            execution_provider="WebGpuExecutionProvider",
            device="gpu",
            export_route="model_builder",
            precisions=("int4",),
            runtime_packages=("onnxruntime-genai",),
            install_extras=("cpu",),
            multi_lora=True,
            training_device="cpu",
            model_builder_options=PRUNED_LM_HEAD,
            web_page=True,
            note="WebGPU ships in the Windows and macOS onnxruntime-genai wheels and in onnxruntime-web.",
        ),
        Target(
            name="dml",
            execution_provider="DmlExecutionProvider",
            device="gpu",
            export_route="model_builder",
            precisions=("int4", "fp16"),
            runtime_packages=("onnxruntime-genai-directml", "onnxruntime-genai-winml"),
            install_extras=("cpu",),
            # The runtime skips adapters on DirectML ("EP DML does not support adapters").
            multi_lora=False,
            training_device="cpu",
            model_builder_options=PRUNED_LM_HEAD,
        ),
        Target(
            name="qnn",
            execution_provider="QNNExecutionProvider",
            device="npu",
            export_route="qnn",
            # GPTQ int4 weights as QDQ with uint16 activations (the olive-recipes QNN chain); nothing else.
            precisions=("int4",),
            runtime_packages=("onnxruntime-genai", "onnxruntime-qnn"),
            # onnxruntime-qnn is an onnxruntime plugin execution provider: it adds to the CPU build.
            install_extras=("cpu", "qnn"),
            # Static graphs compiled to context binaries: an adapter cannot be swapped in at run time.
            multi_lora=False,
            training_device="cpu",
            # The wheel's HTP backend runs the context binaries (simulated on x86-64, the NPU on a Snapdragon).
            eval_runtime="qnn-htp-simulator",
            note="onnxruntime-qnn is a plugin execution provider: register its library "
            "(onnxruntime_qnn.get_library_path()) before loading the model.",
        ),
        Target(
            name="openvino",
            execution_provider="OpenVINOExecutionProvider",
            device="npu",
            export_route="openvino",
            # NNCF weight compression to symmetric int4 (the recipe's) or int8, both NPU formats.
            precisions=("int4", "int8"),
            runtime_packages=("onnxruntime-genai", "onnxruntime-ep-openvino"),
            # openvino: the OpenVINO runtime that evaluates the bundle.
            install_extras=("cpu", "openvino"),
            multi_lora=False,
            training_device="cpu",
            eval_runtime="openvino",
            # optimum-intel caps transformers below the main environment's pin.
            pass_environment="openvino",
            note="onnxruntime-ep-openvino is a plugin execution provider (on Windows, onnxruntime-genai-winml "
            "finds the OpenVINO EP through Windows ML).",
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
        route = "Model Builder" if target.export_route == "model_builder" else f"the {target.export_route} pass chain"
        raise ValueError(
            f"precision {precision!r} is not available for target {target.name!r}; "
            f"choose one of: {', '.join(target.precisions)} (what {route} builds for {target.execution_provider})"
        )
