"""What phi-pipeline's orchestration costs on top of Olive's own work.

In a scratch copy of the project (pipelines/ and the built tiny base only; never the real
project, whose .phi-pipeline/ and dist/ other runs use):

1. `phi-pipeline run` of the tiny default spec, in a driver process that records the wall time of
   every `olive run` it starts and of the layout adapter it writes (wrappers around
   executors.run_olive (where the pipeline's jobs call it) and adapters.write_layout_adapter; nothing else
   is changed);
2. the same generated Olive workflows run by hand, one `olive run --config` each, as a user
   would without phi-pipeline (the export through `python -m phi_pipeline.orchestration.olive_compat`, because
   plain `olive` cannot run Model Builder with onnxruntime-genai 0.18; see olive_compat.py).

Olive's own per-pass times come from its logs ("Pass ... finished in N seconds"). Orchestration
overhead is the pipeline's wall time outside the Olive processes it starts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from phi_pipeline.evaluate.stats import summary

SPEC = Path("pipelines/tiny-phi3.yaml")
TINY_BASE = Path(".phi-pipeline/base")
# Stages doing work that the Olive workflows by hand do not: building the tiny base (when missing or
# stale) and evaluating the bundle (ONNX vs PyTorch, publish gates). Kept apart from orchestration
# (imports, hashing, cache copies, layout adapter, staging, verify, publish).
NOT_OLIVE_STAGES = ("base", "evaluate")
_PASS = re.compile(r"Pass (\S+) finished in ([0-9.]+) seconds")
_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def scratch_project(root: Path, dest: Path) -> Path:
    """A fresh copy of what the tiny pipeline reads: pipelines/ and, when built, the tiny base. The spec
    loses its export search: the comparison is with the one export a user runs by hand."""
    import yaml

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    shutil.copytree(root / "pipelines", dest / "pipelines")
    spec = yaml.safe_load((dest / SPEC).read_text())
    spec["export"].pop("search", None)
    (dest / SPEC).write_text(yaml.safe_dump(spec, sort_keys=False))
    if (root / TINY_BASE).is_dir():
        shutil.copytree(root / TINY_BASE, dest / TINY_BASE)
    return dest


def olive_log_times(log: Path) -> dict[str, Any]:
    """Olive's per-pass seconds and the span between its first and last log line."""
    text = log.read_text(errors="replace")
    stamps = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for m in map(_STAMP.match, text.splitlines()) if m]
    return {
        "passes_s": {name: round(float(s), 2) for name, s in _PASS.findall(text)},
        "logged_span_s": round((stamps[-1] - stamps[0]).total_seconds(), 2) if stamps else None,
    }


def _olive_logs(project: Path) -> dict[str, dict[str, Any]]:
    logs = sorted((project / ".phi-pipeline" / "runs").glob("*/*/logs/*.log"))
    return {log.stem: olive_log_times(log) for log in logs}


def run_pipeline(project: Path, target: str) -> dict[str, Any]:
    """`phi-pipeline run` in a driver subprocess (cwd = project); its timings and the manifest's."""
    result = project / "driver-result.json"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "phi_pipeline.bench.pipeline_costs", str(SPEC), target, str(result)],
        cwd=project, capture_output=True, text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"phi-pipeline run failed in {project}:\n{proc.stderr[-3000:]}")
    driver = json.loads(result.read_text())
    manifest = json.loads(next((project / "dist").glob(f"*/{target}/manifest.json")).read_text())
    olive_s = sum(r["wall_s"] for r in driver["olive_runs"])
    logs = _olive_logs(project)
    passes = sum(sum(log["passes_s"].values()) for log in logs.values())
    not_olive = {k: v for k, v in manifest["stage_seconds"].items() if k in NOT_OLIVE_STAGES}
    return {
        "process_wall_s": round(wall, 2),
        "stage_seconds": manifest["stage_seconds"],
        "olive_runs": driver["olive_runs"],
        "olive_logs": logs,
        "olive_process_s": round(olive_s, 2),
        "olive_passes_s": round(passes, 2),
        "outside_olive_s": round(wall - olive_s, 2),
        "not_olive_stages_s": not_olive,
        "orchestration_s": round(wall - olive_s - sum(not_olive.values()), 2),
        # Olive process start-up and teardown plus orchestration: the pipeline's time outside Olive's passes
        "beyond_passes_s": round(wall - sum(not_olive.values()) - passes, 2),
        "layout_adapter_s": driver["layout_adapter_s"],
    }


