"""Pieces every workflow shares: the system (accelerator) block, the input model, engine keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def system(device: str, execution_provider: str) -> dict[str, Any]:
    """A LocalSystem with one accelerator."""
    return {"type": "LocalSystem", "accelerators": [{"device": device, "execution_providers": [execution_provider]}]}


def hf_model(name_or_path: str, *, trust_remote_code: bool, adapter_path: Path | None = None) -> dict[str, Any]:
    # Weights are only ever read from safetensors: a pickled checkpoint can run code when unpickled.
    config: dict[str, Any] = {"type": "HfModel", "model_path": name_or_path, "load_kwargs": {"use_safetensors": True}}
    if trust_remote_code:
        config["load_kwargs"]["trust_remote_code"] = True
    if adapter_path is not None:
        config["adapter_path"] = adapter_path.as_posix()
    return config


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
