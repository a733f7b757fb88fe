"""Training: validation split, early stopping with the best checkpoint shipped, resume after a kill,
progress lines, modules_to_save, and cache keys that depend on content only."""

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

from conftest import ROOT, _run_in
from phi_pipeline.errors import UsageError
from phi_pipeline.pipeline_spec.plan import make_plan
from phi_pipeline.orchestration.progress import progress_line
from phi_pipeline.pipeline_spec.schema import load_spec, parse_spec

TINY = ROOT / "pipelines/tiny-phi3.yaml"


def _tiny_plan(tmp_path, monkeypatch, edit=None, target="cpu"):
    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load(TINY.read_text())
    if edit:
        edit(raw)
    return make_plan(parse_spec(yaml.safe_dump(raw)), target)


def test_validation_fraction_feeds_the_trainer_held_out_rows_and_eval_split_is_not_trainer_data(tmp_path, monkeypatch):
    from phi_pipeline.orchestration.configs import workflow_configs

    plan = _tiny_plan(tmp_path, monkeypatch)
    config = workflow_configs(plan)["finetune-tone.json"]
    files = {d["name"]: d["load_dataset_config"]["data_files"] for d in config["data_configs"]}
    assert files == {
        "train_data": [".phi-pipeline/runs/tiny-phi3/data/tone/train.jsonl"],
        "validation_data": [".phi-pipeline/runs/tiny-phi3/data/tone/validation.jsonl"],
    }
    assert config["passes"]["finetune"]["eval_data_config"] == "validation_data"
    args = config["passes"]["finetune"]["training_args"]
    assert (args["eval_steps"], args["save_steps"], args["load_best_model_at_end"]) == (20, 40, True)


def test_held_out_rows_are_seeded_and_disjoint_from_training_rows(tmp_path, monkeypatch):
    from phi_pipeline.orchestration.training import prepare_splits

    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    plan = make_plan(load_spec("pipelines/tiny-phi3.yaml"), "cpu")
    first = prepare_splits(plan)["tone"][1]
    assert prepare_splits(plan)["tone"][1] == first and len(first["lines"]) == 32
    train = (tmp_path / plan.paths.split_file("tone", "train")).read_text().splitlines()
    held = (tmp_path / plan.paths.split_file("tone", "validation")).read_text().splitlines()
    source = (tmp_path / "pipelines/data/tone/train.jsonl").read_text().splitlines()
    assert held == [source[n - 1] for n in first["lines"]] and len(train) + len(held) == len(source)


def test_hub_dataset_goes_to_olive_as_load_dataset_config_with_a_cut_validation_split(tmp_path, monkeypatch):
    from phi_pipeline.orchestration.configs import workflow_configs

    def to_hub(raw):
        raw["adapters"][1]["data"] = {
            "hub": "someorg/antonyms", "subset": "en", "train_split": "train[:1000]", "eval_split": "test",
            "text_template": "Opposite: {input}\nAnswer: {output}", "response_field": "output",
        }

    plan = _tiny_plan(tmp_path, monkeypatch, to_hub)
    loads = [d["load_dataset_config"] for d in workflow_configs(plan)["finetune-antonyms.json"]["data_configs"]]
    assert loads == [
        {"data_name": "someorg/antonyms", "split": "train[0:900]", "subset": "en"},
        {"data_name": "someorg/antonyms", "split": "train[900:1000]", "subset": "en"},
    ]


def test_hub_split_that_cannot_be_cut_is_a_spec_error_naming_the_line():
    text = TINY.read_text().replace(
        "      train: pipelines/data/antonyms/train.jsonl\n      eval: pipelines/data/antonyms/eval.jsonl\n",
        "      hub: someorg/antonyms\n      train_split: 'train[:10%]'\n      eval_split: test\n",
    )
    with pytest.raises(UsageError) as info:
        parse_spec(text)
    assert any("validation_fraction cannot cut train_split 'train[:10%]'" in p for p in info.value.problems)


