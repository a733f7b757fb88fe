"""Installed versions of the packages that shape a result, read from metadata (nothing imported)."""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata

PACKAGES = (
    "olive-ai",
    "onnxruntime",
    "onnxruntime-genai",
    # the cuda extra's builds of the two above, and what the qlora and qnn extras add
    "onnxruntime-gpu",
    "onnxruntime-genai-cuda",
    "bitsandbytes",
    "onnxruntime-qnn",
    "onnx",
    "torch",
    "transformers",
    "tokenizers",
    "peft",
    "datasets",
    "accelerate",
)


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
