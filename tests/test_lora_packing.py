"""lora_packing: the packed multi-adapter graph computes what Model Builder's unpacked one does."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from phi_pipeline.bundle.adapters import convert_adapter, graph_lora_inputs
from phi_pipeline.bench.models import SIZES, build_bench_base, export_bundle, make_random_adapter
from phi_pipeline.bundle.layout import MODEL_FILE
from phi_pipeline.bundle.lora_packing import pack_lora_projections
from test_bench import PHI3_MODULES, _olive_in_process, _tokenizer

PROMPT = [5, 9, 2, 7, 3, 3, 8]


@pytest.fixture(scope="module", params=["int4", "fp32"])  # MatMulNBits and plain MatMul projections
def exported(tmp_path_factory, request):
    """A tiny random Phi-3 exported (unpacked, as Olive leaves it) and its published bundle (packed)."""
    import phi_pipeline.build.runner

    tmp = tmp_path_factory.mktemp("packing")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CI", "1")
        mp.setattr(phi_pipeline.build.runner, "run_olive", _olive_in_process)
        base = build_bench_base(tmp / "base", SIZES["tiny"], _tokenizer(tmp / "tokenizer"))
        adapter = make_random_adapter(base, tmp / "adapter", r=4, seed=0, target_modules=PHI3_MODULES)
        bundle = export_bundle(base, {"a": adapter}, {"a": 4}, request.param, tmp / "export").bundle
    unpacked = tmp / "unpacked"
    export = next((tmp / "export" / "work" / "runs").glob("*/cpu/export"))  # the Olive output the bundle was staged from
    shutil.copytree(export, unpacked)
    shutil.copytree(bundle, unpacked, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.onnx*", "adapters"))
    (unpacked / "adapters").mkdir()
    convert_adapter(adapter / "adapter", unpacked / MODEL_FILE, unpacked / "adapters" / "a.onnx_adapter")
    return unpacked, bundle


def _logits(bundle, adapter: str | None) -> np.ndarray:
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    adapters = og.Adapters(model)
    adapters.load(str(bundle / "adapters" / "a.onnx_adapter"), "a")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + 2, do_sample=False)
    generator = og.Generator(model, params)
    if adapter:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(PROMPT)
    return np.array(generator.get_logits())


def test_published_bundle_has_packed_projections_with_one_lora_input_pair_each(exported):
    unpacked, bundle = exported
    packed_inputs, split_inputs = graph_lora_inputs(bundle / MODEL_FILE), graph_lora_inputs(unpacked / MODEL_FILE)
    assert any(".attn.qkv_proj.lora_A" in n for n in packed_inputs) and any(".mlp.gate_up_proj.lora_B" in n for n in packed_inputs)
    assert not any(".q_proj." in n or ".gate_proj." in n for n in packed_inputs)
    layers = SIZES["tiny"].num_hidden_layers
    assert len(split_inputs) - len(packed_inputs) == layers * 2 * 3  # 7 -> 4 projections a layer, A and B each


@pytest.mark.parametrize("adapter", [None, "a"])
def test_packed_graph_gives_the_logits_of_the_unpacked_one(exported, adapter):
    unpacked, bundle = exported
    np.testing.assert_allclose(_logits(bundle, adapter), _logits(unpacked, adapter), rtol=0, atol=1e-4)


def test_packing_leaves_a_graph_alone_when_its_adapters_are_not_on_fused_modules(exported, tmp_path):
    unpacked, _ = exported
    shutil.copytree(unpacked, tmp_path / "m")
    assert pack_lora_projections(tmp_path / "m", ["q_proj", "k_proj", "v_proj", "o_proj"]) == 0
    assert graph_lora_inputs(tmp_path / "m" / MODEL_FILE) == graph_lora_inputs(unpacked / MODEL_FILE)


def test_bundle_keeps_the_exported_projections_when_pack_projections_is_off(tmp_path, monkeypatch):
    import yaml

    import phi_pipeline.build.runner
    from phi_pipeline.bench import models

    def spec_without_packing(*args, **kwargs) -> str:
        spec = yaml.safe_load(bench_spec(*args, **kwargs))
        spec["export"]["pack_projections"] = False
        return yaml.safe_dump(spec)

    bench_spec = models.bench_spec
    monkeypatch.setenv("CI", "1")
    monkeypatch.setattr(phi_pipeline.build.runner, "run_olive", _olive_in_process)
    monkeypatch.setattr(models, "bench_spec", spec_without_packing)
    base = build_bench_base(tmp_path / "base", SIZES["tiny"], _tokenizer(tmp_path / "tokenizer"))
    adapter = make_random_adapter(base, tmp_path / "adapter", r=4, seed=0, target_modules=PHI3_MODULES)
    bundle = export_bundle(base, {"a": adapter}, {"a": 4}, "int4", tmp_path / "export").bundle
    inputs = graph_lora_inputs(bundle / MODEL_FILE)
    assert any(".attn.q_proj.lora_A" in n for n in inputs) and not any("qkv_proj" in n for n in inputs)