def run_by_hand(project: Path) -> dict[str, Any]:
    """The pipeline's generated workflows, each run by one Olive command, as a user would."""
    from phi_pipeline.orchestration.runner import olive_env

    configs_dir = next((project / "olive_configs").glob("*/*"))
    configs = sorted(configs_dir.glob("finetune-*.json")) + [configs_dir / "export.json"]
    shutil.rmtree(project / ".phi-pipeline" / "olive-cache", ignore_errors=True)
    olive = Path(sys.executable).parent / "olive"
    runs = []
    for config in configs:
        if config.name == "export.json":  # plain `olive` fails in Model Builder with genai >= 0.15
            launcher = [sys.executable, "-m", "phi_pipeline.orchestration.olive_compat"]
            shown = "python -m phi_pipeline.orchestration.olive_compat"
        else:
            launcher, shown = [str(olive)], "olive"
        cmd = [*launcher, "run", "--config", str(config)]
        start = time.perf_counter()
        env = olive_env(offline=True, hf_cache=project / ".phi-pipeline" / "hf-cache")  # as the pipeline's runs
        proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        log = project / f"by-hand-{config.stem}.log"
        log.write_text(proc.stdout + proc.stderr)
        runs.append({"command": f"{shown} run --config {config.name}", "wall_s": round(wall, 2), **olive_log_times(log)})
    passes = sum(sum(r["passes_s"].values()) for r in runs)
    total = sum(r["wall_s"] for r in runs)
    return {"runs": runs, "total_s": round(total, 2), "olive_passes_s": round(passes, 2), "beyond_passes_s": round(total - passes, 2)}


def measure_pipeline_costs(root: Path, scratch: Path, target: str = "cpu", reps: int = 1) -> dict[str, Any]:
    """Pipeline and by-hand wall times, `reps` times each, alternating, in fresh scratch copies."""
    pipeline_runs, hand_runs = [], []
    for i in range(reps):
        project = scratch_project(root, scratch / f"project-{i}")
        pipeline_runs.append(run_pipeline(project, target))
        hand_runs.append(run_by_hand(project))
    walls = [r["process_wall_s"] for r in pipeline_runs]
    hands = [r["total_s"] for r in hand_runs]
    orchestration = [r["orchestration_s"] for r in pipeline_runs]
    # Training passes dominate and swing with the machine's load between the two routes, so the
    # routes are also compared with Olive's pass time equalised: the by-hand passes plus each
    # route's own time beyond them.
    equalised = [
        (h["olive_passes_s"] + p["beyond_passes_s"]) / (h["olive_passes_s"] + h["beyond_passes_s"])
        for p, h in zip(pipeline_runs, hand_runs)
    ]
    return {
        "spec": SPEC.as_posix(),
        "target": target,
        "pipeline_wall_s": summary(walls, digits=2),
        "by_hand_wall_s": summary(hands, digits=2),
        "outside_olive_s": summary([r["outside_olive_s"] for r in pipeline_runs], digits=2),
        "not_olive_stages_s": summary([sum(r["not_olive_stages_s"].values()) for r in pipeline_runs], digits=2),
        "orchestration_s": summary(orchestration, digits=2),
        "orchestration_share": summary([o / w for o, w in zip(orchestration, walls)]),
        "pipeline_beyond_passes_s": summary([r["beyond_passes_s"] for r in pipeline_runs], digits=2),
        "by_hand_beyond_passes_s": summary([h["beyond_passes_s"] for h in hand_runs], digits=2),
        "pipeline_over_by_hand": summary([w / h for w, h in zip(walls, hands)]),
        "pipeline_over_by_hand_passes_equalised": summary(equalised),
        "pipeline_runs": pipeline_runs,
        "by_hand_runs": hand_runs,
    }


def _drive(spec: str, target: str, out: Path) -> None:
    """Driver-process side of run_pipeline: time each Olive run and the layout adapter, then run."""
    import phi_pipeline.orchestration.executors as executors
    import phi_pipeline.bundle.adapters as adapters
    import phi_pipeline.pipeline as pipeline

    olive_runs: list[dict[str, Any]] = []
    layout: list[float] = []
    run_olive, write_layout_adapter = executors.run_olive, adapters.write_layout_adapter

    def timed_run_olive(config_path: Path, *args: Any, **kwargs: Any) -> float:
        start = time.perf_counter()
        run_olive(config_path, *args, **kwargs)
        elapsed = time.perf_counter() - start
        olive_runs.append({"config": Path(config_path).name, "wall_s": round(elapsed, 2)})
        return elapsed

    def timed_layout(*args: Any, **kwargs: Any) -> Path:
        start = time.perf_counter()
        path = write_layout_adapter(*args, **kwargs)
        layout.append(round(time.perf_counter() - start, 2))
        return path

    executors.run_olive, adapters.write_layout_adapter = timed_run_olive, timed_layout
    pipeline.run(spec, target)
    out.write_text(json.dumps({"olive_runs": olive_runs, "layout_adapter_s": sum(layout)}))


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
