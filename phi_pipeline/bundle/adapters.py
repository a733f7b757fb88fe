"""LoRA adapters between PEFT and the exported graph.

- write_layout_adapter: a zero-initialised PEFT adapter with the pipeline's LoRA layout; the base
  is exported once with it, so the graph never depends on what any adapter learned.
- convert_adapter: a trained PEFT adapter -> `.onnx_adapter` that fits that graph. Olive has no
  pass for this: its `extract-adapters` command keeps PEFT's fused names (qkv_proj, gate_up_proj)
  plus a stray `base_model.model.` prefix, which Model Builder's split graph rejects with
  "Invalid input name" (Olive issues #2277, #1451). Here the graph's own LoRA inputs are the
  schema: every one must be filled, with its shape and dtype, and nothing else is written.
- check_adapter_fits: what `verify` uses to prove an adapter file matches the graph.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from phi_pipeline.pipeline_spec.plan import Plan

# Model Builder's input name for a LoRA weight: model.layers.{i}.{attn|mlp}.{proj}.lora_{A|B}.MatMul.weight
_GRAPH_NAME = re.compile(r"^model\.layers\.(\d+)\.(attn|mlp)\.(\w+)\.lora_([AB])\.MatMul\.weight$")
# PEFT's name: base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight
_PEFT_NAME = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# Fused PEFT modules and the Model Builder projections they are split into, in row order; also the
# groups lora_packing packs separate projections into.
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_MEMBER_OF = {proj: fused for fused, projs in FUSED_MODULES.items() for proj in projs}


def split_rank_dim(rank_dim: str, members: int) -> str:
    """The rank dimension of a group packed from `members` separately adapted projections (their
    ranks side by side), named after the members' own `rank_dim`."""
    return f"{rank_dim}_x{members}"


def lora_input_name(layer: int | str, block: str, proj: str, ab: str) -> str:
    """Model Builder's graph input for one LoRA weight (_GRAPH_NAME's format)."""
    return f"model.layers.{layer}.{block}.{proj}.lora_{ab}.MatMul.weight"


def write_layout_adapter(plan: "Plan") -> Path:
    """A PEFT adapter with every LoRA weight zero, for the pipeline's target modules."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = plan.spec.base_model.trust_remote_code
    config = AutoConfig.from_pretrained(plan.base_model, trust_remote_code=trust)
    with torch.device("meta"):  # shapes only: no weights are read or allocated
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    lora = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=list(plan.lora_layout), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    state = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in get_peft_model_state_dict(peft_model).items()}
    out = plan.paths.lora_layout_dir
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "adapter_model.safetensors"))
    cfg = lora.to_dict()
    cfg["base_model_name_or_path"] = plan.base_model
    cfg["target_modules"] = sorted(cfg["target_modules"])
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=list))
    return out


def graph_lora_inputs(model_onnx: Path) -> dict[str, tuple[tuple[Any, ...], np.dtype]]:
    """LoRA inputs of an exported graph: name -> (shape with symbolic dims as str, numpy dtype)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(model_onnx), load_external_data=False)
    out = {}
    for inp in model.graph.input:
        if _GRAPH_NAME.match(inp.name):
            tt = inp.type.tensor_type
            dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim)
            out[inp.name] = (dims, np.dtype(tensor_dtype_to_np_dtype(tt.elem_type)))
    return out


def _peft_scale(adapter_config: dict[str, Any]) -> float:
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    return alpha / (r**0.5 if adapter_config.get("use_rslora") else r)


