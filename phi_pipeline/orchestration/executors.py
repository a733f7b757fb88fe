"""Where a stage's independent Olive workflows run: here, one after another (local, the default), or as
Ray tasks on a cluster (ray, the `ray` extra).

A job is one `olive run` subprocess with every path absolute and its own work folder and Olive cache, so
it can run in any process or node that sees the same files; the driver keeps the content-keyed cache.
Ray is imported only by the ray executor.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

from phi_pipeline.errors import PipelineError, UsageError
from phi_pipeline.orchestration.runner import run_olive

EXECUTORS = ("local", "ray")
MARKER_PREFIX = ".shared-folder-check-"


@dataclass(frozen=True)
class OliveJob:
    """One Olive workflow: what run_olive needs, and what it asks of a cluster."""

    name: str
    config: Path
    log: Path
    outputs: tuple[Path, ...]
    offline: bool
    hf_cache: Path | None
    seed: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    launcher: tuple[str, ...] | None = None
    olive_cache: Path | None = None
    """A task's own Olive cache (Olive cleans and does not lock its cache: parallel runs must not share one)."""
    num_cpus: float = 1
    num_gpus: float = 0
    python: str | None = None
    """Another environment's interpreter that runs the whole workflow (a target's pass environment)."""
    space_needed: int | None = None
    """About what the workflow writes, quoted if the disk fills up."""
    cwd: Path | None = None
    """The folder relative paths are read from (set by absolute())."""

    def absolute(self) -> OliveJob:
        """The job with every path absolute and the project root as cwd: a Ray worker runs elsewhere."""
        root = Path.cwd()
        return replace(
            self,
            config=root / self.config,
            log=root / self.log,
            outputs=tuple(root / p for p in self.outputs),
            hf_cache=root / self.hf_cache if self.hf_cache else None,
            olive_cache=root / self.olive_cache if self.olive_cache else None,
            cwd=root,
        )

    def run(self, header: str | None = None, echo: bool = False) -> float:
        config = self.config
        if self.olive_cache is not None:
            workflow = json.loads(config.read_text())
            workflow["cache_dir"] = self.olive_cache.as_posix()
            config = self.log.with_name(f"{self.config.stem}.task.json")
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(json.dumps(workflow, indent=2))
        return run_olive(
            config,
            self.log,
            self.outputs,
            echo=echo,
            offline=self.offline,
            hf_cache=self.hf_cache,
            seed=self.seed,
            env=self.env,
            launcher=list(self.launcher) if self.launcher else None,
            cwd=self.cwd,
            header=header,
            python=self.python,
            space_needed=self.space_needed,
        )


class Pending:
    """A submitted job; result() waits for it (a job the local executor has not started runs then)."""

    def __init__(self, wait: Callable[[], Any], started: bool):
        self._wait = wait
        self.started = started

    def result(self) -> None:
        self._wait()


class Executor(Protocol):
    name: str
    parallel: bool
    """Whether submitted jobs run beside each other (then each needs its own Olive cache)."""

    def submit(self, job: OliveJob, echo: bool = False) -> Pending: ...


class LocalExecutor:
    name = "local"
    parallel = False

    def submit(self, job: OliveJob, echo: bool = False) -> Pending:
        return Pending(lambda: job.run(echo=echo), started=False)


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray", ["Ray is not installed: pip install 'phi-pipeline[ray]'"]) from None
    return ray


def _run_task(job: OliveJob) -> float:
    """Body of a Ray task: the log's first line names the task and node that ran it."""
    import ray

    ctx = ray.get_runtime_context()
    header = (f"# ray task {ctx.get_task_id()} on node {ctx.get_node_id()}, "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}")
    # Ray sets OMP_NUM_THREADS to the task's num_cpus; torch's kernels then sum in another order than a local
    # run's (its default: every physical core), and a fine-tune ends a few bits apart. Olive runs with the
    # node's default, as it does locally, so the executor does not change what is published (a job that
    # pins its threads, like a torchrun rank, keeps them through job.env).
    os.environ.pop("OMP_NUM_THREADS", None)
    return job.run(header=header)


def _sees(path: str) -> bool:
    return os.path.exists(path)


class RayExecutor:
    """Each job a Ray task (`olive run` in a subprocess of the task's worker) with the job's resources."""

    name = "ray"
    parallel = True

    def __init__(self, address: str | None, shared: Path):
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        self._task = ray.remote(_run_task)
        check_shared_folder(shared)

    def submit(self, job: OliveJob, echo: bool = False) -> Pending:
        ray = _ray()
        job = job.absolute()
        ref = self._task.options(num_cpus=job.num_cpus, num_gpus=job.num_gpus, name=f"olive:{job.name}").remote(job)

        def wait() -> None:
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, PipelineError) else None
                raise PipelineError(f"Ray task olive:{job.name} failed: {cause or exc}") from None

        return Pending(wait, started=True)


def write_marker(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{MARKER_PREFIX}{uuid.uuid4().hex}"
    marker.write_text("written by the phi-pipeline driver\n")
    return marker


def check_shared_folder(folder: Path) -> None:
    """Refuse a cluster whose nodes do not see the driver's work folder: the driver writes a marker file
    there and a task on every alive node must see it (artifacts move through that folder)."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = write_marker(folder.resolve())
    try:
        sees = ray.remote(num_cpus=0)(_sees)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        answers = ray.get([
            sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(marker))
            for node in nodes
        ])
    finally:
        marker.unlink(missing_ok=True)
    blind = [node for node, seen in zip(nodes, answers) if not seen]
    if blind:
        raise UsageError("--executor ray", [
            f"{len(blind)} of {len(nodes)} Ray node(s) cannot see {folder.resolve()} (a marker file the driver wrote "
            f"there is missing on node(s) {', '.join(n[:12] for n in blind)}): put work_dir on storage every node "
            "mounts at the same path (NFS, a shared volume) and run from there"
        ])


def make_executor(name: str, address: str | None, shared: Path) -> Executor:
    if name == "ray":
        return RayExecutor(address, shared)
    if address is not None:
        raise UsageError("--ray-address", ["only with --executor ray"])
    return LocalExecutor()
