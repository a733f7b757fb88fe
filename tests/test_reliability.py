"""Caching by content, atomic publish under SIGKILL, and tamper detection, on a few-step tiny pipeline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from phi_pipeline.orchestration.cache import file_sha256, tree_files
from phi_pipeline.cli import main

pytestmark = pytest.mark.slow

SPEC = "pipelines/fast.yaml"
BUNDLE = Path("dist/fast/cpu")


@pytest.fixture
def in_fast(fast_project, monkeypatch) -> Path:
    monkeypatch.chdir(fast_project)
    return fast_project


def manifest() -> dict:
    return json.loads((BUNDLE / "manifest.json").read_text())


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in tree_files(folder)}


def edit_spec(change) -> None:
    spec = yaml.safe_load(Path(SPEC).read_text())
    change(spec)
    Path(SPEC).write_text(yaml.safe_dump(spec, sort_keys=False))


def test_rerun_with_nothing_changed_does_no_olive_work(in_fast):
    start = time.perf_counter()
    assert main(["run", SPEC]) == 0
    seconds = time.perf_counter() - start
    cached = set(manifest()["cached_stages"])
    assert {"finetune:tone", "finetune:antonyms", "export"} <= cached
    print(f"no-op re-run: {seconds:.1f}s")  # reported in the closing note; not a timing assertion


def test_changed_dataset_retrains_exactly_that_adapter(in_fast):
    before = manifest()
    train = Path("pipelines/data/antonyms/train.jsonl")
    train.write_text(train.read_text() + json.dumps({"input": "a warm cup", "output": "a cold cup"}) + "\n")
    assert main(["run", SPEC]) == 0
    after = manifest()
    assert "finetune:tone" in after["cached_stages"] and "export" in after["cached_stages"]
    assert "finetune:antonyms" not in after["cached_stages"]
    sha = {m["name"]: m["sha256"] for m in before["adapters"]}, {m["name"]: m["sha256"] for m in after["adapters"]}
    assert sha[0]["tone"] == sha[1]["tone"] and sha[0]["antonyms"] != sha[1]["antonyms"]
    assert before["files"]["model.onnx"] == after["files"]["model.onnx"]


def test_added_adapter_trains_alone_and_leaves_the_base_unchanged(in_fast):
    before = manifest()

    def add(spec):
        extra = json.loads(json.dumps(spec["adapters"][0]))
        extra["name"] = "tone2"
        extra.setdefault("lora", {})["r"] = 4
        spec["adapters"].append(extra)

    edit_spec(add)
    assert main(["run", SPEC]) == 0
    after = manifest()
    assert [a["name"] for a in after["adapters"]] == ["tone", "antonyms", "tone2"]
    assert {"finetune:tone", "finetune:antonyms", "export"} <= set(after["cached_stages"])
    assert "finetune:tone2" not in after["cached_stages"]
    for name in ("model.onnx", "model.onnx.data"):
        assert after["files"][name] == before["files"][name]


def test_sigkill_mid_export_keeps_the_previous_bundle_and_rerun_completes(in_fast):
    before = snapshot(BUNDLE)
    edit_spec(lambda spec: spec["export"].update(int4_block_size=64))  # forces a new export
    proc = subprocess.Popen(
        [sys.executable, "-m", "phi_pipeline.cli", "run", SPEC],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "exporting the base model" in line:
            break
    time.sleep(3)  # inside Olive's export
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert snapshot(BUNDLE) == before
    assert main(["run", SPEC]) == 0
    after = snapshot(BUNDLE)
    assert after["model.onnx"] != before["model.onnx"]
    staging = Path("dist/.staging")
    assert not staging.exists() or not any(staging.iterdir())  # nothing half-written left behind


def test_verify_names_a_tampered_file(in_fast, capsys):
    adapter = BUNDLE / "adapters/tone.onnx_adapter"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF
    adapter.write_bytes(bytes(data))
    assert main(["verify", str(BUNDLE)]) == 1
    err = capsys.readouterr().err
    assert "adapters/tone.onnx_adapter: sha256 differs from the manifest" in err
