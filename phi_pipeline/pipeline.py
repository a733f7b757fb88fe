"""The run: spec -> checked inputs -> trained adapters -> exported base -> staged bundle -> published.

Each stage reads what the previous one wrote. Training and export results are kept in the
content-addressed cache, so a re-run with nothing changed does no Olive work, a changed dataset
retrains exactly its adapter, and an interrupted run resumes from what finished.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from phi_pipeline import bundle
from phi_pipeline.cache import Cache, DigestMemo, content_key, file_sha256, tree_sha256
from phi_pipeline.configs import EXPORT_FILE, finetune_file, write_configs
from phi_pipeline.data import check_data
from phi_pipeline.errors import PipelineError, UsageError
from phi_pipeline.plan import AdapterPlan, Plan, is_local_path, make_plan
from phi_pipeline.progress import Stages
from phi_pipeline.publish import publish_dir
from phi_pipeline.runner import run_olive
from phi_pipeline.spec import load_spec
from phi_pipeline.versions import package_versions

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class TrainedAdapter:
    plan: AdapterPlan
    folder: Path
    """Cache entry: the PEFT adapter (adapter/), trainer_state.json and tensorboard/ logs."""
    key: str
    dataset_sha256: dict[str, str]


def load_plan(spec_path: str | Path, target: str, precision: str | None = None) -> Plan:
    spec = load_spec(spec_path)
    return make_plan(spec, target, source=Path(spec_path).as_posix(), precision=precision)


def check_inputs(plan: Plan) -> None:
    """Everything that can be checked before training, reported together (UsageError, exit 2)."""
    problems: list[str] = []
    for i, adapter in enumerate(plan.adapters):
        problems += check_data(adapter.spec.data, f"adapters.{i}.data ({adapter.name})")
    base = plan.spec.base_model
    if base.builtin is None:
        if is_local_path(base.name_or_path):  # make_plan refused a folder without config.json
            folder = Path(base.name_or_path)
            if not any(folder.glob("*.safetensors")):
                problems.append(
                    f"base_model.name_or_path: {folder} has no *.safetensors weights; pickled checkpoints "
                    "(.bin/.pt) are never loaded: convert them with save_pretrained(safe_serialization=True)"
                )
        elif os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hf_cache(base.name_or_path):
            problems.append(
                f"base_model.name_or_path: {base.name_or_path!r} is a hub id, but HF_HUB_OFFLINE=1 and it is not in "
                "the local Hugging Face cache; download it while online (huggingface-cli download "
                f"{base.name_or_path}) or point name_or_path at a local folder"
            )
    if problems:
        raise UsageError(plan.source, problems)


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def ensure_base(plan: Plan, stages: Stages) -> None:
    base = plan.spec.base_model
    folder = Path(base.name_or_path)
    if base.builtin is None or (folder / "config.json").is_file():
        return
    from phi_pipeline.tiny.base_model import build_tiny_base

    with stages.stage("base", f"building the embedded {base.builtin} base model into {folder}"):
        build_tiny_base(folder)


def base_digest(plan: Plan, memo: DigestMemo) -> str:
    if plan.base_is_local:
        return tree_sha256(Path(plan.base_model), memo)
    return f"hub:{plan.base_model}"


def _run_workflow(plan: Plan, config_file: str, outputs: list[Path], echo: bool, seed: int | None = None) -> None:
    """Run one of the plan's Olive workflows; a local base keeps Olive offline and inside work_dir."""
    local = plan.base_is_local
    run_olive(
        plan.paths.configs_dir / config_file,
        plan.paths.logs_dir / config_file.replace(".json", ".log"),
        outputs,
        echo=echo,
        offline=local,
        hf_cache=plan.paths.hf_cache_dir if local else None,
        seed=seed,
    )


