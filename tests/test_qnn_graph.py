"""qnn_graph.widen_first_window: Olive's QNN prompt graph made valid for onnxruntime 1.31's CPU
GroupQueryAttention, checked on a graph of that node alone (no QNN needed)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from phi_pipeline.bundle import qnn_graph

HEADS, HEAD, WINDOW, CACHE = 2, 8, 8, 16


def _attention_graph(path, window: int) -> None:
    """A prompt graph's attention as Olive's StaticLLM leaves it: a fixed window of new tokens, a static KV
    cache, seqlens_k (past_seq_len) and total_seq_len inputs."""
    hidden = HEADS * HEAD
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, [1, window, hidden]) for n in ("q", "k", "v")]
    inputs += [helper.make_tensor_value_info(n, f, [1, HEADS, "past", HEAD]) for n in ("past_key", "past_value")]
    inputs += [helper.make_tensor_value_info("past_seq_len", TensorProto.INT32, [1, 1]),
               helper.make_tensor_value_info("total_seq_len", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("out", f, [1, window, hidden]),
               helper.make_tensor_value_info("present_key", f, [1, HEADS, "past", HEAD]),
               helper.make_tensor_value_info("present_value", f, [1, HEADS, "past", HEAD])]
    seqlens = helper.make_node("Reshape", ["past_seq_len", "flat"], ["seqlens_k"])
    gqa = helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total_seq_len"],
                           ["out", "present_key", "present_value"], domain="com.microsoft", num_heads=HEADS, kv_num_heads=HEADS)
    flat = helper.make_tensor("flat", TensorProto.INT64, [1], [-1])
    graph = helper.make_graph([seqlens, gqa], "attention", inputs, outputs, initializer=[flat])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, path)


def _variant(tmp_path, window: int = WINDOW):
    tmp_path.mkdir(parents=True, exist_ok=True)
    _attention_graph(tmp_path / "context_ctx.onnx", window)
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {
        "sliding_window": {"window_size": window, "pad_value": 0, "alignment": "left"},
        "pipeline": [{"context_ctx": {"filename": "context_ctx.onnx", "run_on_token_gen": False},
                      "iterator_ctx": {"filename": "iterator_ctx.onnx", "run_on_prompt": False}}]}}}))
    return tmp_path


def _run(path, n: int, seed: int = 0):
    """A prompt of n tokens right-padded to the graph's window, from an empty cache."""
    sess = ort.InferenceSession(str(path))
    window = sess.get_inputs()[0].shape[1]
    rng = np.random.default_rng(seed)
    qkv = {x: np.zeros((1, window, HEADS * HEAD), np.float32) for x in "qkv"}
    for x in "qkv":
        qkv[x][0, :n] = rng.standard_normal((n, HEADS * HEAD))
    cache = {c: np.zeros((1, HEADS, CACHE, HEAD), np.float32) for c in ("past_key", "past_value")}
    out = sess.run(None, qkv | cache | {"past_seq_len": np.array([[n - 1]], np.int32), "total_seq_len": np.array(n, np.int32)})
    return out[0][0, :n], out[1][0, :, :n]


def test_unpatched_prompt_graph_is_refused_for_a_prompt_shorter_than_its_window(tmp_path):
    variant = _variant(tmp_path)
    with pytest.raises(Exception, match="total_sequence_length must be at least"):
        _run(variant / "context_ctx.onnx", 3)


def test_widened_window_attends_like_the_unpadded_prompt(tmp_path):
    variant = _variant(tmp_path / "padded")
    assert qnn_graph.widen_first_window(variant) == [variant / "context_ctx.onnx"]
    exact = _variant(tmp_path / "exact", window=3)  # the same 3 tokens with no padding: the reference
    out, keys = _run(variant / "context_ctx.onnx", 3)
    ref_out, ref_keys = _run(exact / "context_ctx.onnx", 3)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(keys, ref_keys, rtol=1e-5, atol=1e-6)


def test_widening_is_idempotent_and_skips_the_iterator(tmp_path):
    variant = _variant(tmp_path)
    assert qnn_graph.widen_first_window(variant) == [variant / "context_ctx.onnx"]
    assert qnn_graph.widen_first_window(variant) == []
    graph = onnx.load(variant / "context_ctx.onnx").graph
    assert [n.op_type for n in graph.node][:2] == ["Constant", "Max"]
    assert next(n for n in graph.node if n.op_type == "GroupQueryAttention").input[6] == qnn_graph.FIXED_NAME