def peft_to_graph_weights(adapter_dir: Path, inputs: dict[str, tuple[tuple[Any, ...], np.dtype]]) -> dict[str, np.ndarray]:
    """Map a PEFT adapter onto the graph's LoRA inputs (transposed, B scaled by alpha/r): a fused module's
    rows split over its projections, or kept whole for a packed input; separate projections of a packed
    group (lora_packing) joined: A side by side along the rank axis, B block-diagonal."""
    from safetensors.numpy import load_file

    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter_dir}: only LoRA adapters can be converted (found {adapter_config['peft_type']})")
    scale = np.float32(_peft_scale(adapter_config))
    out: dict[str, np.ndarray] = {}
    members: dict[tuple[str, str, str], dict[str, dict[str, np.ndarray]]] = {}  # packed group -> A/B -> projection -> weight
    for key, value in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        m = _PEFT_NAME.match(key)
        if m is None:
            raise ValueError(f"{adapter_dir}: unexpected weight {key!r}; only LoRA on decoder layers is supported")
        layer, block, module, ab = m.groups()
        block = "attn" if block == "self_attn" else block
        value = value.astype(np.float32)
        group = _MEMBER_OF.get(module)
        if group and lora_input_name(layer, block, module, ab) not in inputs and lora_input_name(layer, block, group, ab) in inputs:
            members.setdefault((layer, block, group), {}).setdefault(ab, {})[module] = value.T if ab == "A" else (value * scale).T
            continue
        # a fused module is one input of a packed graph (lora_packing), or split into its projections
        packed = lora_input_name(layer, block, module, ab) in inputs
        parts = (module,) if packed else FUSED_MODULES.get(module, (module,))
        names = [lora_input_name(layer, block, p, ab) for p in parts]
        if ab == "A":  # the A matrix is shared by the projections of a fused module
            for name in names:
                out[name] = value.T
            continue
        value = value * scale
        sizes = []
        for name in names:
            if name not in inputs:
                raise ValueError(f"{adapter_dir}: {key} maps to {name}, which is not an input of the model")
            sizes.append(inputs[name][0][-1])
        if sum(sizes) != value.shape[0]:
            raise ValueError(f"{adapter_dir}: {key} has {value.shape[0]} rows, the graph expects {sizes} (sum)")
        for name, chunk in zip(names, np.split(value, np.cumsum(sizes)[:-1], axis=0)):
            out[name] = chunk.T
    for (layer, block, group), weights in members.items():
        a, b = weights.get("A", {}), weights.get("B", {})
        projs = FUSED_MODULES[group]
        if set(a) != set(projs) or set(b) != set(projs):
            raise ValueError(f"{adapter_dir}: layer {layer} adapts {sorted(set(a) | set(b))}, the model packs {list(projs)}")
        out[lora_input_name(layer, block, group, "A")] = np.concatenate([a[p] for p in projs], axis=1)
        blocks = np.zeros((sum(b[p].shape[0] for p in projs), sum(b[p].shape[1] for p in projs)), np.float32)
        row = col = 0
        for p in projs:
            r, n = b[p].shape
            blocks[row : row + r, col : col + n] = b[p]
            row, col = row + r, col + n
        out[lora_input_name(layer, block, group, "B")] = blocks
    missing = sorted(set(inputs) - set(out))
    extra = sorted(set(out) - set(inputs))
    if missing or extra:
        raise ValueError(
            f"{adapter_dir}: adapter does not match the model's LoRA layout "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]})"
        )
    return {name: np.ascontiguousarray(w.astype(inputs[name][1])) for name, w in out.items()}


def save_onnx_adapter(weights: dict[str, np.ndarray], path: Path) -> None:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in sorted(weights.items())})
    fmt.export_adapter(str(path))


def read_onnx_adapter(path: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))  # OrtValue.numpy() views memory this object owns
    return {k: v.numpy().copy() for k, v in fmt.get_parameters().items()}


def convert_adapter(adapter_dir: Path, model_onnx: Path, out: Path) -> None:
    save_onnx_adapter(peft_to_graph_weights(adapter_dir, graph_lora_inputs(model_onnx)), out)


def check_adapter_fits(model_onnx: Path, adapter_file: Path) -> list[str]:
    """Problems that would make the runtime reject the adapter with this graph; [] if it fits."""
    inputs = graph_lora_inputs(model_onnx)
    try:
        weights = read_onnx_adapter(adapter_file)
    except Exception as exc:  # onnxruntime raises its own error types for unreadable files
        return [f"not a readable .onnx_adapter ({exc})"]
    problems = []
    for name in sorted(set(weights) - set(inputs)):
        problems.append(f"{name}: not an input of the model (Invalid input name at run time)")
    for name in sorted(set(inputs) - set(weights)):
        problems.append(f"{name}: model input with no weight in the adapter")
    ranks: dict[Any, set[int]] = {}  # the graph's rank dimension -> the adapter's ranks on it
    for name in sorted(set(weights) & set(inputs)):
        shape, dtype = inputs[name]
        w = weights[name]
        if w.dtype != dtype:
            problems.append(f"{name}: dtype {w.dtype}, the model expects {dtype}")
        if len(w.shape) != len(shape) or any(
            isinstance(d, int) and d > 0 and d != s for d, s in zip(shape, w.shape)
        ):
            problems.append(f"{name}: shape {list(w.shape)}, the model expects {list(shape)}")
        axis = -1 if "lora_A" in name else 0
        ranks.setdefault(shape[axis], set()).add(w.shape[axis])
    for dim, found in ranks.items():
        if len(found) > 1:
            problems.append(f"LoRA rank differs between weights: {sorted(found)} on the graph's dimension {dim!r}")
    return problems
