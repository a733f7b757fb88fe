"""Integrity end to end on the few-step tiny pipeline: damaged cache entries rebuilt, one run at a
time, SIGTERM and a full disk leave dist/ as it was."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from phi_pipeline.orchestration.cache import file_sha256, tree_files
from phi_pipeline.cli import main

pytestmark = pytest.mark.slow

SPEC = "pipelines/fast.yaml"
BUNDLE = Path("dist/fast/cpu")
CACHE = Path(".phi-pipeline/cache")
TRAIN = Path("pipelines/data/antonyms/train.jsonl")
CLI = [sys.executable, "-m", "phi_pipeline.cli"]
# what a bundle's evaluation adds (wall times, the run's date): the rest is the model and its adapters
REPORT_FILES = ("manifest.json", "eval.json", "report.md", "report/")


@pytest.fixture
def in_fast(fast_project, monkeypatch) -> Path:
    monkeypatch.chdir(fast_project)
    return fast_project


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in tree_files(folder)}


def model_files(folder: Path) -> dict[str, str]:
    return {k: v for k, v in snapshot(folder).items() if not k.startswith(REPORT_FILES)}


def cache_entries() -> dict[str, str]:
    return {k: v for k, v in snapshot(CACHE).items() if k.startswith(("adapters/", "exports/"))}


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def new_training_row() -> None:
    """A unique extra example: the antonyms adapter must be trained again, nothing else."""
    word = uuid.uuid4().hex[:6]
    TRAIN.write_text(TRAIN.read_text() + json.dumps({"input": f"a hot {word}", "output": f"a cold {word}"}) + "\n")


def start_run(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "run", SPEC, *args], stderr=subprocess.PIPE, text=True)


def read_until(proc: subprocess.Popen, text: str) -> list[str]:
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return seen
    pytest.fail(f"the run ended before printing {text!r}:\n{''.join(seen)}")


def test_damaged_cache_entries_are_found_rebuilt_and_republish_the_same_bundle(in_fast, capfd):
    assert main(["run", SPEC]) == 0  # a bundle of the current spec, from the cache
    before = model_files(BUNDLE)
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    tone = next(a["cache_key"] for a in manifest["adapters"] if a["name"] == "tone")
    roots = json.loads((CACHE / "roots/fast.cpu.json").read_text())
    export = next(e for e in roots["last_run"] if e.startswith("exports/"))
    flip_byte(CACHE / "adapters" / tone / "adapter/adapter_model.safetensors")
    flip_byte(CACHE / export / "model.onnx.data")
    capfd.readouterr()

    assert main(["cache", "verify"]) == 1
    err = capfd.readouterr().err
    assert f"adapters/{tone}: damaged" in err and "adapter/adapter_model.safetensors: sha256 differs" in err
    assert f"{export}: damaged" in err and "model.onnx.data: sha256 differs" in err

    rerun = subprocess.run([*CLI, "run", SPEC], capture_output=True, text=True)  # as a user runs it, stage lines and all
    assert rerun.returncode == 0, rerun.stderr
    err = rerun.stderr
    assert f"warning: cache entry adapters/{tone}" in err and f"warning: cache entry {export}" in err
    cached = set(json.loads((BUNDLE / "manifest.json").read_text())["cached_stages"])
    assert "finetune:antonyms" in cached and not {"finetune:tone", "export"} & cached
    assert model_files(BUNDLE) == before  # deterministic training and export: the same bundle again
    assert main(["cache", "verify"]) == 0
    # a completed fine-tune leaves nothing to resume from: the rebuild above retrained from the start
    assert not list(Path(".phi-pipeline/runs/fast/finetune").rglob("checkpoint-*"))


def test_sigterm_mid_training_stops_olive_and_leaves_dist_identical(in_fast):
    before = snapshot(BUNDLE)
    new_training_row()
    proc = start_run()
    read_until(proc, "fine-tuning adapter 'antonyms'")
    time.sleep(4)  # inside Olive's fine-tune
    proc.send_signal(signal.SIGTERM)  # the parent only: it must stop Olive itself
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err
    assert snapshot(BUNDLE) == before
    staging = Path("dist/.staging")
    assert not staging.exists() or not any(staging.iterdir())
    cwd = str(in_fast.resolve())
    olive_left = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and "olive_compat" in (p / "cmdline").read_text() and os.readlink(p / "cwd") == cwd:
                olive_left.append(p.name)
        except OSError:
            continue
    assert not olive_left, "Olive kept running after SIGTERM"


def test_two_concurrent_runs_train_each_adapter_once(in_fast):
    new_training_row()
    first = start_run()
    head = read_until(first, "pipeline 'fast', target cpu")  # first holds the lock
    second = start_run()
    out_second = second.communicate(timeout=900)[1]
    out_first = "".join(head) + first.communicate(timeout=900)[1]
    assert first.returncode == 0 and second.returncode == 0, (out_first, out_second)
    assert f"waiting for the run holding pipeline 'fast' for target cpu to finish (pid {first.pid}, started " in out_second
    trained = re.compile(r"fine-tuning adapter 'antonyms' \(lora\): done")
    reused = re.compile(r"fine-tuning adapter 'antonyms' \(lora\): cached")
    assert trained.search(out_first) and not trained.search(out_second)
    assert reused.search(out_second)


def test_full_disk_while_staging_leaves_dist_and_cache_as_they_were(in_fast, monkeypatch, capfd):
    assert main(["run", SPEC]) == 0  # everything cached: the next run only stages
    before, entries = snapshot(BUNDLE), cache_entries()
    staging = (in_fast / "dist/.staging").resolve()
    real_copyfile = shutil.copyfile

    def full_disk(src, dst, *args, **kwargs):
        if Path(dst).resolve().is_relative_to(staging) and Path(dst).name == "model.onnx.data":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_copyfile(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    capfd.readouterr()
    assert main(["run", SPEC]) == 1
    err = capfd.readouterr().err
    assert "out of disk space while writing the staged bundle in dist/.staging: it needs about" in err
    assert snapshot(BUNDLE) == before and cache_entries() == entries
    assert not any((in_fast / "dist/.staging").iterdir())
