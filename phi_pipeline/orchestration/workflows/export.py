"""Base model -> ONNX with Model Builder at the target's precision, LoRA weights as graph inputs.

The base is exported once, together with a zero-initialised adapter that has the pipeline's LoRA
layout; ExtractAdapters then turns every LoRA weight into an optional graph input. The graph is
therefore the same whatever the adapters learned, and each trained adapter becomes an
`.onnx_adapter` that fits it (adapters.py).
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

from phi_pipeline.pipeline_spec.plan import Plan
from phi_pipeline.orchestration.workflows.common import engine, hf_model, target_system

TEMPLATE: dict[str, Any] = {
    "input_model": None,
    "systems": {"local_system": None},
    "passes": {
        "builder": None,
        "extract": {
            "type": "ExtractAdapters",
            "make_inputs": True,
            "dynamic_lora_r": True,
            "optional_inputs": True,
            "save_format": "onnx_adapter",
            # weights beside the graph in model.onnx.data, as Model Builder writes them
            "save_as_external_data": True,
            "all_tensors_to_one_file": True,
            "external_data_name": "model.onnx.data",
        },
    },
    "host": "local_system",
    "target": "local_system",
}

# Model Builder's names for the projections LoRA can sit on; Phi-3's fused qkv_proj and
# gate_up_proj are split into these on export.
_BUILDER_PROJECTIONS = {
    "qkv_proj": ("attn", ("q_proj", "k_proj", "v_proj")),
    "q_proj": ("attn", ("q_proj",)),
    "k_proj": ("attn", ("k_proj",)),
    "v_proj": ("attn", ("v_proj",)),
    "o_proj": ("attn", ("o_proj",)),
    "gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
    "gate_proj": ("mlp", ("gate_proj",)),
    "up_proj": ("mlp", ("up_proj",)),
    "down_proj": ("mlp", ("down_proj",)),
}


def lora_matmul_nodes(target_modules: tuple[str, ...], num_layers: int) -> list[str]:
    """Model Builder node names of every LoRA MatMul, to keep them out of int4 quantization.

    Quantized LoRA MatMuls get zero-rank defaults from ExtractAdapters and then fail to run with
    no adapter active (MatMulNBits expects the trained shape).
    """
    names = []
    for layer in range(num_layers):
        for module in target_modules:
            block, projections = _BUILDER_PROJECTIONS[module]
            for proj in projections:
                for ab in ("lora_A", "lora_B"):
                    names.append(f"/model/layers.{layer}/{block}/{proj}/{ab}/MatMul")
    return names


def model_builder_pass(plan: Plan, *, lora_nodes: list[str] | None = None) -> dict[str, Any]:
    """Olive's ModelBuilder pass at the plan's precision; `lora_nodes` are kept out of int4 quantization."""
    builder: dict[str, Any] = {"type": "ModelBuilder", "precision": plan.precision}
    extra: dict[str, Any] = dict(plan.target.model_builder_options)
    if plan.precision == "int4":
        export = plan.spec.export
        builder["int4_block_size"] = export.int4_block_size
        if export.int4_accuracy_level is not None:
            builder["int4_accuracy_level"] = export.int4_accuracy_level
        builder["int4_is_symmetric"] = export.int4_symmetric
        # Gather: the embedding table as GatherBlockQuantized (int4 only; Model Builder's default algorithm).
        builder["int4_op_types_to_quantize"] = ["MatMul", "Gather"] if export.int4_quantize_embeddings else ["MatMul"]
        if export.int4_algorithm != "default":
            extra["algo_config"] = export.int4_algorithm
        groups = {"last_matmul": export.int4_lm_head, "mixed_layers": export.int4_sensitive_layers}
        if mixed := {group: bits for group, bits in groups.items() if bits != "int4"}:
            extra["matmul_mixed_precision"] = mixed
        if export.int4_lm_head != "int4" or not export.int4_quantize_embeddings:
            # Model Builder shares a tied table between embedding and LM head by default (SmolLM2, Qwen2.5-0.5B,
            # Llama-3.2-1B), and forces both into int4 then: GatherBlockQuantized reads 4 bits only, so an int8
            # head left the embedding reading a missing initializer, and unquantized embeddings were ignored.
            extra["shared_embeddings"] = False
        if lora_nodes:
            extra["nodes_to_exclude"] = lora_nodes
    if extra:
        builder["extra_options"] = extra
    return builder


def export_config(plan: Plan) -> dict[str, Any]:
    config = deepcopy(TEMPLATE)
    config["input_model"] = hf_model(
        plan.base_model,
        trust_remote_code=plan.spec.base_model.trust_remote_code,
        adapter_path=plan.paths.lora_layout_dir,
    )
    config["systems"]["local_system"] = target_system(plan.target)
    nodes = lora_matmul_nodes(plan.lora_layout, plan.num_layers) if plan.precision == "int4" else None
    config["passes"]["builder"] = model_builder_pass(plan, lora_nodes=nodes)
    config.update(engine(plan.paths.export_dir, plan.paths.olive_cache_dir))
    return config