def collect_finetune_result(out: Path) -> Path:
    """What a fine-tune leaves for later stages: the adapter, the trainer's log history and its
    TensorBoard logs (Olive's output also holds a full copy of the base, which is not kept)."""
    result = out / "result"
    shutil.rmtree(result, ignore_errors=True)
    shutil.copytree(out / "adapter", result / "adapter")
    states = sorted((out / "trainer").glob("checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    if states:
        shutil.copy2(states[-1], result / TRAINER_STATE)
    if (out / "trainer" / "runs").is_dir():
        shutil.copytree(out / "trainer" / "runs", result / "tensorboard")
    return result


def train_adapters(plan: Plan, stages: Stages, cache: Cache, base: str, echo: bool) -> list[TrainedAdapter]:
    from phi_pipeline.configs import workflow_configs

    configs = workflow_configs(plan)
    trained = []
    for adapter in plan.adapters:
        data = adapter.spec.data
        shas = {"train": file_sha256(Path(data.train)), "eval": file_sha256(Path(data.eval))}
        key = content_key(
            {
                "stage": "finetune",
                "base": base,
                "datasets": shas,
                "workflow": configs[finetune_file(adapter.name)],
                "packages": package_versions(),
            }
        )
        stage = f"finetune:{adapter.name}"
        with stages.stage(stage, f"fine-tuning adapter {adapter.name!r} ({adapter.spec.lora.method})"):
            entry = cache.get("adapters", key)
            if entry is None:
                out = plan.paths.finetune_dir(adapter.name)
                shutil.rmtree(out, ignore_errors=True)
                _run_workflow(
                    plan,
                    finetune_file(adapter.name),
                    [out / "adapter" / name for name in ADAPTER_FILES],
                    echo,
                    seed=adapter.spec.training.seed,
                )
                entry = cache.put("adapters", key, collect_finetune_result(out), {"adapter": adapter.name, "datasets": shas})
            else:
                stages.mark_cached(stage)
        trained.append(TrainedAdapter(adapter, entry, key, shas))
    return trained


def export_base(plan: Plan, stages: Stages, cache: Cache, base: str, echo: bool) -> Path:
    from phi_pipeline.adapters import write_layout_adapter
    from phi_pipeline.configs import workflow_configs

    key = content_key(
        {
            "stage": "export",
            "base": base,
            "workflow": workflow_configs(plan)[EXPORT_FILE],
            "packages": package_versions(),
        }
    )
    with stages.stage("export", f"exporting the base model ({plan.target.name}, {plan.precision})"):
        entry = cache.get("exports", key)
        if entry is None:
            write_layout_adapter(plan)
            out = plan.paths.export_dir
            shutil.rmtree(out, ignore_errors=True)
            _run_workflow(plan, EXPORT_FILE, [out / "model.onnx", out / "genai_config.json"], echo)
            entry = cache.put("exports", key, out, {"pipeline": plan.spec.name, "target": plan.target.name})
        else:
            stages.mark_cached("export")
    return entry


def run(spec_path: str | Path, target: str, *, precision: str | None = None, echo: bool = False) -> Path:
    """The whole pipeline; returns the published bundle folder."""
    plan = load_plan(spec_path, target, precision)
    check_inputs(plan)
    stages = Stages()
    stages.say(f"pipeline {plan.spec.name!r}, target {plan.target.name}, precision {plan.precision}")
    write_configs(plan)
    ensure_base(plan, stages)
    cache = Cache(plan.paths.cache_dir)
    memo = DigestMemo(plan.paths.cache_dir / "digests.json")
    base = base_digest(plan, memo)
    memo.save()
    trained = train_adapters(plan, stages, cache, base, echo)
    export = export_base(plan, stages, cache, base, echo)
    with stages.stage("bundle", "assembling, verifying and publishing the bundle"):
        staged = bundle.stage(plan, export, trained, stages)
        problems = bundle.verify(staged)
        if problems:
            shutil.rmtree(staged, ignore_errors=True)
            raise PipelineError("the staged bundle failed verification:\n" + "\n".join(f"  - {p}" for p in problems))
        publish_dir(staged, plan.paths.bundle_dir)
    stages.say(f"published {plan.paths.bundle_dir}")
    return plan.paths.bundle_dir
