"""Scale-out: data-parallel fine-tunes under torchrun and a stage's Olive workflows as Ray tasks."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import fast_spec

from phi_pipeline.orchestration.distributed import Launch, describe, rank_hooks, rank_workflow
from phi_pipeline.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


def _workflow() -> dict:
    return {
        "passes": {"finetune": {"type": "LoRA", "training_args": {"per_device_train_batch_size": 4}}},
        "output_dir": "w/runs/p/finetune/tone",
        "cache_dir": "w/olive-cache",
    }


def test_torchrun_command_is_standalone_on_one_node_and_static_on_several():
    one = Launch(2).torchrun_command(1, python="py")
    assert one == ["py", "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                   "-m", "phi_pipeline.orchestration.distributed.rank"]
    several = Launch(None, nnodes=2, node_rank=1, master_addr="10.0.0.1").torchrun_command(4, python="py")
    assert several[3:13] == ["--nproc-per-node", "4", "--nnodes", "2", "--node-rank", "1",
                             "--master-addr", "10.0.0.1", "--master-port", "29500"]
    assert Launch(None, nnodes=2).world_size(4) == 8


def test_launch_problems_name_each_bad_flag():
    problems = Launch(0, nnodes=2, node_rank=2).problems()
    assert any(p.startswith("--nproc-per-node") for p in problems)
    assert any(p.startswith("--node-rank") for p in problems)
    assert any(p.startswith("--master-addr") for p in problems)
    assert Launch(2).problems() == []


def test_rank_workflow_pins_the_device_and_separates_olive_folders():
    cpu1 = rank_workflow(_workflow(), 1, "cpu")
    finetune = cpu1["passes"]["finetune"]
    assert finetune["device_map"] is None
    assert finetune["training_args"] == {"per_device_train_batch_size": 4, "ddp_backend": "gloo", "use_cpu": True}
    assert cpu1["output_dir"] == "w/runs/p/finetune/tone/ranks/rank-1"
    assert cpu1["cache_dir"] == "w/olive-cache/rank-1"
    cuda0 = rank_workflow(_workflow(), 0, "cuda")
    assert cuda0["passes"]["finetune"]["device_map"] == "current_device"
    assert cuda0["passes"]["finetune"]["training_args"]["ddp_backend"] == "nccl"
    assert "use_cpu" not in cuda0["passes"]["finetune"]["training_args"]
    assert cuda0["output_dir"] == "w/runs/p/finetune/tone"  # rank 0 writes where one process would
    qlora = _workflow()
    qlora["passes"]["finetune"]["type"] = "QLoRA"
    with pytest.raises(ValueError, match="LoRA pass only"):
        rank_workflow(qlora, 0, "cuda")


def test_rank_hooks_keep_rank_zero_progress_and_move_the_others():
    hooks = {"progress_file": "f/progress.jsonl", "early_stopping": {"patience": 2}}
    assert rank_hooks(hooks, 0, Path("f")) == hooks
    assert rank_hooks(hooks, 1, Path("f")) == {**hooks, "progress_file": "f/ranks/rank-1/progress.jsonl"}


def test_effective_batch_multiplies_world_size_and_accumulation():
    from phi_pipeline.pipeline_spec.schema import TrainingSpec

    t = TrainingSpec(batch_size=4, gradient_accumulation_steps=3)
    assert describe(t, 2, "cpu") == {"world_size": 2, "backend": "gloo", "effective_batch_size": 24}
    assert describe(t) == {"world_size": 1, "backend": None, "effective_batch_size": 12}


def test_training_key_changes_with_world_size_only_above_one(project):
    from phi_pipeline.orchestration.configs import finetune_file, workflow_configs
    from phi_pipeline.orchestration.training import training_key
    from phi_pipeline.pipeline import load_plan
    from phi_pipeline.orchestration.workflows.finetune import trainer_hooks

    plan = load_plan("pipelines/tiny-phi3.yaml", "cpu")
    adapter = plan.adapters[0]
    workflow = workflow_configs(plan)[finetune_file(adapter.name)]
    hooks = trainer_hooks(adapter, plan.paths)
    one = training_key(plan, workflow, hooks, "b")
    assert training_key(plan, workflow, hooks, "b", 1) == one
    assert training_key(plan, workflow, hooks, "b", 2) not in (one, training_key(plan, workflow, hooks, "b", 4))


def test_qlora_under_ddp_is_refused_with_the_adapter_named(project):
    from phi_pipeline.pipeline import check_inputs, load_plan

    spec = yaml.safe_load(Path("pipelines/tiny-phi3.yaml").read_text())
    spec["lora"]["method"] = "qlora"
    Path("pipelines/q.yaml").write_text(yaml.safe_dump(spec))
    plan = load_plan("pipelines/q.yaml", "cpu")
    check_inputs(plan)  # one process: fine
    with pytest.raises(UsageError) as err:
        check_inputs(plan, launch=Launch(2))
    assert "adapters.0 (tone): lora.method qlora cannot train data-parallel" in err.value.render()


def test_ray_address_without_ray_executor_is_a_usage_error(project, capsys):
    from phi_pipeline.cli import main

    assert main(["run", "pipelines/tiny-phi3.yaml", "--ray-address", "auto"]) == 2
    err = capsys.readouterr().err
    assert "--ray-address" in err and "only with --executor ray" in err


def _project(tmp: Path, spec: dict, base_from: Path | None = None) -> Path:
    shutil.copytree(ROOT / "pipelines", tmp / "pipelines")
    if base_from is not None:
        shutil.copytree(base_from / ".phi-pipeline/base", tmp / ".phi-pipeline/base")
    (tmp / "pipelines/scale.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp


@pytest.fixture(scope="module")
def built_base(tmp_path_factory) -> Path:
    """A project folder holding the embedded base model, built once for this module's end-to-end runs."""
    from phi_pipeline.pipeline import ensure_base, load_plan
    from phi_pipeline.orchestration.progress import Stages

    project = _project(tmp_path_factory.mktemp("base"), _fast_spec())
    old = Path.cwd()
    os.chdir(project)
    try:
        ensure_base(load_plan("pipelines/scale.yaml", "cpu"), Stages())
    finally:
        os.chdir(old)
    return project


