"""The web graph and the page manifest: what a bundle carries for onnxruntime-web (phi_pipeline/web).

onnxruntime-web lists in `session.inputNames` only the inputs without a default and refuses feeds outside
that list, so the LoRA inputs as the bundle exports them for onnxruntime-genai (rank-0 defaults: no
adapter) cannot be fed from a page. The web graph is model.onnx with those defaults removed, every LoRA
input required (the page feeds zeros for the base model). It is the graph proto alone, a few hundred KB:
its weights stay in model.onnx.data, which it names exactly as model.onnx does, so the page loads the one
copy of the weights that onnxruntime-genai loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phi_pipeline.bundle.adapters import graph_lora_inputs
from phi_pipeline.bundle.layout import MODEL_FILE, WEB_GRAPH, WEB_MANIFEST

WEB_FORMAT = "phi-pipeline-web/1"


def stage_web(folder: Path) -> dict[str, Any]:
    """Write the web graph and web.json next to `folder`'s model.onnx; the page manifest written."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    lora = graph_lora_inputs(folder / MODEL_FILE)
    if not lora:
        raise ValueError(f"{folder / MODEL_FILE} has no LoRA inputs: a web page would have no adapter to switch")
    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    for init in [i for i in model.graph.initializer if i.name in lora]:
        model.graph.initializer.remove(init)
    external = sorted({
        entry.value
        for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data if entry.key == "location"
    })
    past = next(i for i in model.graph.input if i.name.startswith("past_key_values."))
    onnx.save(model, str(folder / WEB_GRAPH))
    manifest = {
        "format": WEB_FORMAT,
        "graph": WEB_GRAPH,
        "external_data": external,
        "kv_dtype": str(tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type)),
        # symbolic dims (the rank) as their names: the page fills them from the adapter, 1 for the base model
        "lora_inputs": {name: {"shape": list(shape), "dtype": str(dtype)} for name, (shape, dtype) in sorted(lora.items())},
    }
    (folder / WEB_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_web_manifest(bundle: Path) -> dict[str, Any] | None:
    """The bundle's page manifest, None when it has none (targets without `web_page`, older bundles)."""
    path = bundle / WEB_MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
