"""The run: spec -> checked inputs -> trained adapters -> exported base -> staged bundle -> published.

Each stage reads what the previous one wrote. Training and export results are kept in the
content-addressed cache, so a re-run with nothing changed does no Olive work, a changed dataset
retrains exactly its adapter, and an interrupted run resumes from what finished.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from phi_pipeline import bundle
from phi_pipeline.cache import Cache, DigestMemo, content_key, file_sha256, tree_sha256
from phi_pipeline.configs import EXPORT_FILE, finetune_file, write_configs
from phi_pipeline.data import check_data
from phi_pipeline.diskspace import space_for, tree_size
from phi_pipeline.errors import PipelineError, UsageError
from phi_pipeline.plan import AdapterPlan, Plan, is_local_path, make_plan
from phi_pipeline.progress import Stages
from phi_pipeline.publish import publish_dir
from phi_pipeline.runlock import RunLock
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


def check_inputs(plan: Plan, sign_key: Path | None = None) -> None:
    """Everything that can be checked before training, reported together (UsageError, exit 2)."""
    problems: list[str] = []
    if sign_key is not None:
        from phi_pipeline.signing import check_private_key

        problems += [f"--sign-key: {p}" for p in check_private_key(sign_key)]
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
            problems += [f"base_model.name_or_path: {p}" for p in check_safetensors(folder)]
        elif os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hf_cache(base.name_or_path):
            problems.append(
                f"base_model.name_or_path: {base.name_or_path!r} is a hub id, but HF_HUB_OFFLINE=1 and it is not in "
                "the local Hugging Face cache; download it while online (huggingface-cli download "
                f"{base.name_or_path}) or point name_or_path at a local folder"
            )
    if problems:
        raise UsageError(plan.source, problems)


def check_safetensors(folder: Path) -> list[str]:
    """Truncated or corrupt weights (an interrupted download), found from each file's header and
    size alone: safetensors' safe_open parses the header and checks that the tensors exactly cover
    the file, without reading the weights."""
    from safetensors import SafetensorError, safe_open

    problems = []
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="numpy"):
                pass
        except (SafetensorError, OSError) as exc:
            problems.append(f"{f}: not a complete safetensors file ({exc}); download or save it again")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            return [*problems, f"{index}: unreadable shard index ({exc})"]
        problems += [f"{index}: names {s}, which is missing" for s in sorted(shards) if not (folder / s).is_file()]
    return problems


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _builder_fingerprint() -> str:
    """sha256 of the embedded base model's builder code and corpus: a change means a rebuild."""
    import phi_pipeline.tiny as tiny

    h = hashlib.sha256()
    for f in sorted(Path(tiny.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def ensure_base(plan: Plan, stages: Stages) -> None:
    """Build the embedded base model when it is missing or was built by other builder code.

    Built beside its destination and renamed into place, so a killed build leaves nothing
    that looks like a model."""
    base = plan.spec.base_model
    if base.builtin is None:
        return
    folder = Path(base.name_or_path)
    stamp = folder.with_name(folder.name + ".built-by")
    fingerprint = _builder_fingerprint()
    if (folder / "config.json").is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
        return
    from phi_pipeline.tiny.base_model import build_tiny_base

    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    with stages.stage("base", f"building the embedded {base.builtin} base model into {folder}"):
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_base(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
        stamp.write_text(fingerprint)


def base_digest(plan: Plan, memo: DigestMemo) -> str:
    if plan.base_is_local:
        return tree_sha256(Path(plan.base_model), memo)
    return f"hub:{plan.base_model}"


def olive_space_needed(plan: Plan) -> int | None:
    """About what one Olive workflow writes: at most the base's size (a fine-tune's output holds a copy)."""
    return tree_size(Path(plan.base_model)) if plan.base_is_local else None


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
        space_needed=olive_space_needed(plan),
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


def export_merged(
    plan: Plan, stages: Stages, cache: Cache, base: str, trained: list[TrainedAdapter], echo: bool
) -> dict[str, Path]:
    """Merged layout: one export per adapter (MergeAdapterWeights, then the target's route)."""
    from phi_pipeline.configs import export_file, workflow_configs

    configs = workflow_configs(plan)
    variants = {}
    for t in trained:
        name = t.plan.name
        key = content_key(
            {
                "stage": "export-merged",
                "base": base,
                "adapter": t.key,
                "workflow": configs[export_file(name)],
                "packages": package_versions(),
            }
        )
        stage = f"export:{name}"
        with stages.stage(stage, f"exporting the model with adapter {name!r} merged ({plan.target.name}, {plan.precision})"):
            entry = cache.get("exports", key)
            if entry is None:
                # the workflow reads the trained adapter from a stable run path, not the cache
                adapter_dir = plan.paths.trained_adapter_dir(name)
                shutil.rmtree(adapter_dir, ignore_errors=True)
                shutil.copytree(t.folder / "adapter", adapter_dir)
                out = plan.paths.merged_export_dir(name)
                shutil.rmtree(out, ignore_errors=True)
                _run_workflow(plan, export_file(name), [out / "genai_config.json"], echo)
                entry = cache.put("exports", key, out, {"pipeline": plan.spec.name, "adapter": name})
            else:
                stages.mark_cached(stage)
        variants[name] = entry
    return variants


def _evaluate_and_gate(plan: Plan, staged: Path, trained: list[TrainedAdapter], stages: Stages, no_gate: bool) -> None:
    """Evaluate the staged bundle and record the figures; a failed gate raises unless `no_gate`."""
    from phi_pipeline.evaluate import evaluate_staged, manifest_summary

    with stages.stage("evaluate", "evaluating the base model and each adapter (ONNX bundle vs PyTorch+PEFT)"):
        results = evaluate_staged(plan, staged, trained, enforced=not no_gate)
    failures = results["gates"]["failures"]
    if failures and not no_gate:
        raise PipelineError(
            f"{len(failures)} publish gate(s) failed; {plan.paths.bundle_dir} was left as it was:\n"
            + "\n".join(f"  - {f}" for f in failures)
            + f"\nreport: {results['report_copy']}/report.md (phi-pipeline run --no-gate publishes anyway)"
        )
    for failure in failures:
        stages.say(f"gate failed, not enforced (--no-gate): {failure}")
    gates = {k: results["gates"][k] for k in ("enforced", "passed", "failures")}
    # the base's digest lets `phi-pipeline eval` tell whether the PyTorch reference is still the same model
    digest = base_digest(plan, DigestMemo(plan.paths.cache_dir / "digests.json"))
    bundle.finalize_manifest(
        staged,
        {
            "gates": gates,
            "evaluation": manifest_summary(results),
            "stage_seconds": dict(stages.seconds),
            "base_model": {"digest": digest},
        },
    )


def run(
    spec_path: str | Path,
    target: str,
    *,
    precision: str | None = None,
    echo: bool = False,
    no_gate: bool = False,
    sign_key: Path | None = None,
    no_wait: bool = False,
) -> Path:
    """The whole pipeline; returns the published bundle folder.

    The staged bundle is evaluated before it is published; a failed publish gate raises
    PipelineError and leaves the published bundle as it was, unless `no_gate`. One run per pipeline
    and target at a time: another one waits for it (or, with `no_wait`, raises LockHeld). With
    `sign_key` the bundle is signed (model-signing) before it is published.
    """
    plan = load_plan(spec_path, target, precision)
    check_inputs(plan, sign_key)
    stages = Stages()
    name = plan.spec.name
    with RunLock(plan.paths.run_lock, f"pipeline {name!r} for target {target}", wait=not no_wait, say=stages.say):
        stages.say(f"pipeline {name!r}, target {plan.target.name}, precision {plan.precision}")
        memo = DigestMemo(plan.paths.cache_dir / "digests.json")
        cache = Cache(plan.paths.cache_dir, memo, warn=stages.say)
        published = False
        try:
            _run_locked(plan, stages, cache, memo, echo=echo, no_gate=no_gate, sign_key=sign_key, no_wait=no_wait)
            published = True
        finally:
            with contextlib.suppress(OSError):  # bookkeeping for `cache prune`; never hides the run's own error
                cache.record_use(name, plan.target.name, published)
    stages.say(f"published {plan.paths.bundle_dir}")
    return plan.paths.bundle_dir


def _run_locked(
    plan: Plan, stages: Stages, cache: Cache, memo: DigestMemo, *, echo: bool, no_gate: bool, sign_key: Path | None, no_wait: bool
) -> None:
    write_configs(plan)
    ensure_base(plan, stages)
    base = base_digest(plan, memo)
    memo.save()
    work = plan.paths.work_dir
    olive_space = olive_space_needed(plan)
    # every target of a pipeline fine-tunes into the same folder and cache entries
    with RunLock(plan.paths.finetune_lock, f"the fine-tunes of pipeline {plan.spec.name!r}", wait=not no_wait, say=stages.say):
        with space_for(work, olive_space, "the fine-tune results"):
            trained = train_adapters(plan, stages, cache, base, echo)
    with space_for(work, olive_space, "the export"):
        if plan.layout == "merged":
            variants = export_merged(plan, stages, cache, base, trained, echo)
            assemble = functools.partial(bundle.stage_merged, plan, variants, trained, stages)
            exported = list(variants.values())
        else:
            export = export_base(plan, stages, cache, base, echo)
            assemble = functools.partial(bundle.stage, plan, export, trained, stages)
            exported = [export]
    staged = bundle.staging_dir(plan)
    needed = sum(tree_size(p) for p in exported) + sum(tree_size(t.folder / "adapter") for t in trained)
    try:
        with space_for(plan.paths.staging_root, needed, "the staged bundle"):
            with stages.stage("bundle", "assembling and verifying the bundle"):
                assemble()
                problems = bundle.verify(staged)
                if problems:
                    raise PipelineError(
                        "the staged bundle failed verification:\n" + "\n".join(f"  - {p}" for p in problems)
                    )
            _evaluate_and_gate(plan, staged, trained, stages, no_gate)
            if sign_key is not None:
                with stages.stage("sign", f"signing the bundle with {sign_key} (model-signing)"):
                    bundle.sign(staged, sign_key)
            with stages.stage("publish", f"publishing {plan.paths.bundle_dir}"):
                publish_dir(staged, plan.paths.bundle_dir)
    finally:  # also on an interrupt or a full disk: no staging is left behind
        shutil.rmtree(staged, ignore_errors=True)  # gone already when published