def test_modules_to_save_is_refused_for_multi_adapter_and_passed_to_olive_when_merged(tmp_path, monkeypatch):
    from phi_pipeline.orchestration.configs import workflow_configs

    def save_head(raw):
        raw["lora"]["modules_to_save"] = ["lm_head"]

    with pytest.raises(UsageError, match="use export.layout: merged"):
        _tiny_plan(tmp_path, monkeypatch, save_head)

    def merged(raw):
        save_head(raw)
        raw["export"]["layout"] = "merged"

    plan = _tiny_plan(tmp_path, monkeypatch, merged)
    assert workflow_configs(plan)["finetune-tone.json"]["passes"]["finetune"]["modules_to_save"] == ["lm_head"]


def test_training_key_ignores_pipeline_name_work_paths_and_runtime_packages(tmp_path, monkeypatch):
    from phi_pipeline import versions
    from phi_pipeline.orchestration import training
    from phi_pipeline.orchestration.configs import workflow_configs
    from phi_pipeline.orchestration.workflows.finetune import trainer_hooks

    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    plans = [
        make_plan(load_spec("pipelines/tiny-phi3.yaml"), "cpu"),
        make_plan(load_spec("pipelines/tiny-phi3.yaml").model_copy(update={"name": "copy", "output_dir": "out"}), "cpu"),
    ]
    keys = []
    for plan in plans:
        training.prepare_splits(plan)
        adapter = plan.adapter("tone")
        config = workflow_configs(plan)["finetune-tone.json"]
        keys.append(training.training_key(plan, config, trainer_hooks(adapter, plan.paths), "base-digest"))
    assert keys[0] == keys[1]
    assert "onnxruntime" not in versions.training_versions() and "torch" in versions.training_versions()


def test_progress_line_shows_step_losses_elapsed_and_remaining():
    begin = {"step": 0, "max_steps": 100, "time": 1000.0}
    line = progress_line("tone", {"step": 25, "max_steps": 100, "time": 1010.0}, begin, {"loss": 1.5, "eval_loss": 1.75})
    assert line == "tone: step 25/100 (25%) | loss 1.5000 | val loss 1.7500 | 0:10 elapsed, ~0:30 left"


def test_trainer_hooks_add_early_stopping_and_progress_callbacks_to_any_trainer(tmp_path):
    from transformers import EarlyStoppingCallback

    from phi_pipeline.orchestration.olive_compat import trainer_callbacks

    callbacks = trainer_callbacks({"early_stopping": {"patience": 2, "threshold": 0.5}, "progress_file": str(tmp_path / "p.jsonl")})
    seal, stop, progress = callbacks
    assert type(seal).__name__ == "CheckpointSeal"  # always: a resumed run reads only sealed checkpoints
    assert isinstance(stop, EarlyStoppingCallback)
    assert (stop.early_stopping_patience, stop.early_stopping_threshold) == (2, 0.5)
    assert type(progress).__name__ == "ProgressWriter"


# ---------------------------------------------------------------------------------------- end to end


