"""The only place that starts Olive: `olive run` on a generated workflow config, in a subprocess.

Each run goes through `python -m phi_pipeline.orchestration.olive_compat run --config ...` so the
onnxruntime-genai shim is applied inside Olive's process. Olive's log is streamed to a log file
(and, with `echo`, to the console); a non-zero exit or a missing output is a PipelineError
that quotes the end of the log. Olive exits 0 when a workflow produces no model, so the caller
always names the files the run must leave behind. An interrupt (Ctrl-C, SIGTERM) stops the Olive
process before it propagates, and a full disk in Olive's log becomes a DiskFullError.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

from phi_pipeline.orchestration.diskspace import disk_full, is_enospc_text
from phi_pipeline.errors import PipelineError
from phi_pipeline.orchestration.olive_compat import SEED_ENV

# Offline by design: nothing may reach a model hub at run time, and Olive's telemetry waits
# about 9 s per process for its host unless CI is set.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OLIVE_DISABLE_TELEMETRY": "1",
    "CI": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def olive_env(offline: bool, hf_cache: Path | None) -> dict[str, str]:
    """Olive's environment. offline: the base model is local, so nothing may reach a hub.
    hf_cache: where Model Builder keeps its intermediate files (it uses the HF hub cache), so a
    local run writes nothing outside the pipeline's own folders."""
    env = dict(os.environ)
    if offline:
        env.update(OFFLINE_ENV)
    else:
        env.update({k: v for k, v in OFFLINE_ENV.items() if not k.endswith("OFFLINE")})
    if hf_cache is not None:
        env["HF_HUB_CACHE"] = str(hf_cache.resolve())
    return env


def run_olive(
    config_path: Path,
    log_path: Path,
    expected_outputs: Iterable[Path],
    *,
    echo: bool = False,
    offline: bool = True,
    hf_cache: Path | None = None,
    seed: int | None = None,
    env: dict[str, str] | None = None,
    python: str | None = None,
    space_needed: int | None = None,
    launcher: list[str] | None = None,
    cwd: Path | None = None,
    header: str | None = None,
) -> float:
    """Run one workflow; return its wall time in seconds. `seed` seeds Olive's process (olive_compat);
    `env` adds variables to its environment; `python`: another environment's interpreter (a target's pass
    environment) to run Olive with; `space_needed`, an estimate of what it writes, is quoted if the disk
    fills up; `launcher` replaces `python -m phi_pipeline.orchestration.olive_compat` (torchrun and the rank entry point)."""
    return run_olive_command(
        ["run", "--config", str(config_path)],
        log_path,
        expected_outputs,
        echo=echo,
        offline=offline,
        hf_cache=hf_cache,
        seed=seed,
        env=env,
        python=python,
        space_needed=space_needed,
        launcher=launcher,
        cwd=cwd,
        header=header,
    )


def run_olive_command(
    olive_args: list[str],
    log_path: Path,
    expected_outputs: Iterable[Path],
    *,
    echo: bool = False,
    offline: bool = True,
    hf_cache: Path | None = None,
    seed: int | None = None,
    env: dict[str, str] | None = None,
    python: str | None = None,
    space_needed: int | None = None,
    launcher: list[str] | None = None,
    cwd: Path | None = None,
    header: str | None = None,
) -> float:
    """Any `olive` command, through the compatibility wrapper; return its wall time in seconds.

    With `python` (another environment, which has Olive but not phi-pipeline) Olive's own CLI runs
    there: the wrapper's shim is for onnxruntime-genai's Model Builder, which such workflows do not run.
    `cwd`: the project root relative paths are read from (a Ray worker's own folder is another); `header`:
    a first log line."""
    outputs = list(expected_outputs)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if python is not None and not Path(python).exists():
        raise PipelineError(f"{python} not found: this target's export runs in that environment (make venv TARGET=...)")
    if python:
        cmd = [python, "-m", "olive", *olive_args]
    else:
        cmd = [*(launcher or [sys.executable, "-m", "phi_pipeline.orchestration.olive_compat"]), *olive_args]
    what = " ".join(olive_args)
    tail: collections.deque[str] = collections.deque(maxlen=25)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        if header:
            log.write(header + "\n")
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=olive_env(offline, hf_cache) | ({SEED_ENV: str(seed)} if seed is not None else {}) | (env or {}),
            bufsize=1,
            cwd=cwd,
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                tail.append(line.rstrip("\n"))
                if echo:
                    sys.stderr.write(line)
            rc = proc.wait()
        except BaseException:
            stop(proc)
            raise
    elapsed = time.perf_counter() - start
    last_lines = "\n".join(f"    {line}" for line in tail)
    if rc != 0 and any(is_enospc_text(line) for line in tail):
        folder = Path(os.path.commonpath([str(Path(p).absolute()) for p in outputs])) if outputs else log_path.parent
        raise disk_full(folder, space_needed, f"the outputs of olive {what} (its log: {log_path})")
    if rc != 0:
        raise PipelineError(
            f"olive {what} failed (exit code {rc}).\n  Last lines of the log:\n{last_lines}\n"
            f"  Full log: {log_path}"
        )
    missing = [str(p) for p in outputs if not p.exists()]
    if missing:
        raise PipelineError(
            f"olive {what} exited 0 but produced no model: missing {', '.join(missing)}.\n"
            f"  Last lines of the log:\n{last_lines}\n  Full log: {log_path}"
        )
    return elapsed


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop an Olive process: SIGTERM, then SIGKILL if it has not exited within grace_s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
