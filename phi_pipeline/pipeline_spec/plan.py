"""A spec resolved for one target: precision, layout, LoRA targets, devices and folders, all decided once.

Everything the workflow builders need is here, so they stay pure functions of a Plan.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from phi_pipeline.errors import UsageError
from phi_pipeline.pipeline_spec.paths import PipelinePaths
from phi_pipeline.pipeline_spec.schema import DEFAULT_TARGET_MODULES, AdapterSpec, DataSpec, ExportSearchSpec, PipelineSpec
from phi_pipeline.pipeline_spec.targets import Target, TrainingDevice, check_precision, get_target
from phi_pipeline.tiny import builtin_config


@dataclass(frozen=True)
class AdapterPlan:
    spec: AdapterSpec
    target_modules: tuple[str, ...]
    """The modules the trained adapter has LoRA weights on (for qlora: the ones Olive's QLoRA adapts)."""
    training_device: TrainingDevice
    train_data: dict[str, Any]
    """Olive's load_dataset_config of the rows the adapter trains on."""
    validation_data: dict[str, Any] | None
    """Olive's load_dataset_config of the validation rows the trainer evaluates, or None."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def cuts_validation(self) -> bool:
        """Whether the run cuts train/validation files out of a local training file (validation_fraction)."""
        return self.spec.data.hub is None and bool(self.spec.data.held_out_fraction)


@dataclass(frozen=True)
class Plan:
    spec: PipelineSpec
    """The spec as built for this target (its `targets.<name>` block applied)."""
    source: str
    target: Target
    precision: str
    layout: str
    model_type: str | None
    num_layers: int | None
    max_positions: int | None
    """The model's context window (max_position_embeddings), when a local config.json tells it."""
    adapters: tuple[AdapterPlan, ...]
    paths: PipelinePaths
    head_size: int | None = None
    """Attention head size (head_dim, or hidden_size / num_attention_heads), when a local config.json tells it."""

    @property
    def base_model(self) -> str:
        return self.spec.base_model.name_or_path

    @property
    def base_is_local(self) -> bool:
        return is_local_path(self.base_model) or self.spec.base_model.builtin is not None

    @property
    def lora_layout(self) -> tuple[str, ...]:
        """The LoRA target modules shared by every adapter: they fix the multi-adapter graph's inputs."""
        return self.adapters[0].target_modules

    def adapter(self, name: str) -> AdapterPlan:
        for a in self.adapters:
            if a.name == name:
                return a
        raise KeyError(name)


def export_search(plan: Plan) -> tuple[ExportSearchSpec | None, str | None]:
    """The export search this plan runs, or None and why it runs none (None: the spec asks for none)."""
    search = plan.spec.export.search
    if search is None or not search.enabled:
        return None, None
    if not plan.target.export_search:
        return None, f"target {plan.target.name} does not run on this machine's CPU, where the variants are timed"
    if plan.precision != "int4" or plan.layout != "multi-adapter":
        return None, f"it searches int4 settings of a multi-adapter bundle ({plan.precision}, {plan.layout} here)"
    return search, None


def variant_plan(plan: Plan, changes: dict[str, Any]) -> Plan:
    """The plan with one export-search candidate's changes applied (and no search of its own)."""
    return replace(plan, spec=plan.spec.model_copy(update={"export": plan.spec.export.with_changes(changes)}))


def is_local_path(name_or_path: str) -> bool:
    """A base model reference that names a folder rather than a hub id (org/name)."""
    p = Path(name_or_path)
    return p.exists() or p.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") != 1


def _head_size(hf_config: dict) -> int | None:
    if hf_config.get("head_dim"):
        return int(hf_config["head_dim"])
    if hf_config.get("hidden_size") and hf_config.get("num_attention_heads"):
        return int(hf_config["hidden_size"]) // int(hf_config["num_attention_heads"])
    return None


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
    try:
        spec = spec.for_target(target.name)
    except ValidationError as exc:
        raise UsageError(source, _target_block_problems(target.name, exc)) from None

    chosen = precision or spec.export.precision or target.default_precision
    try:
        check_precision(target, chosen)
    except ValueError as exc:
        problems.append(f"export.precision: {exc}")
    layout = spec.export.layout or target.default_layout
    if layout == "multi-adapter" and not target.multi_lora:
        problems.append(
            f"export.layout: target {target.name!r} cannot swap adapters at run time; use layout: merged "
            "(one model per adapter) or leave layout unset"
        )

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
    if num_layers is None and chosen == "int4" and layout == "multi-adapter":
        problems.append(
            "base_model.num_hidden_layers: unknown (no local config.json); set it so the int4 export can keep "
            "the LoRA MatMuls unquantized"
        )

    paths = PipelinePaths(Path(spec.work_dir), Path(spec.output_dir), spec.name, target.name)
    adapters = [_adapter_plan(i, a, model_type, target, paths, problems) for i, a in enumerate(spec.adapters)]
    saving = [a.name for a in spec.adapters if a.lora.modules_to_save]
    if saving and layout == "multi-adapter":
        problems.append(
            f"lora.modules_to_save (adapters {', '.join(saving)}): the multi-adapter layout swaps LoRA weights only "
            "(Model Builder's adapter export drops fully trained modules); use export.layout: merged"
        )
    layouts = {a.target_modules for a in adapters}
    if layout == "multi-adapter" and len(layouts) > 1:
        problems.append(
            "adapters: every adapter of one bundle must adapt the same target_modules, because they share one "
            f"exported graph; found {sorted(sorted(m) for m in layouts)} (or use export.layout: merged)"
        )
    if problems:
        raise UsageError(source, problems)
    return Plan(
        spec=spec,
        source=source,
        target=target,
        precision=chosen,
        layout=layout,
        model_type=model_type,
        num_layers=num_layers,
        max_positions=hf_config.get("max_position_embeddings"),
        head_size=_head_size(hf_config),
        adapters=tuple(adapters),
        paths=paths,
    )


def _target_block_problems(target: str, exc: ValidationError) -> list[str]:
    """What is wrong with the spec once `targets.<target>` is applied; an error every adapter inherits
    from the top-level block is reported once, there."""
    errors = [(tuple(e["loc"]), e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
    top_level = {(loc, msg) for loc, msg in errors if loc[:1] != ("adapters",)}
    return [
        f"targets.{target} applied: {'.'.join(map(str, loc))}: {msg}"
        for loc, msg in errors
        if not (loc[:1] == ("adapters",) and (loc[2:], msg) in top_level)
    ]


def local_file_config(path: str | Path, field: str | None = None) -> dict[str, Any]:
    """Olive's load_dataset_config for a local JSON Lines or JSON array file (datasets' json loader)."""
    config: dict[str, Any] = {"data_name": "json", "data_files": [Path(path).as_posix()], "split": "train"}
    if field is not None:
        config["field"] = field
    return config


def hub_config(data: DataSpec, split: str) -> dict[str, Any]:
    config: dict[str, Any] = {"data_name": data.hub, "split": split}
    if data.subset is not None:
        config["subset"] = data.subset
    return config


def _training_data(name: str, data: DataSpec, paths: PipelinePaths) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Where the trainer's training and validation rows come from."""
    if data.hub is not None:
        train, validation = data.hub_training_splits()
        return hub_config(data, train), hub_config(data, validation) if validation else None
    if data.validation is not None:
        return local_file_config(data.train, data.field), local_file_config(data.validation, data.field)
    if data.held_out_fraction:
        return local_file_config(paths.split_file(name, "train")), local_file_config(paths.split_file(name, "validation"))
    return local_file_config(data.train, data.field), None


def _adapter_plan(
    i: int, a: AdapterSpec, model_type: str | None, target: Target, paths: PipelinePaths, problems: list[str]
) -> AdapterPlan:
    where = f"adapters.{i}.lora"
    default = DEFAULT_TARGET_MODULES.get(model_type or "")
    if a.lora.method == "qlora":
        # Olive's QLoRA pass puts LoRA on every 4-bit Linear and ignores target_modules; the layout
        # recorded is therefore the decoder's Linear modules, whatever the spec lists.
        if a.lora.target_modules is not None:
            known = f" (for {model_type}: {', '.join(default)})" if default else ""
            problems.append(
                f"{where}.target_modules ({a.name}): method qlora adapts every 4-bit Linear of the decoder "
                f"layers{known} and ignores target_modules; remove target_modules, or use method: lora"
            )
        elif default is None:
            problems.append(
                f"{where}.method ({a.name}): qlora needs the Linear modules of model type {model_type!r}, known "
                f"for: {', '.join(DEFAULT_TARGET_MODULES)}; use method: lora with target_modules, or set "
                "base_model.model_type"
            )
        modules = default or []
    else:
        modules = a.lora.target_modules or default or []
        if not modules:
            problems.append(
                f"{where}.target_modules: no default for model type {model_type!r}; "
                "list the modules to adapt, or set base_model.model_type"
            )
    device = target.training_device if a.training.device == "auto" else a.training.device
    train, validation = _training_data(a.name, a.data, paths)
    if a.search is not None and a.search.enabled and validation is None:
        problems.append(
            f"adapters.{i}.search ({a.name}): trials are scored on a validation split, and this adapter has none; "
            "set data.validation (a file) or data.validation_fraction above 0 (never the eval split: the gates use it)"
        )
    return AdapterPlan(a, tuple(modules), device, train, validation)


def missing_installs(plan: Plan) -> list[str]:
    """What running the plan needs installed here and is not, naming the install step that adds it.

    Checked before a run, not by make_plan: `phi-pipeline configs` writes any target's workflows
    on any machine. Looks packages up without importing them (no torch import).
    """
    problems = []
    qlora = [a.name for a in plan.adapters if a.spec.lora.method == "qlora"]
    if qlora and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            f"lora.method: qlora (adapters {', '.join(qlora)}) needs bitsandbytes, which is not installed: "
            "install the qlora extra (pip install -e '.[qlora]', or make venv EXTRAS=cpu,qlora), or use method: lora"
        )
    if "qnn" in plan.target.install_extras and importlib.util.find_spec("onnxruntime_qnn") is None:
        problems.append(
            f"target {plan.target.name!r} needs onnxruntime-qnn, which is not installed: "
            f"make venv TARGET={plan.target.name} (adds the qnn extra to {plan.target.venv})"
        )
    if "openvino" in plan.target.install_extras and importlib.util.find_spec("openvino") is None:
        problems.append(
            f"target {plan.target.name!r} needs the openvino extra (the OpenVINO runtime its evaluation runs on): "
            f"make venv TARGET={plan.target.name}"
        )
    pass_venv = plan.target.pass_venv
    if pass_venv and not (Path(pass_venv) / "bin" / "python").exists():
        problems.append(
            f"target {plan.target.name!r} runs its export passes in {pass_venv} (pyproject dependency group "
            f"{plan.target.pass_environment!r}), which does not exist: make venv TARGET={plan.target.name}"
        )
    return problems
