"""A fix to Olive 0.13's QNN context graphs for onnxruntime >= 1.31's GroupQueryAttention (GitHub issue 17).

Olive's StaticLLM pass gives the prompt graph (`context_ctx.onnx`) a fixed window of W token slots; a prompt
of n < W tokens fills the first n (right padding) and the runtime feeds `total_seq_len` = n. The four
GroupQueryAttention nodes that stay on the CPU EP beside the HTP context binaries then see more new tokens
(W) than the total, which onnxruntime 1.31's CPU kernel refuses ("total_sequence_length must be at least
kv_sequence_length for a non-sliding cache"). Feeding them max(total_seq_len, W) makes the window a first
prompt of W tokens whose valid length per sequence is `past_seq_len` + 1 (GroupQueryAttention's seqlens_k):
the kernel's own right-padding case, so the n real tokens attend exactly as before and the padded slots'
keys are overwritten by the next tokens. Where total_seq_len >= W the Max changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

TOTAL_INPUT = 6  # GroupQueryAttention's input index of total_sequence_length
WINDOW_NAME = "phi_pipeline_window_length"
FIXED_NAME = "phi_pipeline_total_seq_len_at_least_window"


def is_prompt_graph(component: dict[str, Any]) -> bool:
    """A genai_config.json pipeline component that runs on the prompt only (StaticLLM's context graph)."""
    return component.get("run_on_token_gen") is False


def prompt_graphs(folder: Path) -> tuple[int, list[Path]]:
    """(the window W, the prompt graphs) of a QNN variant folder, from its genai_config.json: the
    pipeline components that do not run on token generation."""
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    window = int(decoder.get("sliding_window", {}).get("window_size", 0))
    graphs = [folder / c["filename"] for stage in decoder.get("pipeline", []) for c in stage.values()
              if is_prompt_graph(c)]
    return window, graphs


def widen_first_window(folder: Path) -> list[Path]:
    """Rewire the prompt graphs' GroupQueryAttention nodes to max(total_seq_len, W) in place; the graphs
    changed (none when already rewired or when the variant has no window)."""
    window, graphs = prompt_graphs(folder)
    return [g for g in graphs if window > 1 and _rewire(g, window)]


def _rewire(model_path: Path, window: int) -> bool:
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    if any(node.output and node.output[0] == FIXED_NAME for node in graph.node):
        return False
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention" and len(n.input) > TOTAL_INPUT]
    total = {n.input[TOTAL_INPUT] for n in attention}
    if len(total) != 1:
        raise ValueError(f"{model_path}: expected GroupQueryAttention nodes reading one total length, found {sorted(total)}")
    nodes = [
        helper.make_node("Constant", [], [WINDOW_NAME], value=helper.make_tensor("window", TensorProto.INT32, [], [window])),
        helper.make_node("Max", [total.pop(), WINDOW_NAME], [FIXED_NAME]),
    ]
    for n in attention:
        n.input[TOTAL_INPUT] = FIXED_NAME
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)
    onnx.save(model, str(model_path))
    return True
