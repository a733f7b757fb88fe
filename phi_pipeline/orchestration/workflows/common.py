"""Pieces every workflow shares: systems (accelerators), the input model, data configs, engine keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi_pipeline.pipeline_spec.plan import AdapterPlan
from phi_pipeline.pipeline_spec.targets import Target, TrainingDevice

# Olive's (device, execution provider) for each training device.
_TRAINING_ACCELERATORS: dict[TrainingDevice, tuple[str, str]] = {
    "cpu": ("cpu", "CPUExecutionProvider"),
    "cuda": ("gpu", "CUDAExecutionProvider"),
}


def system(device: str, execution_provider: str) -> dict[str, Any]:
    """A LocalSystem with one accelerator."""
    return {"type": "LocalSystem", "accelerators": [{"device": device, "execution_providers": [execution_provider]}]}


def target_system(target: Target) -> dict[str, Any]:
    """The LocalSystem whose accelerator is the deployment target's: passes build for it."""
    return system(target.device, target.execution_provider)


def training_system(device: TrainingDevice) -> dict[str, Any]:
    return system(*_TRAINING_ACCELERATORS[device])


def python_environment(venv: str, target: Target) -> dict[str, Any]:
    """Another virtual environment (relative to the project root) that Olive runs passes in, by subprocess."""
    return {
        "type": "PythonEnvironment",
        "python_environment_path": f"{venv}/bin",
        "accelerators": [{"device": target.device, "execution_providers": [target.execution_provider]}],
    }


def hf_model(name_or_path: str, *, trust_remote_code: bool, adapter_path: Path | None = None) -> dict[str, Any]:
    # Weights are only ever read from safetensors: a pickled checkpoint can run code when unpickled.
    config: dict[str, Any] = {"type": "HfModel", "model_path": name_or_path, "load_kwargs": {"use_safetensors": True}}
    if trust_remote_code:
        config["load_kwargs"]["trust_remote_code"] = True
    if adapter_path is not None:
        config["adapter_path"] = adapter_path.as_posix()
    return config


def data_config(
    name: str, adapter: AdapterPlan, load: dict[str, Any], *, batch_size: int, max_samples: int | None = None
) -> dict[str, Any]:
    """One split of an adapter's data as Olive's HuggingfaceContainer (`load`: its load_dataset_config, from
    the plan), one example per sequence."""
    data = adapter.spec.data
    pre: dict[str, Any] = {
        "max_seq_len": adapter.spec.training.max_seq_len,
        # Olive's default packs examples together ("join"); each example is its own sequence here,
        # so the model learns where an answer ends (and calibration sees what the model will see).
        "strategy": "line-by-line",
        "pad_to_max_len": False,
    }
    if max_samples is not None:
        pre["max_samples"] = max_samples
    if data.messages_field:
        pre.update({"chat_template": True, "message_col": data.messages_field})
    else:
        pre.update({"text_template": data.text_template, "add_special_tokens": True})
    return {
        "name": name,
        "type": "HuggingfaceContainer",
        "load_dataset_config": dict(load),
        "pre_process_data_config": pre,
        "dataloader_config": {"batch_size": batch_size},
    }


def engine(output_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Engine keys shared by every workflow.

    clean_cache: Olive's cache keys on data paths, not contents; phi-pipeline caches by content
    itself (cache.py), so Olive's cache is started clean on every run rather than trusted.
    """
    return {
        "output_dir": output_dir.as_posix(),
        "cache_dir": cache_dir.as_posix(),
        "clean_cache": True,
        "log_severity_level": 1,
        "no_artifacts": True,
    }
