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
    import phi_pipeline.orchestration.runner

    tmp = tmp_path_factory.mktemp("packing")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CI", "1")
        mp.setattr(phi_pipeline.orchestration.runner, "run_olive", _olive_in_process)
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


def test_packing_leaves_a_graph_alone_when_its_adapters_miss_a_projection_of_each_group(exported, tmp_path):
    unpacked, _ = exported
    shutil.copytree(unpacked, tmp_path / "m")
    assert pack_lora_projections(tmp_path / "m", ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]) == 0
    assert graph_lora_inputs(tmp_path / "m" / MODEL_FILE) == graph_lora_inputs(unpacked / MODEL_FILE)


def test_bundle_keeps_the_exported_projections_when_pack_projections_is_off(tmp_path, monkeypatch):
    import yaml

    import phi_pipeline.orchestration.runner
    from phi_pipeline.bench import models

    def spec_without_packing(*args, **kwargs) -> str:
        spec = yaml.safe_load(bench_spec(*args, **kwargs))
        spec["export"]["pack_projections"] = False
        return yaml.safe_dump(spec)

    bench_spec = models.bench_spec
    monkeypatch.setenv("CI", "1")
    monkeypatch.setattr(phi_pipeline.orchestration.runner, "run_olive", _olive_in_process)
    monkeypatch.setattr(models, "bench_spec", spec_without_packing)
    base = build_bench_base(tmp_path / "base", SIZES["tiny"], _tokenizer(tmp_path / "tokenizer"))
    adapter = make_random_adapter(base, tmp_path / "adapter", r=4, seed=0, target_modules=PHI3_MODULES)
    bundle = export_bundle(base, {"a": adapter}, {"a": 4}, "int4", tmp_path / "export").bundle
    inputs = graph_lora_inputs(bundle / MODEL_FILE)
    assert any(".attn.q_proj.lora_A" in n for n in inputs) and not any("qkv_proj" in n for n in inputs)


SPLIT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _split_projection_base(out, family: str, tokenizer):
    """A tiny random Llama or Qwen2 (q/k/v biases), grouped-query attention, saved like a hub checkpoint."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    config = config_class(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = model_class(config)
    if family == "qwen2":  # transformers initialises biases to zero, which Model Builder leaves out
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported_split(tmp_path_factory, request):
    """A tiny random model whose LoRA sits on separate q/k/v and gate/up modules, exported int4 (unpacked,
    as Olive leaves it, with the adapter converted for it) and its published bundle (packed)."""
    import phi_pipeline.orchestration.runner

    tmp = tmp_path_factory.mktemp(f"packing-{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CI", "1")
        mp.setattr(phi_pipeline.orchestration.runner, "run_olive", _olive_in_process)
        base = _split_projection_base(tmp / "base", request.param, _tokenizer(tmp / "tokenizer"))
        adapter = make_random_adapter(base, tmp / "adapter", r=4, seed=0, target_modules=SPLIT_MODULES)
        bundle = export_bundle(base, {"a": adapter}, {"a": 4}, "int4", tmp / "export").bundle
    unpacked = tmp / "unpacked"
    export = next((tmp / "export" / "work" / "runs").glob("*/cpu/export"))
    shutil.copytree(export, unpacked)
    shutil.copytree(bundle, unpacked, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.onnx*", "adapters"))
    (unpacked / "adapters").mkdir()
    convert_adapter(adapter / "adapter", unpacked / MODEL_FILE, unpacked / "adapters" / "a.onnx_adapter")
    return unpacked, bundle, request.param


def _per_layer(model_onnx, op_type: str, lora: bool) -> int:
    import onnx

    graph = onnx.load(str(model_onnx), load_external_data=False).graph
    return sum(n.op_type == op_type and n.name.startswith("/model/layers.0/") and ("/lora_" in n.name) == lora for n in graph.node)


def test_split_projection_bundle_packs_qkv_and_gate_up_into_one_matmul_each(exported_split):
    unpacked, bundle, family = exported_split
    assert (_per_layer(unpacked / MODEL_FILE, "MatMulNBits", False), _per_layer(unpacked / MODEL_FILE, "MatMul", True)) == (7, 14)
    assert (_per_layer(bundle / MODEL_FILE, "MatMulNBits", False), _per_layer(bundle / MODEL_FILE, "MatMul", True)) == (4, 8)
    inputs = graph_lora_inputs(bundle / MODEL_FILE)
    assert inputs["model.layers.0.attn.qkv_proj.lora_A.MatMul.weight"][0] == (64, "lora_r_x3")
    assert inputs["model.layers.0.mlp.gate_up_proj.lora_B.MatMul.weight"][0] == ("lora_r_x2", 256)
    assert not any(".q_proj." in n or ".up_proj." in n for n in inputs)
    # Qwen2's q/k/v biases: one Add of the three, before the Split
    assert (_bias_adds(unpacked / MODEL_FILE), _bias_adds(bundle / MODEL_FILE)) == ((3, 1) if family == "qwen2" else (0, 0))


def _bias_adds(model_onnx) -> int:
    import onnx

    graph = onnx.load(str(model_onnx), load_external_data=False).graph
    return sum(n.op_type == "Add" and n.name.startswith("/model/layers.0/attn/") and not n.name.endswith("lora/Add") for n in graph.node)


@pytest.mark.parametrize("adapter", [None, "a"])
def test_split_projection_packed_graph_gives_the_logits_of_the_unpacked_one(exported_split, adapter):
    unpacked, bundle, _ = exported_split
    np.testing.assert_allclose(_logits(bundle, adapter), _logits(unpacked, adapter), rtol=0, atol=1e-4)


def test_split_projection_adapter_changes_the_logits(exported_split):
    """The comparison above is not vacuous: the converted adapter moves the packed graph's logits."""
    _, bundle, _ = exported_split
    assert np.abs(_logits(bundle, "a") - _logits(bundle, None)).max() > 1e-2


def test_batched_decoder_runs_a_packed_split_projection_bundle_as_genai_does(exported_split):
    """The serving engine's per-row LoRA on packed groups (rank axis 3r for q/k/v, 2r for gate/up, r elsewhere):
    rows with and without the adapter in one batch give the logits onnxruntime-genai gives each alone."""
    from phi_pipeline.runtime.batched import BatchedDecoder

    _, bundle, _ = exported_split
    decoder = BatchedDecoder(bundle, {"a": bundle / "adapters" / "a.onnx_adapter"}, max_batch=2, kv_len=32)
    for row, adapter in enumerate(("a", None)):
        first = decoder.prefill(PROMPT, 0, adapter, row)
        np.testing.assert_allclose(first, _logits(bundle, adapter).reshape(-1), atol=1e-4)
    decoder.decode([5, 5], [len(PROMPT)] * 2, ["a", None])  # one mixed step runs