def _cli(project: Path, *args: str) -> int:
    from phi_pipeline.cli import main

    old = Path.cwd()
    os.chdir(project)
    try:
        return main(["run", "pipelines/scale.yaml", *args])
    finally:
        os.chdir(old)


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_train_one_adapter_and_the_gates_pass(tmp_path, built_base, monkeypatch):
    import phi_pipeline.pipeline

    # keep each rank's progress file, which the run removes with the work folder once the adapter is cached
    monkeypatch.setattr(phi_pipeline.pipeline, "discard_finetune_dir", lambda out: None)
    spec = yaml.safe_load((ROOT / "pipelines/tiny-phi3.yaml").read_text())
    spec["name"] = "ddp"
    spec["export"].pop("search")
    spec["adapters"] = spec["adapters"][:1]  # tone, with the spec's gates
    spec["training"].update(max_steps=60, eval_steps=20, save_steps=60)
    project = _project(tmp_path, spec, base_from=built_base)
    assert _cli(project, "--nproc-per-node", "2") == 0
    log = (project / ".phi-pipeline/runs/ddp/cpu/logs/finetune-tone.log").read_text()
    assert "rank 0 of world size 2" in log and "rank 1 of world size 2" in log
    work = project / ".phi-pipeline/runs/ddp/finetune/tone"
    for progress in (work / "progress.jsonl", work / "ranks/rank-1/progress.jsonl"):  # both ranks trained
        records = [json.loads(line) for line in progress.read_text().splitlines()]
        assert records[0]["event"] == "begin" and records[0]["world_size"] == 2  # the Trainer's own count
        assert records[-1]["event"] == "end" and records[-1]["step"] == 60
    bundle = project / "dist/ddp/cpu"
    manifest = json.loads((bundle / "manifest.json").read_text())
    (adapter,) = manifest["adapters"]
    assert adapter["distributed"] == {"world_size": 2, "backend": "gloo", "effective_batch_size": 32}
    assert manifest["gates"]["enforced"] and manifest["gates"]["passed"]
    assert sorted(p.name for p in (bundle / "adapters").iterdir()) == ["tone.onnx_adapter"]


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


