"""Teacher-forced logits of every position in one run, for bundles whose graph computes the LM head at the last
position only (Model Builder's `prune_lm_head`, which speeds up a prompt's first token).

The evaluation scores reference answers and PyTorch's greedy continuations token by token. On a pruned graph
onnxruntime-genai gives one position's logits per model run, so an answer of n tokens took n runs (extraction
answers: about 24). This runs the same graph with the prune undone (`Gather(axis=1, index=-1)` and its
`Unsqueeze` before the LM head bypassed, in memory; the bundle on disk is unchanged) on plain onnxruntime, an
adapter's LoRA weights fed as onnxruntime-genai feeds them: one run per sequence. Every other node, weight and
kernel is the bundle's; rows can differ from the one-position runs in the last float bits (MLAS's M == 1 paths).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from phi_pipeline.bundle.layout import MODEL_FILE
from phi_pipeline.runtime.batched import read_adapter

PRUNE_PREFIX = "/lm_head/prune/"


def unpruned_graph(model_dir: Path) -> bytes:
    """`model_dir`'s graph with the LM head's prune nodes bypassed and `logits` over every position, serialized
    (its weights stay in the folder's external data). ValueError when the graph has no such prune."""
    import onnx

    model = onnx.load(str(model_dir / MODEL_FILE), load_external_data=False)
    graph = model.graph
    prune = [n for n in graph.node if n.name.startswith(PRUNE_PREFIX)]
    gather = next((n for n in prune if n.op_type == "Gather"), None)
    if gather is None:
        raise ValueError(f"{model_dir / MODEL_FILE}: no {PRUNE_PREFIX}Gather node; its LM head is not pruned")
    hidden, pruned = gather.input[0], {o for n in prune for o in n.output}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in pruned:
                node.input[i] = hidden
    for node in prune:
        graph.node.remove(node)
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].ClearField("dim_value")
    logits.type.tensor_type.shape.dim[1].dim_param = "sequence_length"
    return model.SerializeToString()


class FullLogits:
    """The unpruned graph in one onnxruntime session; adapters by name, read from their .onnx_adapter files."""

    def __init__(self, model_dir: Path, adapter_files: dict[str, Path], threads: int | None = None):
        import onnxruntime

        self.model_dir = Path(model_dir)
        decoder = json.loads((self.model_dir / "genai_config.json").read_text())["model"]["decoder"]
        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str((self.model_dir / MODEL_FILE).resolve().parent))
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # not a warning per LoRA input with a default (overridable, as genai feeds them)
        self.session = onnxruntime.InferenceSession(unpruned_graph(self.model_dir), options,
                                                    providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        past = [n for n in inputs if n.startswith("past_key_values")]
        dtype = np.float16 if past and "float16" in inputs[past[0]].type else np.float32
        self._empty = {n: np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype) for n in past}
        self._positions = "position_ids" in inputs  # graphs without GroupQueryAttention (dml) take them
        self._files = adapter_files
        self._weights: dict[str, dict[str, np.ndarray]] = {}

    def _lora(self, adapter: str | None) -> dict[str, np.ndarray]:
        """The adapter's LoRA inputs (none for the base model: the graph's defaults, rank 0, apply)."""
        if adapter is None:
            return {}
        if adapter not in self._weights:
            self._weights[adapter] = read_adapter(adapter, self._files[adapter]).weights
        return self._weights[adapter]

    def __call__(self, ids: Sequence[int], adapter: str | None, first: int = 0) -> np.ndarray:
        """(len(ids) - first, vocab) logits at positions first.. of `ids` (GenaiModel.logits)."""
        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
                **self._empty, **self._lora(adapter)}
        if self._positions:
            feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
        return self.session.run(["logits"], feed)[0][0, first:].astype(np.float32)
