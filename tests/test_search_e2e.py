"""Search end to end on the tiny model: trials through Olive, a kill between trials, the best trial published."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

TRIALS = 3


@pytest.fixture(scope="module")
def search_project(tmp_path_factory, fast_project) -> Path:
    """The fast spec with a 3-trial random search of tone's learning rate, sharing the built base model."""
    project = tmp_path_factory.mktemp("search-project")
    shutil.copytree(ROOT / "pipelines", project / "pipelines")
    shutil.copytree(fast_project / ".phi-pipeline/base", project / ".phi-pipeline/base")
    spec = yaml.safe_load((fast_project / "pipelines/fast.yaml").read_text())
    spec["name"] = "fast-search"
    tone = next(a for a in spec["adapters"] if a["name"] == "tone")
    tone["search"] = {
        "strategy": "random",
        "trials": TRIALS,
        "seed": 0,
        "objective": "loss",
        "space": {"training.learning_rate": {"low": 1e-4, "high": 3e-2, "log": True}},
    }
    (project / "pipelines/fast-search.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return project


def _cli(project: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "phi_pipeline.cli", *args], cwd=project, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def _trial_entries(project: Path) -> dict[str, float]:
    """Cache entries of tone's trials (by their cache-entry.json) and when each was written."""
    out = {}
    for meta in (project / ".phi-pipeline/cache/adapters").glob("*/cache-entry.json"):
        if ".trial-" in json.loads(meta.read_text())["adapter"]:
            out[meta.parent.name] = meta.stat().st_mtime
    return out


@pytest.mark.slow
def test_search_killed_between_trials_resumes_and_publishes_the_best_trial(search_project):
    killed = _cli(search_project, "run", "pipelines/fast-search.yaml")
    lines = []
    deadline = time.monotonic() + 900
    for line in killed.stdout:
        lines.append(line)
        if f"search tone: trial 1/{TRIALS}" in line or time.monotonic() > deadline:
            break
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert any(f"trial 1/{TRIALS}" in line for line in lines), "".join(lines)
    before = _trial_entries(search_project)
    assert len(before) == 1

    rerun = _cli(search_project, "run", "pipelines/fast-search.yaml")
    out, _ = rerun.communicate(timeout=1200)
    assert rerun.returncode == 0, out
    assert f"trial 1/{TRIALS}" not in out  # the finished trial is not asked again
    assert f"trial {TRIALS}/{TRIALS}" in out
    after = _trial_entries(search_project)
    assert len(after) == TRIALS and all(after[k] == before[k] for k in before)  # nor retrained

    manifest = json.loads((search_project / "dist/fast-search/cpu/manifest.json").read_text())
    tone = next(a for a in manifest["adapters"] if a["name"] == "tone")
    search = tone["search"]
    assert len(search["trials"]) == TRIALS
    best = min((t for t in search["trials"] if t["objective"] is not None), key=lambda t: t["objective"])
    assert search["best_trial"] == best["number"]
    assert tone["training"]["learning_rate"] == best["params"]["training.learning_rate"]
    state = json.loads((search_project / ".phi-pipeline/cache/adapters" / tone["cache_key"] / "trainer_state.json").read_text())
    assert min(h["eval_loss"] for h in state["log_history"] if "eval_loss" in h) == pytest.approx(best["objective"])
    report = (search_project / "dist/fast-search/cpu/report.md").read_text()
    assert f"| **{best['number']} (best)** |" in report and "report/search-tone.png" in report
    configs = search_project / "olive_configs/fast-search/cpu/search/tone"
    assert sorted(p.name for p in configs.glob("trial-*.json"))[:1] == ["trial-000.json"]

    again = _cli(search_project, "search", "pipelines/fast-search.yaml")
    table, _ = again.communicate(timeout=600)
    assert again.returncode == 0, table
    assert "trial 1/" not in table and f"{best['number']}*" in table  # a finished search trains nothing