def _echo_job(tmp_path: Path, name: str, num_gpus: float):
    from phi_pipeline.orchestration.executors import OliveJob

    # the launcher stands in for Olive: the job's log records what the task's process was given
    code = "import os; print('CVD=' + os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'))"
    return OliveJob(name=name, config=tmp_path / "unused.json", log=tmp_path / f"{name}.log", outputs=(),
                    offline=True, hf_cache=None, launcher=(sys.executable, "-c", code), num_gpus=num_gpus)


def test_ray_tasks_get_the_gpus_their_jobs_request(local_ray, tmp_path):
    from phi_pipeline.orchestration.executors import RayExecutor

    executor = RayExecutor(None, tmp_path / "work")
    jobs = {"one": 1, "two": 2}
    pending = [executor.submit(_echo_job(tmp_path, name, gpus)) for name, gpus in jobs.items()]
    for p in pending:
        p.result()
    lines = {name: (tmp_path / f"{name}.log").read_text().splitlines() for name in jobs}
    for name, log in lines.items():
        assert log[0].startswith("# ray task ")  # run by a Ray task, which names itself
    one = next(line for line in lines["one"] if line.startswith("CVD="))[4:]
    two = next(line for line in lines["two"] if line.startswith("CVD="))[4:]
    assert one in ("0", "1")
    assert sorted(two.split(",")) == ["0", "1"]


def test_a_failed_ray_task_fails_with_its_log_excerpt(local_ray, tmp_path):
    from dataclasses import replace

    from phi_pipeline.errors import PipelineError
    from phi_pipeline.orchestration.executors import RayExecutor

    executor = RayExecutor(None, tmp_path / "work")
    job = replace(_echo_job(tmp_path, "bad", 0), launcher=(sys.executable, "-c", "print('the cause'); raise SystemExit(3)"))
    with pytest.raises(PipelineError) as err:
        executor.submit(job).result()
    assert "Ray task olive:bad failed" in str(err.value) and "the cause" in str(err.value)
    assert "exit code 3" in str(err.value)


def test_ray_refuses_a_cluster_that_cannot_see_the_work_folder(local_ray, tmp_path, monkeypatch):
    from phi_pipeline.orchestration import executors

    # the driver's marker lands where no node looks: as if work_dir were a local disk of the driver
    monkeypatch.setattr(executors, "write_marker", lambda folder: folder / ".never-written")
    with pytest.raises(UsageError) as err:
        executors.RayExecutor(None, tmp_path / "work")
    text = err.value.render()
    assert "1 of 1 Ray node(s) cannot see" in text and "storage every node mounts" in text


def test_cuda_fine_tunes_ask_a_gpu_per_rank_and_cpu_ones_none(project):
    from phi_pipeline.orchestration.cache import Cache
    from phi_pipeline.orchestration.configs import finetune_file, workflow_configs
    from phi_pipeline.orchestration.training import prepare_splits
    from phi_pipeline.pipeline import FinetuneContext, _plan_finetune, load_plan
    from phi_pipeline.orchestration.progress import Stages

    class Parallel:
        name, parallel = "fake", True

    for target, launch, gpus in (("cuda", Launch(), 1), ("cuda", Launch(2), 2), ("cpu", Launch(), 0)):
        plan = load_plan("pipelines/tiny-phi3.yaml", target)
        adapter = plan.adapters[0]
        file = finetune_file(adapter.name)
        ctx = FinetuneContext(Stages(), Cache(plan.paths.cache_dir), "b", False, launch, Parallel())
        task = _plan_finetune(plan, adapter, file, workflow_configs(plan)[file], ctx, prepare_splits(plan)[adapter.name])
        assert task.job.num_gpus == gpus
        assert task.job.olive_cache == plan.paths.olive_cache_dir / "tasks" / "finetune-tone"


def _fast_spec() -> dict:
    return {**fast_spec(), "name": "scale"}


