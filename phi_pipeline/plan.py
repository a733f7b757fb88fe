"""A spec resolved for one target: precision, LoRA targets, devices and folders, all decided once.

Everything the workflow builders need is here, so they stay pure functions of a Plan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from phi_pipeline.errors import UsageError
from phi_pipeline.paths import PipelinePaths
from phi_pipeline.spec import DEFAULT_TARGET_MODULES, AdapterSpec, PipelineSpec
from phi_pipeline.targets import Target, check_precision, get_target
from phi_pipeline.tiny import builtin_config


@dataclass(frozen=True)
class AdapterPlan:
    spec: AdapterSpec
    target_modules: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Plan:
    spec: PipelineSpec
    source: str
    target: Target
    precision: str
    layout: str
    model_type: str | None
    num_layers: int | None
    adapters: tuple[AdapterPlan, ...]
    paths: PipelinePaths

    @property
    def base_model(self) -> str:
        return self.spec.base_model.name_or_path

    @property
    def base_is_local(self) -> bool:
        return is_local_path(self.base_model) or self.spec.base_model.builtin is not None

    @property
    def training_device(self) -> str:
        """Adapters train on the GPU only for the cuda target; every other target trains on CPU."""
        return "gpu" if self.target.name == "cuda" else "cpu"

    @property
    def training_provider(self) -> str:
        return "CUDAExecutionProvider" if self.training_device == "gpu" else "CPUExecutionProvider"

    @property
    def lora_layout(self) -> tuple[str, ...]:
        """The LoRA target modules shared by every adapter: they fix the exported graph's inputs."""
        return self.adapters[0].target_modules

    def adapter(self, name: str) -> AdapterPlan:
        for a in self.adapters:
            if a.name == name:
                return a
        raise KeyError(name)


def is_local_path(name_or_path: str) -> bool:
    """A base model reference that names a folder rather than a hub id (org/name)."""
    p = Path(name_or_path)
    return p.exists() or p.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") != 1


def read_hf_config(folder: Path) -> dict:
    """A local model's config.json, or {} when there is none yet (a builtin not built, a hub id)."""
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def make_plan(spec: PipelineSpec, target_name: str, *, source: str = "<spec>", precision: str | None = None) -> Plan:
    """Resolve a validated spec for a target; UsageError lists every problem found."""
    problems: list[str] = []
    try:
        target = get_target(target_name)
    except ValueError as exc:
        raise UsageError(source, [str(exc)]) from None

    chosen = precision or spec.export.precision or target.default_precision
    try:
        check_precision(target, chosen)
    except ValueError as exc:
        problems.append(f"export.precision: {exc}")

    base = spec.base_model
    hf_config = read_hf_config(Path(base.name_or_path)) if is_local_path(base.name_or_path) else {}
    if not hf_config and base.builtin is not None:
        hf_config = builtin_config(base.builtin)
    model_type = base.model_type or hf_config.get("model_type")
    num_layers = base.num_hidden_layers or hf_config.get("num_hidden_layers")
    if not hf_config and base.builtin is None and is_local_path(base.name_or_path):
        # Refused here, before anything asks the hub what this name might be; what depends on
        # the model's config is not reported on top.
        raise UsageError(
            source,
            [
                *problems,
                f"base_model.name_or_path: {base.name_or_path} is not a model folder (no config.json there); "
                "fix the path, or use a hub id such as microsoft/Phi-3-mini-4k-instruct",
            ],
        )
    if num_layers is None and chosen == "int4":
        problems.append(
            "base_model.num_hidden_layers: unknown (no local config.json); set it so the int4 export can keep "
            "the LoRA MatMuls unquantized"
        )

    adapters = []
    for i, a in enumerate(spec.adapters):
        modules = a.lora.target_modules or DEFAULT_TARGET_MODULES.get(model_type or "")
        if not modules:
            problems.append(
                f"adapters.{i}.lora.target_modules: no default for model type {model_type!r}; "
                "list the modules to adapt, or set base_model.model_type"
            )
            modules = []
        adapters.append(AdapterPlan(spec=a, target_modules=tuple(modules)))

    layouts = {a.target_modules for a in adapters}
    if len(layouts) > 1:
        problems.append(
            "adapters: every adapter of one bundle must adapt the same target_modules, because they share one "
            f"exported graph; found {sorted(sorted(m) for m in layouts)}"
        )
    if spec.export.layout == "multi-adapter" and not target.multi_lora:
        problems.append(
            f"export.layout: target {target.name!r} cannot swap adapters at run time; use layout: merged "
            "(one model per adapter) or leave layout unset"
        )
    if problems:
        raise UsageError(source, problems)
    return Plan(
        spec=spec,
        source=source,
        target=target,
        precision=chosen,
        layout=spec.export.layout or target.default_layout,
        model_type=model_type,
        num_layers=num_layers,
        adapters=tuple(adapters),
        paths=PipelinePaths(Path(spec.work_dir), Path(spec.output_dir), spec.name, target.name),
    )
