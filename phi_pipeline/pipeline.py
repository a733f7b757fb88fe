"""The run: spec -> checked inputs -> trained adapters -> exported base -> staged bundle -> published.

Each stage reads what the previous one wrote. Training and export results are kept in the
content-addressed cache, so a re-run with nothing changed does no Olive work, a changed dataset
retrains exactly its adapter, and an interrupted run resumes from what finished.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi_pipeline.orchestration.cache import (
    Cache,
    DigestMemo,
    content_key,
    tree_sha256,
)
from phi_pipeline.orchestration.configs import EXPORT_FILE, finetune_file, write_configs
from phi_pipeline.orchestration.diskspace import space_for, tree_size
from phi_pipeline.orchestration.distributed import (
    DEVICE_ENV,
    Launch,
    describe,
)
from phi_pipeline.orchestration.executors import Executor, LocalExecutor, OliveJob, Pending
from phi_pipeline.orchestration.olive_compat import HOOKS_ENV
from phi_pipeline.orchestration.progress import Stages, TrainingProgress
from phi_pipeline.orchestration.runlock import RunLock
from phi_pipeline.orchestration.trained import TrainedAdapter
from phi_pipeline.orchestration.training import (
    ADAPTER_FILES,
    collect_finetune_result,
    content_form,
    discard_finetune_dir,
    prepare_finetune_dir,
    prepare_splits,
    training_key,
)
from phi_pipeline.bundle import staging
from phi_pipeline.bundle.publish import publish_dir
from phi_pipeline.errors import PipelineError, UsageError
from phi_pipeline.pipeline_spec.data import check_data
from phi_pipeline.pipeline_spec.inputs import check_safetensors, in_hf_cache
from phi_pipeline.pipeline_spec.plan import AdapterPlan, Plan, export_search, is_local_path, make_plan
from phi_pipeline.pipeline_spec.schema import SPEC_VARIANT, ExportSearchSpec, load_spec
from phi_pipeline.tiny.builtin import ensure_builtin
from phi_pipeline.versions import package_versions


def load_plan(spec_path: str | Path, target: str, precision: str | None = None) -> Plan:
    spec = load_spec(spec_path)
    return make_plan(spec, target, source=Path(spec_path).as_posix(), precision=precision)


def check_inputs(plan: Plan, sign_key: Path | None = None, launch: Launch = Launch()) -> None:
    """Everything that can be checked before training, reported together (UsageError, exit 2)."""
    problems: list[str] = launch.problems()
    if sign_key is not None:
        from phi_pipeline.bundle.signing import check_private_key

        problems += [f"--sign-key: {p}" for p in check_private_key(sign_key)]
    for i, adapter in enumerate(plan.adapters):
        if launch.world_size(adapter.spec.training.nproc_per_node) > 1 and adapter.spec.lora.method == "qlora":
            problems.append(
                f"adapters.{i} ({adapter.name}): lora.method qlora cannot train data-parallel (Olive's QLoRA pass "
                "puts every rank's 4-bit base on GPU 0; untested here): use method lora, or nproc_per_node 1"
            )
    for i, adapter in enumerate(plan.adapters):
        problems += check_data(adapter.spec.data, f"adapters.{i}.data ({adapter.name})", adapter.spec.training.seed)
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
        elif os.environ.get("HF_HUB_OFFLINE") == "1" and not in_hf_cache(base.name_or_path):
            problems.append(
                f"base_model.name_or_path: {base.name_or_path!r} is a hub id, but HF_HUB_OFFLINE=1 and it is not in "
                "the local Hugging Face cache; download it while online (huggingface-cli download "
                f"{base.name_or_path}) or point name_or_path at a local folder"
            )
    if problems:
        raise UsageError(plan.source, problems)


def ensure_base(plan: Plan, stages: Stages) -> None:
    """Build the embedded base model when it is missing or was built by other builder code (tiny/builtin.py)."""
    base = plan.spec.base_model
    if base.builtin is not None:
        ensure_builtin(base.builtin, Path(base.name_or_path),
                       lambda name, folder: stages.stage("base", f"building the embedded {name} base model into {folder}"))


def base_digest(plan: Plan, memo: DigestMemo) -> str:
    if plan.base_is_local:
        return tree_sha256(Path(plan.base_model), memo)
    return f"hub:{plan.base_model}"


def olive_space_needed(plan: Plan) -> int | None:
    """About what one Olive workflow writes: at most the base's size (a fine-tune's output holds a copy)."""
    return tree_size(Path(plan.base_model)) if plan.base_is_local else None


def olive_job(
    plan: Plan,
    config_file: str,
    outputs: list[Path],
    executor: Executor,
    *,
    seed: int | None = None,
    env: dict[str, str] | None = None,
    launcher: list[str] | None = None,
    num_gpus: float = 0,
    python: str | None = None,
) -> OliveJob:
    """One of the plan's Olive workflows as a job; a local base keeps Olive offline and inside work_dir. A job
    that may run beside others (a parallel executor) gets its own Olive cache. `python`: another environment's
    interpreter that runs the whole workflow (a target's pass environment)."""
    local = plan.base_is_local
    name = config_file.removesuffix(".json")
    return OliveJob(
        name=name,
        config=plan.paths.configs_dir / config_file,
        log=plan.paths.logs_dir / f"{name}.log",
        outputs=tuple(outputs),
        offline=local,
        hf_cache=plan.paths.hf_cache_dir if local else None,
        seed=seed,
        env=env or {},
        launcher=tuple(launcher) if launcher else None,
        olive_cache=plan.paths.olive_cache_dir / "tasks" / name if executor.parallel else None,
        num_gpus=num_gpus,
        python=python,
        space_needed=olive_space_needed(plan),
    )


@dataclass
class FinetuneContext:
    stages: Stages
    cache: Cache
    base: str
    echo: bool
    launch: Launch
    executor: Executor


@dataclass
class _Finetune:
    """One adapter's fine-tune between its cache lookup and its cache entry."""

    adapter: AdapterPlan
    key: str
    splits: tuple[dict[str, str], dict[str, Any] | None]
    distributed: dict[str, Any]
    entry: Path | None = None
    job: OliveJob | None = None
    pending: Pending | None = None


def _plan_finetune(
    plan: Plan,
    adapter: AdapterPlan,
    config_file: str,
    workflow: dict[str, Any],
    ctx: FinetuneContext,
    splits: tuple[dict[str, str], dict[str, Any] | None],
) -> _Finetune:
    """Look the fine-tune up in the cache; on a miss, prepare its work folder (an interrupted fine-tune with
    the same key resumes from its last checkpoint) and describe its job."""
    from phi_pipeline.orchestration.workflows.finetune import trainer_hooks

    nproc = adapter.spec.training.nproc_per_node
    world = ctx.launch.world_size(nproc)
    hooks = trainer_hooks(adapter, plan.paths)
    key = training_key(plan, workflow, hooks, base=ctx.base, world_size=world)
    task = _Finetune(adapter, key, splits, describe(adapter.spec.training, world, adapter.training_device))
    task.entry = ctx.cache.get("adapters", key)
    if task.entry is not None:
        return task
    out = plan.paths.finetune_dir(adapter.name)
    resumed = prepare_finetune_dir(out, key, say=lambda text: ctx.stages.say(f"{adapter.name}: {text}"))
    if resumed:
        ctx.stages.say(f"{adapter.name}: resuming the interrupted fine-tune from {resumed}")
    env = {HOOKS_ENV: json.dumps(hooks)}
    launcher = None
    if world > 1:
        ctx.stages.say(
            f"{adapter.name}: data-parallel fine-tune under torchrun, world size {world} "
            f"({task.distributed['backend']}), effective batch {task.distributed['effective_batch_size']}"
        )
        launcher = ctx.launch.torchrun_command(nproc)
        env[DEVICE_ENV] = adapter.training_device
        if adapter.training_device == "cpu":
            env["OMP_NUM_THREADS"] = "1"  # one thread per rank: ranks share the cores
    # rank 0 (on node 0) writes the adapter; another node's ranks leave nothing to collect
    outputs = [out / "adapter" / name for name in ADAPTER_FILES] if ctx.launch.node_rank == 0 else []
    task.job = olive_job(
        plan, config_file, outputs, ctx.executor, seed=adapter.spec.training.seed, env=env, launcher=launcher,
        num_gpus=ctx.launch.per_node(nproc) if adapter.training_device == "cuda" else 0,
    )
    return task


def _finish_finetune(plan: Plan, task: _Finetune, ctx: FinetuneContext) -> TrainedAdapter | None:
    """Wait for the fine-tune's job (the local executor runs it now) and cache its result; None on a node
    other than node 0 of a multi-node fine-tune (node 0 keeps the adapter)."""
    if task.entry is None:
        assert task.job is not None
        if task.pending is None:
            task.pending = ctx.executor.submit(task.job, ctx.echo)
        name = task.adapter.name
        with TrainingProgress(ctx.stages, name, plan.paths.progress_file(name)):
            task.pending.result()
        if ctx.launch.node_rank > 0:
            return None
        out = plan.paths.finetune_dir(name)
        result = collect_finetune_result(out, task.distributed)
        task.entry = ctx.cache.put("adapters", task.key, result, {"adapter": name, "datasets": task.splits[0]})
        discard_finetune_dir(out)
    return TrainedAdapter(task.adapter, task.entry, task.key, *task.splits)


def _finetune(
    plan: Plan,
    adapter: AdapterPlan,
    config_file: str,
    workflow: dict[str, Any],
    ctx: FinetuneContext,
    splits: tuple[dict[str, str], dict[str, Any] | None],
) -> tuple[TrainedAdapter | None, bool]:
    """Train one adapter plan from its workflow (written at configs_dir / config_file), or take it from the
    cache (then the flag is true)."""
    task = _plan_finetune(plan, adapter, config_file, workflow, ctx, splits)
    hit = task.entry is not None
    return _finish_finetune(plan, task, ctx), hit


def train_adapters(
    plan: Plan, stages: Stages, cache: Cache, base: str, echo: bool, *, only: str | None = None,
    trials: int | None = None, launch: Launch = Launch(), executor: Executor | None = None,
) -> list[TrainedAdapter]:
    """Every adapter of the plan (or `only` that one): its own recipe, or its search's best trial.

    A parallel executor gets the stage's cache misses (adapters without a search) submitted together
    first; the local one trains each in its turn. A failed fine-tune fails the run after the others that
    were already running have finished and been cached."""
    from phi_pipeline.orchestration.configs import workflow_configs
    from phi_pipeline.orchestration.workflows.finetune import trainer_hooks
    from phi_pipeline.search.run import search_adapter, study_key

    configs = workflow_configs(plan)
    splits = prepare_splits(plan)
    ctx = FinetuneContext(stages, cache, base, echo, launch, executor or LocalExecutor())
    adapters = [a for a in plan.adapters if only is None or a.name == only]
    searched = {a.name for a in adapters if a.spec.search is not None and a.spec.search.enabled}
    tasks: dict[str, _Finetune] = {}
    if ctx.executor.parallel:
        for adapter in adapters:
            if adapter.name not in searched:
                file = finetune_file(adapter.name)
                task = tasks[adapter.name] = _plan_finetune(plan, adapter, file, configs[file], ctx, splits[adapter.name])
                if task.job is not None:
                    task.pending = ctx.executor.submit(task.job, echo)
    trained = []
    failure: PipelineError | None = None
    for adapter in adapters:
        config_file = finetune_file(adapter.name)
        stage = f"finetune:{adapter.name}"
        if failure is not None:  # only collect what is already running, so it stays cached
            task = tasks.get(adapter.name)
            if task is not None and task.pending is not None:
                with contextlib.suppress(PipelineError):
                    _finish_finetune(plan, task, ctx)
            continue
        try:
            if adapter.name in searched:
                search = adapter.spec.search
                world = launch.world_size(adapter.spec.training.nproc_per_node)
                default_key = training_key(plan, configs[config_file], trainer_hooks(adapter, plan.paths), base, world)
                with stages.stage(stage, f"searching the recipe of adapter {adapter.name!r} ({search.strategy})"):
                    result, _ = search_adapter(
                        plan,
                        adapter,
                        study_key=study_key(adapter, default_key),
                        train=lambda p, f, w: _finetune(plan, p, f, w, ctx, splits[adapter.name])[0],
                        say=stages.say,
                        trials=trials,
                    )
            else:
                with stages.stage(stage, f"fine-tuning adapter {adapter.name!r} ({adapter.spec.lora.method})"):
                    task = tasks.get(adapter.name) or _plan_finetune(
                        plan, adapter, config_file, configs[config_file], ctx, splits[adapter.name]
                    )
                    hit = task.entry is not None
                    result = _finish_finetune(plan, task, ctx)
                    if hit:
                        stages.mark_cached(stage)
        except PipelineError as exc:
            failure = exc
            continue
        if result is not None:
            trained.append(result)
    if failure is not None:
        raise failure
    return trained


def export_base(
    plan: Plan, stages: Stages, cache: Cache, base: str, echo: bool, executor: Executor | None = None,
    config_file: str = EXPORT_FILE, variant: str | None = None,
) -> tuple[Path, str]:
    """The multi-adapter export (or one export-search `variant` of it, from its `config_file`): the cache
    entry and its key."""
    from phi_pipeline.orchestration.configs import workflow_configs
    from phi_pipeline.bundle.adapters import write_layout_adapter

    key = content_key(
        {
            "stage": "export",
            "base": base,
            "workflow": content_form(workflow_configs(plan)[config_file], plan),
            "packages": package_versions(),
        }
    )
    name = f"export:{variant}" if variant else "export"
    what = f" variant {variant!r}" if variant else ""
    with stages.stage(name, f"exporting the base model{what} ({plan.target.name}, {plan.precision})"):
        entry = cache.get("exports", key)
        if entry is None:
            write_layout_adapter(plan)
            out = plan.paths.export_dir
            shutil.rmtree(out, ignore_errors=True)
            executor = executor or LocalExecutor()
            executor.submit(olive_job(plan, config_file, [out / "model.onnx", out / "genai_config.json"], executor), echo).result()
            entry = cache.put("exports", key, out, {"pipeline": plan.spec.name, "target": plan.target.name,
                                                    **({"variant": variant} if variant else {})})
        else:
            stages.mark_cached(name)
    return entry, key


def export_merged(
    plan: Plan, stages: Stages, cache: Cache, base: str, trained: list[TrainedAdapter], echo: bool,
    executor: Executor | None = None,
) -> dict[str, Path]:
    """Merged layout: one export per adapter (MergeAdapterWeights, then the target's route); a parallel
    executor gets the cache misses submitted together."""
    from phi_pipeline.orchestration.configs import export_file, workflow_configs

    executor = executor or LocalExecutor()
    configs = workflow_configs(plan)
    keys = {
        t.plan.name: content_key(
            {
                "stage": "export-merged",
                "base": base,
                "adapter": t.key,
                "workflow": content_form(configs[export_file(t.plan.name)], plan),
                "packages": package_versions(),
            }
        )
        for t in trained
    }

    def submit(t: TrainedAdapter) -> Pending:
        name = t.plan.name
        # the workflow reads the trained adapter from a stable run path, not the cache
        adapter_dir = plan.paths.trained_adapter_dir(name)
        shutil.rmtree(adapter_dir, ignore_errors=True)
        shutil.copytree(t.folder / "adapter", adapter_dir)
        out = plan.paths.merged_export_dir(name)
        shutil.rmtree(out, ignore_errors=True)
        job = olive_job(plan, export_file(name), [out / "genai_config.json"], executor, python=plan.target.export_python)
        return executor.submit(job, echo)

    def finish(name: str, job: Pending) -> Path:
        job.result()
        return cache.put("exports", keys[name], plan.paths.merged_export_dir(name), {"pipeline": plan.spec.name, "adapter": name})

    pending = {t.plan.name: submit(t) for t in trained if executor.parallel and cache.get("exports", keys[t.plan.name]) is None}
    variants = {}
    failure: PipelineError | None = None
    for t in trained:
        name = t.plan.name
        if failure is not None:  # exports already running finish and stay cached
            if name in pending:
                with contextlib.suppress(PipelineError):
                    finish(name, pending[name])
            continue
        stage = f"export:{name}"
        try:
            with stages.stage(stage, f"exporting the model with adapter {name!r} merged ({plan.target.name}, {plan.precision})"):
                entry = cache.get("exports", keys[name])
                if entry is None:
                    entry = finish(name, pending.get(name) or submit(t))
                else:
                    stages.mark_cached(stage)
        except PipelineError as exc:
            failure = exc
            continue
        variants[name] = entry
    if failure is not None:
        raise failure
    return variants


def _evaluate_and_gate(plan: Plan, staged: Path, trained: list[TrainedAdapter], stages: Stages, no_gate: bool) -> None:
    """Evaluate the staged bundle and record the figures; a failed gate raises unless `no_gate`."""
    from phi_pipeline.evaluate import evaluate_staged
    from phi_pipeline.runtime.target_models import (
        keep_unevaluated,
        missing_eval_device,
        skipped_gates,
    )

    missing = missing_eval_device(plan.target)
    if missing:  # e.g. a CUDA bundle built on a host without a GPU: its runtime cannot even load it here
        if not no_gate:
            raise keep_unevaluated(plan, staged, missing, plan.source)
        stages.say(f"not evaluated (--no-gate): {missing}")
        staging.finalize_manifest(staged, {"gates": skipped_gates(plan.target, missing), "stage_seconds": dict(stages.seconds)})
        return
    with stages.stage("evaluate", "evaluating the base model and each adapter (ONNX bundle vs PyTorch+PEFT)"):
        results = evaluate_staged(plan, staged, trained, enforced=not no_gate)
    _record_evaluation(plan, staged, results, stages, no_gate)


def _record_evaluation(
    plan: Plan, staged: Path, results: dict[str, Any], stages: Stages, no_gate: bool, more: dict[str, Any] | None = None
) -> None:
    """A failed gate raises unless `no_gate`; the figures (and `more`) go into the staged manifest."""
    from phi_pipeline.evaluate import manifest_summary

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
    staging.finalize_manifest(
        staged,
        {
            "gates": gates,
            "evaluation": manifest_summary(results),
            "stage_seconds": dict(stages.seconds),
            "base_model": {"digest": digest},
            **(more or {}),
        },
    )


def _searched_bundle(
    plan: Plan, search: ExportSearchSpec, stages: Stages, cache: Cache, base: str, trained: list[TrainedAdapter],
    echo: bool, executor: Executor | None, no_gate: bool, remeasure: bool,
) -> Path:
    """The export search's winner, staged, its report (with the search's section) and manifest written."""
    from phi_pipeline.evaluate import write_staged_report
    from phi_pipeline.search.export import run_search

    def export(variant: str, config_file: str) -> tuple[Path, str]:
        return export_base(plan, stages, cache, base, echo, executor, config_file,
                           None if variant == SPEC_VARIANT else variant)

    outcome = run_search(plan, search, trained, stages, cache, export, base=base, enforced=not no_gate, remeasure=remeasure)
    try:
        results = write_staged_report(outcome.plan, outcome.staged, trained, {**outcome.results, "export_search": outcome.record})
        _record_evaluation(outcome.plan, outcome.staged, results, stages, no_gate, {"export_search": outcome.record})
    except BaseException:
        shutil.rmtree(outcome.staged, ignore_errors=True)
        raise
    return outcome.staged


def search(
    spec_path: str | Path, target: str, *, adapter: str | None = None, trials: int | None = None, echo: bool = False,
    launch: Launch = Launch(), executor: Executor | None = None,
) -> list[TrainedAdapter]:
    """`phi-pipeline search`: the adapters' searches alone (each best trial trained and cached, nothing exported)."""
    plan = load_plan(spec_path, target)
    searched = [a.name for a in plan.adapters if a.spec.search is not None and a.spec.search.enabled]
    problems = []
    if adapter is not None and adapter not in searched:
        known = [a.name for a in plan.adapters]
        problems.append(
            f"--adapter {adapter}: " + (f"no such adapter (known: {', '.join(known)})" if adapter not in known
                                        else "this adapter has no search block")
        )
    elif not searched:
        problems.append("no adapter has a search block: add search: {space: ...} at the top level or to an adapter")
    if trials is not None and trials < 1:
        problems.append("--trials: give a number of trials >= 1")
    if launch.nnodes > 1:
        problems.append("--nnodes: a search scores each trial on node 0 only; search on one node")
    if problems:
        raise UsageError(plan.source, problems)
    check_inputs(plan, launch=launch)
    stages = Stages()
    write_configs(plan)
    ensure_base(plan, stages)
    memo = DigestMemo(plan.paths.cache_dir / "digests.json")
    cache = Cache(plan.paths.cache_dir, memo, warn=stages.say)
    base = base_digest(plan, memo)
    memo.save()
    names = [adapter] if adapter else searched
    with RunLock(plan.paths.finetune_lock, f"the fine-tunes of pipeline {plan.spec.name!r}", wait=True, say=stages.say):
        return [
            t for name in names
            for t in train_adapters(plan, stages, cache, base, echo, only=name, trials=trials, launch=launch, executor=executor)
        ]


def run(
    spec_path: str | Path,
    target: str,
    *,
    precision: str | None = None,
    echo: bool = False,
    no_gate: bool = False,
    sign_key: Path | None = None,
    no_wait: bool = False,
    launch: Launch = Launch(),
    executor: Executor | None = None,
    remeasure: bool = False,
) -> Path | None:
    """The whole pipeline; returns the published bundle folder (None on a node other than node 0 of a
    multi-node fine-tune: it trains, node 0 exports and publishes).

    The staged bundle is evaluated before it is published; a failed publish gate raises
    PipelineError and leaves the published bundle as it was, unless `no_gate`. One run per pipeline
    and target at a time: another one waits for it (or, with `no_wait`, raises LockHeld). With
    `sign_key` the bundle is signed (model-signing) before it is published. With an export search,
    `remeasure` evaluates and times its variants again instead of reading their figures from the cache.
    """
    plan = load_plan(spec_path, target, precision)
    check_inputs(plan, sign_key, launch)
    stages = Stages()
    name = plan.spec.name
    with RunLock(plan.paths.run_lock, f"pipeline {name!r} for target {target}", wait=not no_wait, say=stages.say):
        stages.say(f"pipeline {name!r}, target {plan.target.name}, precision {plan.precision}")
        memo = DigestMemo(plan.paths.cache_dir / "digests.json")
        cache = Cache(plan.paths.cache_dir, memo, warn=stages.say)
        published = False
        try:
            published = _run_locked(
                plan, stages, cache, memo, echo=echo, no_gate=no_gate, sign_key=sign_key, no_wait=no_wait,
                launch=launch, executor=executor, remeasure=remeasure,
            )
        finally:
            with contextlib.suppress(OSError):  # bookkeeping for `cache prune`; never hides the run's own error
                cache.record_use(name, plan.target.name, published)
    if not published:
        stages.say(f"node {launch.node_rank}: training done; node 0 exports, evaluates and publishes")
        return None
    stages.say(f"published {plan.paths.bundle_dir}")
    return plan.paths.bundle_dir


def _run_locked(
    plan: Plan,
    stages: Stages,
    cache: Cache,
    memo: DigestMemo,
    *,
    echo: bool,
    no_gate: bool,
    sign_key: Path | None,
    no_wait: bool,
    launch: Launch,
    executor: Executor | None,
    remeasure: bool,
) -> bool:
    """The run under its lock; False on a node other than node 0 (it trains only), True once published."""
    write_configs(plan)
    ensure_base(plan, stages)
    base = base_digest(plan, memo)
    memo.save()
    work = plan.paths.work_dir
    olive_space = olive_space_needed(plan)
    # every target of a pipeline fine-tunes into the same folder and cache entries
    with RunLock(plan.paths.finetune_lock, f"the fine-tunes of pipeline {plan.spec.name!r}", wait=not no_wait, say=stages.say):
        with space_for(work, olive_space, "the fine-tune results"):
            trained = train_adapters(plan, stages, cache, base, echo, launch=launch, executor=executor)
    if launch.node_rank > 0:
        return False
    search, skipped = export_search(plan)
    if skipped:
        stages.say(f"export search: not run, {skipped}; exporting the spec's settings")
    if search is not None:
        with space_for(work, olive_space, "the export search"):
            staged = _searched_bundle(plan, search, stages, cache, base, trained, echo, executor, no_gate, remeasure)
        try:
            _sign_and_publish(plan, staged, stages, sign_key)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return True
    with space_for(work, olive_space, "the export"):
        if plan.layout == "merged":
            variants = export_merged(plan, stages, cache, base, trained, echo, executor)
            assemble = functools.partial(staging.stage_merged, plan, variants, trained, stages)
            exported = list(variants.values())
        else:
            export, _ = export_base(plan, stages, cache, base, echo, executor)
            assemble = functools.partial(staging.stage, plan, export, trained, stages)
            exported = [export]
    staged = staging.staging_dir(plan)
    needed = sum(tree_size(p) for p in exported) + sum(tree_size(t.folder / "adapter") for t in trained)
    try:
        with space_for(plan.paths.staging_root, needed, "the staged bundle"):
            with stages.stage("bundle", "assembling and verifying the bundle"):
                assemble()
                problems = staging.verify(staged)
                if problems:
                    raise PipelineError(
                        "the staged bundle failed verification:\n" + "\n".join(f"  - {p}" for p in problems)
                    )
            _evaluate_and_gate(plan, staged, trained, stages, no_gate)
            _sign_and_publish(plan, staged, stages, sign_key)
    finally:  # also on an interrupt or a full disk: no staging is left behind
        shutil.rmtree(staged, ignore_errors=True)  # gone already when published
    return True


def _sign_and_publish(plan: Plan, staged: Path, stages: Stages, sign_key: Path | None) -> None:
    if sign_key is not None:
        with stages.stage("sign", f"signing the bundle with {sign_key} (model-signing)"):
            staging.sign(staged, sign_key)
    with stages.stage("publish", f"publishing {plan.paths.bundle_dir}"):
        publish_dir(staged, plan.paths.bundle_dir)