@pytest.mark.slow
def test_ray_executor_trains_in_tasks_and_publishes_the_local_bundle_byte_for_byte(tmp_path, built_base):
    ray = pytest.importorskip("ray")
    local = _project(tmp_path / "local", _fast_spec(), base_from=built_base)
    assert _cli(local) == 0
    remote = _project(tmp_path / "ray", _fast_spec(), base_from=built_base)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    try:
        assert _cli(remote, "--executor", "ray") == 0
    finally:
        ray.shutdown()
    for name in ("tone", "antonyms"):
        log = (remote / f".phi-pipeline/runs/scale/cpu/logs/finetune-{name}.log").read_text()
        assert log.startswith("# ray task ")
        assert not (local / f".phi-pipeline/runs/scale/cpu/logs/finetune-{name}.log").read_text().startswith("# ray")
    a, b = (json.loads((p / "dist/scale/cpu/manifest.json").read_text()) for p in (local, remote))
    shipped = [f for f in a["files"] if f.endswith((".onnx_adapter", "model.onnx"))]
    assert len(shipped) == 3
    for f in shipped:
        assert (local / "dist/scale/cpu" / f).read_bytes() == (remote / "dist/scale/cpu" / f).read_bytes(), f
    assert _untimed(a["adapters"]) == _untimed(b["adapters"])  # everything but the trainer's clock


def _untimed(adapters: list[dict]) -> list[dict]:
    timed = ("_runtime", "_per_second")
    return [
        {**a, "training_history": [{k: v for k, v in row.items() if not k.endswith(timed)} for row in a["training_history"]]}
        for a in adapters
    ]


class _FakeCluster:
    """A parallel executor without Olive: each job leaves its outputs behind, except job `fails`, which
    raises `cause` when waited for; `submitted` lists the jobs in the order they were submitted."""

    name, parallel = "fake", True

    def __init__(self, fails: str, cause: str):
        self.fails, self.cause, self.submitted = fails, cause, []

    def submit(self, job, echo=False):
        from phi_pipeline.errors import PipelineError
        from phi_pipeline.orchestration.executors import Pending

        self.submitted.append(job.name)

        def wait():
            if job.name == self.fails:
                raise PipelineError(self.cause)
            for out in job.outputs:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text("{}")

        return Pending(wait, started=True)


def test_a_failed_fine_tune_fails_the_stage_after_the_others_running_are_cached(project):
    from phi_pipeline.orchestration.cache import Cache
    from phi_pipeline.errors import PipelineError
    from phi_pipeline.pipeline import load_plan, train_adapters
    from phi_pipeline.orchestration.progress import Stages

    plan = load_plan("pipelines/tiny-phi3.yaml", "cpu")
    cluster = _FakeCluster(fails="finetune-tone", cause="olive run failed (exit code 1): the cause")
    cache = Cache(plan.paths.cache_dir)
    with pytest.raises(PipelineError, match="the cause"):
        train_adapters(plan, Stages(), cache, "b", False, executor=cluster)
    assert cluster.submitted == ["finetune-tone", "finetune-antonyms"]  # both submitted before either was waited for
    cached = [json.loads(p.read_text())["adapter"] for p in (plan.paths.cache_dir / "adapters").glob("*/cache-entry.json")]
    assert cached == ["antonyms"]


def test_a_failed_merged_export_fails_after_the_others_running_are_cached(project, tmp_path):
    from phi_pipeline.orchestration.cache import Cache
    from phi_pipeline.errors import PipelineError
    from phi_pipeline.pipeline import export_merged, load_plan
    from phi_pipeline.orchestration.progress import Stages
    from phi_pipeline.orchestration.trained import TrainedAdapter

    spec = yaml.safe_load(Path("pipelines/tiny-phi3.yaml").read_text())
    spec["export"]["layout"] = "merged"
    spec["export"].pop("pack_projections", None)
    Path("pipelines/merged.yaml").write_text(yaml.safe_dump(spec))
    plan = load_plan("pipelines/merged.yaml", "cpu")
    trained = []
    for adapter in plan.adapters:
        (tmp_path / adapter.name / "adapter").mkdir(parents=True)
        trained.append(TrainedAdapter(adapter, tmp_path / adapter.name, f"key-{adapter.name}", {}))

    cache = Cache(plan.paths.cache_dir)
    with pytest.raises(PipelineError, match="the export's cause"):
        export_merged(plan, Stages(), cache, "b", trained, False, _FakeCluster(fails="export-tone", cause="the export's cause"))
    cached = [json.loads(p.read_text())["adapter"] for p in (plan.paths.cache_dir / "exports").glob("*/cache-entry.json")]
    assert cached == ["antonyms"]