def _write_spec(project: Path, name: str, **training) -> str:
    spec = yaml.safe_load((project / "pipelines/fast.yaml").read_text())
    spec["name"] = name
    spec["training"].update(training)
    spec["adapters"] = spec["adapters"][:1]
    (project / f"pipelines/{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return f"pipelines/{name}.yaml"


@pytest.mark.slow
def test_copy_of_spec_under_another_name_reuses_every_adapter_and_the_export(fast_project):
    spec = yaml.safe_load((fast_project / "pipelines/fast.yaml").read_text())
    spec["name"] = "fast-copy"
    (fast_project / "pipelines/fast-copy.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    bundle = _run_in(fast_project, "pipelines/fast-copy.yaml")
    cached = json.loads((bundle / "manifest.json").read_text())["cached_stages"]
    assert {"finetune:tone", "finetune:antonyms", "export"} <= set(cached)
    original = fast_project / "dist/fast/cpu"
    assert (bundle / "model.onnx").read_bytes() == (original / "model.onnx").read_bytes()


@pytest.mark.slow
def test_early_stopping_ends_training_before_max_steps_and_ships_the_best_checkpoint(fast_project, capsys, monkeypatch):
    from safetensors.numpy import load_file

    import phi_pipeline.pipeline

    # keep the checkpoints a completed fine-tune leaves (the run discards them once cached) to compare with
    monkeypatch.setattr(phi_pipeline.pipeline, "discard_finetune_dir", lambda out: None)

    # threshold 100: no evaluation after the first counts as an improvement, so patience 1 stops at the second
    spec = _write_spec(fast_project, "early", max_steps=40, logging_steps=2, eval_steps=2, save_steps=2,
                       early_stopping_patience=1, early_stopping_threshold=100.0)
    capsys.readouterr()
    bundle = _run_in(fast_project, spec)
    err = capsys.readouterr().err
    assert "stopped early" in err
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["adapters"][0]
    steps = [h["step"] for h in entry["training_history"] if "eval_loss" in h]
    assert steps == [0, 2, 4] and entry["dataset"]["validation_rows"]["fraction"] == 0.1
    state = json.loads((fast_project / ".phi-pipeline/cache/adapters" / entry["cache_key"] / "trainer_state.json").read_text())
    assert state["global_step"] == 4 < 40
    best = fast_project / state["best_model_checkpoint"]
    shipped = load_file(fast_project / ".phi-pipeline/cache/adapters" / entry["cache_key"] / "adapter/adapter_model.safetensors")
    kept = load_file(best / "adapter_model.safetensors")
    assert shipped.keys() == kept.keys() and all((shipped[k] == kept[k]).all() for k in kept)
    assert "![training and validation loss of tone](report/loss-tone.png)" in (bundle / "report.md").read_text()


@pytest.mark.slow
def test_tiny_default_validates_on_held_out_rows_and_reports_both_loss_curves(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    for entry in manifest["adapters"]:
        history = entry["training_history"]
        assert any("loss" in h for h in history) and any("eval_loss" in h for h in history)
        assert len(entry["dataset"]["validation_rows"]["lines"]) == 32
    report = (tiny_bundle / "report.md").read_text()
    assert "![training and validation loss of antonyms](report/loss-antonyms.png)" in report
    assert "Confusion table of the adapter" in report  # tone's metrics include f1


@pytest.mark.slow
def test_killed_fine_tune_resumes_from_its_sealed_checkpoint_to_the_bytes_of_an_uninterrupted_one(fast_project, capsys):
    spec = _write_spec(fast_project, "resume", max_steps=60, logging_steps=2, eval_steps=2, save_steps=2)
    clean = json.loads((_run_in(fast_project, spec) / "manifest.json").read_text())["adapters"][0]
    shutil.rmtree(fast_project / ".phi-pipeline/cache/adapters" / clean["cache_key"])  # train it again, killed
    published = (fast_project / "dist/resume/cpu/manifest.json").read_bytes()
    trainer = fast_project / ".phi-pipeline/runs/resume/finetune/tone/trainer"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "phi_pipeline.cli", "run", spec], cwd=fast_project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not list(trainer.glob("checkpoint-*/phi-pipeline-seal.json")):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its Olive process, as a power cut would
        proc.wait()
    assert (fast_project / "dist/resume/cpu/manifest.json").read_bytes() == published
    capsys.readouterr()
    bundle = _run_in(fast_project, spec)
    err = capsys.readouterr().err
    assert "tone: resuming the interrupted fine-tune from checkpoint-" in err
    assert "Resuming training at" in (fast_project / ".phi-pipeline/runs/resume/cpu/logs/finetune-tone.log").read_text()
    resumed = json.loads((bundle / "manifest.json").read_text())["adapters"][0]
    assert (resumed["cache_key"], resumed["sha256"]) == (clean["cache_key"], clean["sha256"])


def test_array_hub_and_modules_to_save_configs_pass_olive_validation(tmp_path, monkeypatch):
    from olive_validation import olive_check

    from phi_pipeline.orchestration.configs import workflow_configs
    from phi_pipeline.orchestration.olive_compat import patch_lora_modules_to_save

    patch_lora_modules_to_save()  # as `olive run` through olive_compat does

    def sources(raw):
        raw["export"]["layout"] = "merged"
        raw["lora"]["modules_to_save"] = ["lm_head"]
        raw["adapters"][0]["data"].update(train="data/tone.json", field="rows", validation="data/tone-val.json")
        raw["adapters"][0]["data"].pop("validation_fraction")
        raw["adapters"][1]["data"] = {
            "hub": "someorg/antonyms", "train_split": "train", "eval_split": "test",
            "text_template": "Opposite: {input}\nAnswer: {output}", "response_field": "output",
        }

    configs = workflow_configs(_tiny_plan(tmp_path, monkeypatch, sources))
    tone = configs["finetune-tone.json"]
    assert [d["load_dataset_config"] for d in tone["data_configs"]] == [
        {"data_name": "json", "data_files": ["data/tone.json"], "split": "train", "field": "rows"},
        {"data_name": "json", "data_files": ["data/tone-val.json"], "split": "train", "field": "rows"},
    ]
    for name in ("finetune-tone.json", "finetune-antonyms.json"):
        olive_check(configs[name], tmp_path)


def _sealed_checkpoint(folder: Path, files: dict[str, str]) -> Path:
    """A checkpoint as the trainer saves it, sealed by olive_compat's CheckpointSeal callback."""
    from types import SimpleNamespace

    from phi_pipeline.orchestration.olive_compat import checkpoint_seal_class

    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    args = SimpleNamespace(output_dir=str(folder.parent))
    state = SimpleNamespace(is_world_process_zero=True, global_step=int(folder.name.rsplit("-", 1)[1]))
    checkpoint_seal_class()().on_save(args, state, None)
    return folder


def test_interrupted_fine_tune_keeps_sealed_checkpoints_of_its_own_key_only(tmp_path):
    from phi_pipeline.orchestration.training import TRAINING_KEY_FILE, prepare_finetune_dir

    out = tmp_path / "tone"
    _sealed_checkpoint(out / "trainer/checkpoint-2", {"trainer_state.json": "{}", "adapter_model.safetensors": "w2"})
    (out / "trainer/checkpoint-4").mkdir()  # killed while being written: not sealed yet
    (out / "trainer/checkpoint-4/trainer_state.json").write_text("{}")
    (out / "trainer/runs").mkdir()
    (out / "adapter").mkdir()
    (out / TRAINING_KEY_FILE).write_text("key-a")
    said = []
    assert prepare_finetune_dir(out, "key-a", said.append) == "checkpoint-2"
    assert sorted(p.name for p in (out / "trainer").iterdir()) == ["checkpoint-2", "runs"]
    assert said == ["not resuming from checkpoint-4: no seal (written before it was complete, or by an older phi-pipeline)"]
    assert not (out / "adapter").exists()
    assert prepare_finetune_dir(out, "key-b") is None
    assert [p.name for p in out.iterdir()] == [TRAINING_KEY_FILE] and (out / TRAINING_KEY_FILE).read_text() == "key-b"


def test_resume_drops_a_damaged_checkpoint_and_every_later_one(tmp_path):
    from phi_pipeline.orchestration.training import TRAINING_KEY_FILE, checkpoint_problem, prepare_finetune_dir

    out = tmp_path / "tone"
    files = {"trainer_state.json": "{}", "adapter_model.safetensors": "weights"}
    for step in (2, 4, 6):
        _sealed_checkpoint(out / f"trainer/checkpoint-{step}", files)
    (out / TRAINING_KEY_FILE).write_text("key-a")
    (out / "trainer/checkpoint-4/adapter_model.safetensors").write_text("weightS")  # a flipped byte
    assert checkpoint_problem(out / "trainer/checkpoint-4") == "adapter_model.safetensors: content differs from the seal"
    said = []
    assert prepare_finetune_dir(out, "key-a", said.append) == "checkpoint-2"
    assert said == ["not resuming from checkpoint-4: adapter_model.safetensors: content differs from the seal"]
    assert [p.name for p in (out / "trainer").iterdir()] == ["checkpoint-2"]
    (out / "trainer/checkpoint-2/extra.bin").write_text("x")
    assert checkpoint_problem(out / "trainer/checkpoint-2") == "its files differ from those sealed"
    assert prepare_finetune_dir(out, "key-a") is None and [p.name for p in out.iterdir()] == [TRAINING_KEY_FILE]
