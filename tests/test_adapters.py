"""PEFT -> .onnx_adapter conversion against a graph's LoRA inputs, and the fit check verify uses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from phi_pipeline.bundle.adapters import check_adapter_fits, peft_to_graph_weights, read_onnx_adapter, save_onnx_adapter

HIDDEN, Q, KV, INTER, R = 8, 8, 4, 12, 2


def graph_inputs(dtype=np.float32):
    inputs = {}
    for proj, out in (("q_proj", Q), ("k_proj", KV), ("v_proj", KV), ("o_proj", HIDDEN)):
        inputs[f"model.layers.0.attn.{proj}.lora_A.MatMul.weight"] = ((HIDDEN, "lora_r"), np.dtype(dtype))
        inputs[f"model.layers.0.attn.{proj}.lora_B.MatMul.weight"] = (("lora_r", out), np.dtype(dtype))
    for proj in ("gate_proj", "up_proj"):
        inputs[f"model.layers.0.mlp.{proj}.lora_A.MatMul.weight"] = ((HIDDEN, "lora_r"), np.dtype(dtype))
        inputs[f"model.layers.0.mlp.{proj}.lora_B.MatMul.weight"] = (("lora_r", INTER), np.dtype(dtype))
    return inputs


@pytest.fixture
def peft_adapter(tmp_path):
    rng = np.random.default_rng(0)
    p = "base_model.model.model.layers.0"
    weights = {
        f"{p}.self_attn.qkv_proj.lora_A.weight": rng.standard_normal((R, HIDDEN)).astype(np.float32),
        f"{p}.self_attn.qkv_proj.lora_B.weight": rng.standard_normal((Q + 2 * KV, R)).astype(np.float32),
        f"{p}.self_attn.o_proj.lora_A.weight": rng.standard_normal((R, HIDDEN)).astype(np.float32),
        f"{p}.self_attn.o_proj.lora_B.weight": rng.standard_normal((HIDDEN, R)).astype(np.float32),
        f"{p}.mlp.gate_up_proj.lora_A.weight": rng.standard_normal((R, HIDDEN)).astype(np.float32),
        f"{p}.mlp.gate_up_proj.lora_B.weight": rng.standard_normal((2 * INTER, R)).astype(np.float32),
    }
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": 8}))
    return tmp_path, weights


def test_fused_qkv_and_gate_up_are_split_transposed_and_b_scaled(peft_adapter):
    folder, w = peft_adapter
    out = peft_to_graph_weights(folder, graph_inputs())
    qkv_b = w["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"] * (8 / R)
    np.testing.assert_array_equal(out["model.layers.0.attn.q_proj.lora_B.MatMul.weight"], qkv_b[:Q].T)
    np.testing.assert_array_equal(out["model.layers.0.attn.k_proj.lora_B.MatMul.weight"], qkv_b[Q : Q + KV].T)
    np.testing.assert_array_equal(out["model.layers.0.attn.v_proj.lora_B.MatMul.weight"], qkv_b[Q + KV :].T)
    qkv_a = w["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"].T
    for proj in ("q_proj", "k_proj", "v_proj"):  # A is shared by the three projections
        np.testing.assert_array_equal(out[f"model.layers.0.attn.{proj}.lora_A.MatMul.weight"], qkv_a)
    gu_b = w["base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.weight"] * (8 / R)
    np.testing.assert_array_equal(out["model.layers.0.mlp.up_proj.lora_B.MatMul.weight"], gu_b[INTER:].T)
    assert set(out) == set(graph_inputs())


def test_weights_take_the_graph_input_dtype(peft_adapter):
    folder, _ = peft_adapter
    out = peft_to_graph_weights(folder, graph_inputs(np.float16))
    assert {w.dtype for w in out.values()} == {np.dtype(np.float16)}


def test_adapter_missing_a_graph_input_is_refused(peft_adapter):
    folder, _ = peft_adapter
    inputs = graph_inputs()
    inputs["model.layers.1.attn.q_proj.lora_A.MatMul.weight"] = ((HIDDEN, "lora_r"), np.dtype(np.float32))
    with pytest.raises(ValueError, match="does not match the model's LoRA layout"):
        peft_to_graph_weights(folder, inputs)


def test_onnx_adapter_round_trips(peft_adapter, tmp_path):
    folder, _ = peft_adapter
    weights = peft_to_graph_weights(folder, graph_inputs())
    save_onnx_adapter(weights, tmp_path / "a.onnx_adapter")
    back = read_onnx_adapter(tmp_path / "a.onnx_adapter")
    assert set(back) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(back[name], value)


def test_fit_check_names_wrong_names_shapes_and_dtypes(peft_adapter, tmp_path, monkeypatch):
    import phi_pipeline.bundle.adapters as adapters

    folder, _ = peft_adapter
    weights = peft_to_graph_weights(folder, graph_inputs())
    weights["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"] = np.zeros((2, 8), np.float32)
    weights["model.layers.0.attn.o_proj.lora_B.MatMul.weight"] = np.zeros((R, HIDDEN + 1), np.float32)
    weights["model.layers.0.attn.o_proj.lora_A.MatMul.weight"] = np.zeros((HIDDEN, R), np.float16)
    save_onnx_adapter(weights, tmp_path / "bad.onnx_adapter")
    monkeypatch.setattr(adapters, "graph_lora_inputs", lambda _: graph_inputs())
    problems = "\n".join(check_adapter_fits(tmp_path / "model.onnx", tmp_path / "bad.onnx_adapter"))
    assert "qkv_proj.lora_A.weight: not an input of the model" in problems
    assert "o_proj.lora_B.MatMul.weight: shape [2, 9], the model expects ['lora_r', 8]" in problems
    assert "o_proj.lora_A.MatMul.weight: dtype float16, the model expects float32" in problems


def _split_adapter(tmp_path, modules):
    """A PEFT adapter with LoRA on separate projections (Llama's layout) of layer 0; name -> (A, B) as PEFT stores them."""
    rng = np.random.default_rng(1)
    widths = {"q_proj": Q, "k_proj": KV, "v_proj": KV, "o_proj": HIDDEN, "gate_proj": INTER, "up_proj": INTER}
    weights = {}
    for proj in modules:
        block = "mlp" if proj in ("gate_proj", "up_proj") else "self_attn"
        p = f"base_model.model.model.layers.0.{block}.{proj}"
        weights[f"{p}.lora_A.weight"] = rng.standard_normal((R, HIDDEN)).astype(np.float32)
        weights[f"{p}.lora_B.weight"] = rng.standard_normal((widths[proj], R)).astype(np.float32)
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": 8}))
    return weights


def _packed_inputs():
    inputs = {k: v for k, v in graph_inputs().items() if ".o_proj." in k}
    f32 = np.dtype(np.float32)
    inputs["model.layers.0.attn.qkv_proj.lora_A.MatMul.weight"] = ((HIDDEN, "lora_r_x3"), f32)
    inputs["model.layers.0.attn.qkv_proj.lora_B.MatMul.weight"] = (("lora_r_x3", Q + 2 * KV), f32)
    inputs["model.layers.0.mlp.gate_up_proj.lora_A.MatMul.weight"] = ((HIDDEN, "lora_r_x2"), f32)
    inputs["model.layers.0.mlp.gate_up_proj.lora_B.MatMul.weight"] = (("lora_r_x2", 2 * INTER), f32)
    return inputs


def test_separate_projections_fill_a_packed_group_with_side_by_side_a_and_block_diagonal_b(tmp_path):
    peft = _split_adapter(tmp_path, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])
    out = peft_to_graph_weights(tmp_path, _packed_inputs())
    a, b = out["model.layers.0.attn.qkv_proj.lora_A.MatMul.weight"], out["model.layers.0.attn.qkv_proj.lora_B.MatMul.weight"]
    assert a.shape == (HIDDEN, 3 * R) and b.shape == (3 * R, Q + 2 * KV)
    x = np.random.default_rng(2).standard_normal((5, HIDDEN)).astype(np.float32)
    p = "base_model.model.model.layers.0.self_attn"
    expected = [x @ peft[f"{p}.{proj}.lora_A.weight"].T @ peft[f"{p}.{proj}.lora_B.weight"].T * (8 / R)
                for proj in ("q_proj", "k_proj", "v_proj")]
    np.testing.assert_allclose(x @ a @ b, np.concatenate(expected, axis=1), rtol=1e-5, atol=1e-5)
    assert not b[:R, Q:].any() and not b[R:, :Q].any()  # block-diagonal: q's rank feeds q's columns only
    assert out["model.layers.0.mlp.gate_up_proj.lora_B.MatMul.weight"].shape == (2 * R, 2 * INTER)


def test_separate_projections_missing_a_member_of_a_packed_group_are_refused(tmp_path):
    _split_adapter(tmp_path, ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])
    with pytest.raises(ValueError, match=r"layer 0 adapts \['q_proj', 'v_proj'\], the model packs"):
        peft_to_graph_weights(tmp_path, _packed_inputs())
