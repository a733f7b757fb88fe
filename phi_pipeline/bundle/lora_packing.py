"""Pack the projections Model Builder unpacks for LoRA back into one MatMul, LoRA included.

Why: Model Builder (onnxruntime-genai 0.18) builds a LoRA graph with q/k/v and gate/up as separate
MatMuls ("Packed MatMul with LoRA/QLoRA is not currently supported"), each with its own three
LoRA nodes (MatMul A, MatMul B, Add). At batch 1 a decode step is then dominated by dispatching
tiny ops: 21 LoRA nodes and 7 MatMuls per layer, paid even when no adapter is active (bench:
LoRA nodes take half the CUDA kernel time of a Phi-3-mini step with no adapter).

A group (q/k/v -> `qkv_proj`, gate/up -> `gate_up_proj`) packed is one MatMul (the members' weights
concatenated along their output columns), one LoRA branch and one Split whose outputs keep the old
Add outputs' names, so nothing downstream changes (a bias Add after a projection, as Qwen2's q/k/v
have, reads the Split's output as it read the old Add's): 14 LoRA-side nodes and 4 MatMuls per layer.
Graph inputs become `...qkv_proj.lora_{A,B}.MatMul.weight` and `...gate_up_proj...`. Two kinds:

- shared A (Phi-3: PEFT's LoRA sits on the fused qkv_proj / gate_up_proj, one A for the group):
  `y = x W + (x A) B` with B concatenated along its columns; `adapters.convert_adapter` fills the
  inputs from PEFT's fused weights as they are. Rank dimension: `lora_r`.
- split (Llama, Mistral, Qwen2: LoRA on q_proj, k_proj, v_proj ... as separate modules): A is the
  members' A matrices concatenated along the rank axis and B is block-diagonal, so
  `(x [A_q A_k A_v]) diag(B_q, B_k, B_v) = [x A_q B_q, x A_k B_k, x A_v B_v]` exactly. Rank
  dimension: `lora_r_x3` / `lora_r_x2` (the members' ranks summed). The B side reads k times the
  bytes of the members' B matrices (the zero blocks): small next to the int4 base at LoRA ranks.

Only groups that match the expected shape are packed (same input, same MatMul kind and attributes,
LoRA on every member, each LoRA Add reading its projection's MatMul); anything else is left as exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phi_pipeline.bundle.adapters import FUSED_MODULES, lora_input_name, split_rank_dim
from phi_pipeline.bundle.layout import MODEL_FILE

BLOCKS = {"qkv_proj": "attn", "gate_up_proj": "mlp"}  # the graph's block of each fused module
DATA_FILE = f"{MODEL_FILE}.data"  # as Model Builder names it (workflows/export.py)


@dataclass
class _Member:
    base: object  # onnx.NodeProto: MatMulNBits or MatMul
    lora_a: object
    lora_b: object
    add: object
    a_input: str
    b_input: str
    columns: int
    bias: object | None  # the projection's bias Add after its LoRA Add (Qwen2's q/k/v), if any


def _node_name(layer: int, block: str, proj: str, suffix: str) -> str:
    return f"/model/layers.{layer}/{block}/{proj}/{suffix}"


def packable_groups(target_modules: list[str]) -> dict[tuple[str, str], bool]:
    """(block, packed module) -> whether the group's projections share one LoRA A (PEFT's fused module
    is a target) or each has its own (every projection is a target); groups with neither are left out."""
    groups = {}
    for fused, projs in FUSED_MODULES.items():
        if fused in target_modules:
            groups[(BLOCKS[fused], fused)] = True
        elif all(p in target_modules for p in projs):
            groups[(BLOCKS[fused], fused)] = False
    return groups


def pack_lora_projections(model_dir: Path, target_modules: list[str]) -> int:
    """Rewrite model_dir/model.onnx (+ .data) in place, packing the projections of each group the
    adapters' LoRA `target_modules` cover (packable_groups); the number of groups packed."""
    import onnx
    from onnx import helper, numpy_helper

    groups = packable_groups(target_modules)
    if not groups:
        return 0

    path = model_dir / MODEL_FILE
    model = onnx.load(str(path))  # external data too: packed weights are new tensors
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    producers = {out: n for n in graph.node for out in n.output}
    inits = {i.name: i for i in graph.initializer}
    inputs = {i.name: i for i in graph.input}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    layers = sorted({int(n.split("/")[2].split(".")[1]) for n in nodes if n.startswith("/model/layers.")})

    packed = 0
    drop_nodes: set[str] = set()
    drop_inits: set[str] = set()
    drop_inputs: set[str] = set()
    new_nodes: dict[str, list] = {}  # name of the first replaced node -> nodes to put there
    new_inputs = []
    for layer in layers:
        for (block, fused), shared_a in groups.items():
            projs = FUSED_MODULES[fused]
            members = []
            for proj in projs:
                add = nodes.get(_node_name(layer, block, proj, "lora/Add"))
                lora_a = nodes.get(_node_name(layer, block, proj, "lora_A/MatMul"))
                lora_b = nodes.get(_node_name(layer, block, proj, "lora_B/MatMul"))
                base = producers.get(f"/model/layers.{layer}/{block}/{proj}/MatMul/output_0")
                if None in (add, lora_a, lora_b, base):
                    break
                a_input, b_input = lora_input_name(layer, block, proj, "A"), lora_input_name(layer, block, proj, "B")
                if a_input not in inputs or b_input not in inputs:
                    break
                columns = inputs[b_input].type.tensor_type.shape.dim[1].dim_value
                bias = nodes.get(_node_name(layer, block, proj, "Add"))
                if bias is None or consumers.get(add.output[0]) != [bias] or bias.input[1] not in inits:
                    bias = None
                members.append(_Member(base, lora_a, lora_b, add, a_input, b_input, columns, bias))
            if len(members) != len(projs) or not _packable(members, inits):
                continue
            first = members[0]
            total = sum(m.columns for m in members)  # the packed output width
            prefix = f"/model/layers.{layer}/{block}/{fused}"
            weight_names = _pack_weights(members, inits, graph, f"model.layers.{layer}.{block}.{fused}")
            a_name, b_name = lora_input_name(layer, block, fused, "A"), lora_input_name(layer, block, fused, "B")
            a_info, b_info = inputs[first.a_input], inputs[first.b_input]
            rank_dim = a_info.type.tensor_type.shape.dim[1]
            rank = rank_dim.dim_param or rank_dim.dim_value
            if not shared_a:  # the members' ranks side by side
                rank = split_rank_dim(rank, len(members)) if rank_dim.dim_param else rank * len(members)
            new_inputs += [
                helper.make_tensor_value_info(a_name, a_info.type.tensor_type.elem_type, [_dim(a_info, 0), rank]),
                helper.make_tensor_value_info(b_name, b_info.type.tensor_type.elem_type, [rank, total]),
            ]
            # rank-0 defaults, as Olive's ExtractAdapters leaves them: the graph runs with no adapter fed
            for name, info, shape in ((a_name, a_info, (_dim(a_info, 0), 0)),
                                      (b_name, b_info, (0, total))):
                dtype = helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
                graph.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype), name))
            x = first.base.input[0]
            base = helper.make_node(first.base.op_type, [x, *weight_names], [f"{prefix}/MatMul/output_0"],
                                    name=f"{prefix}/MatMul", domain=first.base.domain)
            base.attribute.extend(a for a in first.base.attribute if a.name != "N")
            if first.base.op_type == "MatMulNBits":
                base.attribute.append(helper.make_attribute("N", total))
            sizes = f"{prefix}/split_sizes"
            graph.initializer.append(numpy_helper.from_array(np.array([m.columns for m in members], np.int64), sizes))
            group_nodes = [
                helper.make_node("MatMul", [x, a_name], [f"{prefix}/lora_A/MatMul/output_0"], name=f"{prefix}/lora_A/MatMul"),
                helper.make_node("MatMul", [f"{prefix}/lora_A/MatMul/output_0", b_name], [f"{prefix}/lora_B/MatMul/output_0"],
                                 name=f"{prefix}/lora_B/MatMul"),
                base,
                helper.make_node("Add", [base.output[0], f"{prefix}/lora_B/MatMul/output_0"], [f"{prefix}/lora/Add/output_0"],
                                 name=f"{prefix}/lora/Add"),
            ]
            split_input = f"{prefix}/lora/Add/output_0"
            if any(m.bias for m in members):  # one Add of the members' biases side by side (zero where one has none)
                arrays = [numpy_helper.to_array(inits[m.bias.input[1]]) if m.bias else None for m in members]
                dtype = next(a.dtype for a in arrays if a is not None)
                bias = np.concatenate([a if a is not None else np.zeros(m.columns, dtype) for a, m in zip(arrays, members)])
                bias_name = f"model.layers.{layer}.{block}.{fused}.Add.bias"  # Model Builder's naming
                graph.initializer.append(numpy_helper.from_array(bias, bias_name))
                group_nodes.append(helper.make_node("Add", [split_input, bias_name], [f"{prefix}/Add/output_0"], name=f"{prefix}/Add"))
                split_input = f"{prefix}/Add/output_0"
            # the old outputs' names (after the bias Add where there was one): every consumer (attention,
            # activation) reads them unchanged
            outputs = [(m.bias or m.add).output[0] for m in members]
            group_nodes.append(helper.make_node("Split", [split_input, sizes], outputs, name=f"{prefix}/Split", axis=-1))
            new_nodes[first.lora_a.name] = group_nodes
            for m in members:
                drop_nodes.update(n.name for n in (m.base, m.lora_a, m.lora_b, m.add, *([m.bias] if m.bias else [])))
                if m.bias:
                    drop_inits.add(m.bias.input[1])
                drop_inits.update(m.base.input[1:])
                drop_inputs.update((m.a_input, m.b_input))
                drop_inits.update((m.a_input, m.b_input))
            packed += 1
    if not packed:
        return 0
    ordered = []
    for n in graph.node:
        ordered += new_nodes.get(n.name, [])
        if n.name not in drop_nodes:
            ordered.append(n)
    del graph.node[:]
    graph.node.extend(ordered)
    kept_inits = [i for i in graph.initializer if i.name not in drop_inits]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    seen: set[str] = set()
    kept_inputs = []
    for i in list(graph.input) + new_inputs:  # Olive's export lists some LoRA inputs twice: keep one
        if i.name not in drop_inputs and i.name not in seen:
            seen.add(i.name)
            kept_inputs.append(i)
    del graph.input[:]
    graph.input.extend(kept_inputs)
    tmp = model_dir / f".{MODEL_FILE}.packing"
    tmp.mkdir(exist_ok=True)
    onnx.save(model, str(tmp / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
              location=DATA_FILE, size_threshold=1024)
    for name in (MODEL_FILE, DATA_FILE):
        (tmp / name).replace(model_dir / name)
    tmp.rmdir()
    return packed


def _dim(info, axis: int) -> int:
    return info.type.tensor_type.shape.dim[axis].dim_value


def _packable(members: list[_Member], inits: dict) -> bool:
    """Same input, same kind of MatMul with equal attributes (but N), weights that are initializers,
    each LoRA Add reading its MatMul's output directly (nothing, such as a bias, in between)."""
    first = members[0].base
    attrs = lambda n: sorted((a.name, a.SerializeToString()) for a in n.attribute if a.name != "N")  # noqa: E731
    for m in members:
        b = m.base
        if (b.op_type, b.domain, b.input[0], len(b.input)) != (first.op_type, first.domain, first.input[0], len(first.input)):
            return False
        if attrs(b) != attrs(first) or not all(name in inits for name in b.input[1:]):
            return False
        if m.lora_a.input[0] != first.input[0] or m.add.input[0] != b.output[0]:
            return False
    return first.op_type in ("MatMulNBits", "MatMul")


def _pack_weights(members: list[_Member], inits: dict, graph, prefix: str) -> list[str]:
    """Concatenate each weight input of the members along the output columns; the new names."""
    from onnx import numpy_helper

    names = []
    for k, suffix in enumerate(members[0].base.input[1:]):
        arrays = [numpy_helper.to_array(inits[m.base.input[1 + k]]) for m in members]
        # MatMulNBits stores weights, scales and zero points N-major (axis 0); MatMul's B is [K, N]
        axis = 0 if members[0].base.op_type == "MatMulNBits" else 1
        name = f"{prefix}.MatMul.{suffix.rsplit('.MatMul.', 1)[-1]}"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=axis), name))
        names.append(name)
    return names
