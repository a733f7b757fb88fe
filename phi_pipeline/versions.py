"""Installed versions of the packages that shape a result, read from metadata (nothing imported)."""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata

TRAINING_PACKAGES = (
    "olive-ai",
    "torch",
    "transformers",
    "tokenizers",
    "peft",
    "datasets",
    "accelerate",
    "safetensors",
    "numpy",
    "bitsandbytes",  # the qlora extra
)
"""What a fine-tune's result depends on: its cache key names these only, so every target's venv (whatever
onnxruntime build it carries) reuses the adapters another venv trained from the same inputs."""

RUNTIME_PACKAGES = (
    "onnxruntime",
    "onnxruntime-genai",
    # the cuda extra's builds of the two above, and what the qnn extra adds
    "onnxruntime-gpu",
    "onnxruntime-genai-cuda",
    "onnxruntime-qnn",
    "onnx",
)

PACKAGES = TRAINING_PACKAGES + RUNTIME_PACKAGES


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Every package that shapes an export or a bundle (the manifest records these)."""
    return _versions(PACKAGES)


@lru_cache(maxsize=1)
def training_versions() -> dict[str, str]:
    """The packages that shape a fine-tune (its cache key)."""
    return _versions(TRAINING_PACKAGES)
