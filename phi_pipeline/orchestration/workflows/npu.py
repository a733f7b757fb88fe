"""Olive's own pass chains that build an NPU model from a merged (adapter-in-weights) Hugging Face model.

NPUs run static graphs, so every NPU bundle is in the merged layout: workflows/merged.py puts
Olive's MergeAdapterWeights first and appends one of the chains below. Each returns the parts of a
workflow it sets: systems, data_configs, passes, host, target. These configs are generated and
validated anywhere and run on an x86-64 Linux host with the environments below (docs/targets.md says what
was executed).

qnn (Qualcomm Snapdragon NPU, QNNExecutionProvider)
    Follows olive-recipes `microsoft-Phi-3-mini-4k-instruct/QNN/config.json` (the same chain as its
    Phi-3.5-mini and Llama-3.2-1B QNN recipes): QuaRot rotation -> GPTQ int4 weights -> CaptureSplitInfo
    -> ModelBuilder int4 -> MatMulNBitsToQDQ -> GraphSurgeries -> OnnxStaticQuantization (uint16
    activations) -> SplitModel -> StaticLLM -> EPContextBinaryGenerator -> ComposeOnnxModels.
    Where this differs from the recipe, and why:
    - calibration data is the adapter's own train split (the recipe downloads wikitext-2), for both GPTQ
      and activation calibration, up to CALIBRATION_SAMPLES rows (the recipe: 128);
    - the LM head is int8 (the recipe: int4, Model Builder's default): with the whole train split for
      calibration it took the tiny antonyms adapter from 0.875 to 0.969 exact match on the HTP against
      PyTorch+PEFT's 1.000 (docs/npu-quality.md). The LM head runs on the CPU EP in a split of its own, so the
      context binaries are unchanged; on Phi-3-mini it costs about 49 MB more than int4;
    - GPTQ is Olive's built-in `Gptq` pass (no extra package; the recipe's GptqModel needs a source build
      of gptqmodel), and calibration runs on the CPU execution provider (the recipe uses CUDA);
    - onnxruntime-qnn >= 2.x is a plugin execution provider next to the CPU onnxruntime, so one
      environment does everything: the QNN system is a PythonEnvironment on that same virtual environment
      (`make venv TARGET=qnn` adds the qnn extra to `.venv`), which is how Olive registers the plugin
      before compiling context binaries;
    - Model Builder keeps Q, K and V as separate MatMuls (`fuse_qkv: false`): its packed path for Phi-3's
      fused qkv_proj needs GPTQ zero points, which symmetric GPTQ does not write.
    Needs: the qnn extra; the context-binary step needs onnxruntime-qnn's HTP backend, which its manylinux
    x86_64 wheel ships (libQnnHtp.so, libHtpPrepare.so), so it runs here too; the GPTQ and calibration steps
    want a large machine for a 3.8B model.

openvino (Intel NPU, OpenVINOExecutionProvider)
    Follows olive-recipes `microsoft-Phi-3-mini-4k-instruct/aitk/phi3_ov_npu_config.json` (its Phi-3.5-mini
    and Llama-3.2-1B recipes are the same chain): OpenVINOOptimumConversion with NNCF weight compression ->
    OpenVINOIoUpdate -> OpenVINOEncapsulation (an ONNX model wrapping the OpenVINO IR, with genai_config.json).
    Where this differs from the recipe: compression is data-free (symmetric int4, group 128, ratio 1: the
    recipe's own settings minus the wikitext-2 dataset, which they do not use at ratio 1 without AWQ), because
    the pass takes only optimum-intel's named hub datasets, not a data config.
    Needs: `.venv-openvino`, built by `make venv TARGET=openvino` from pyproject's `openvino` dependency
    group; optimum-intel caps transformers below the main environment's pin, so the whole workflow (merge
    included) runs under that environment's Python (Target.export_python). Not a PythonEnvironment host per
    pass: Olive 0.13 validates OpenVINOOptimumConversion by importing nncf in the engine's process, and its
    pass runner rebuilds the accelerator with a plain string that the pass's default config cannot read.
"""

from __future__ import annotations

import json
from typing import Any

from phi_pipeline.pipeline_spec.plan import AdapterPlan, Plan
from phi_pipeline.orchestration.workflows.common import data_config, python_environment, system, target_system
from phi_pipeline.orchestration.workflows.export import model_builder_pass

CALIBRATION_DATA = "calibration_data"
# Four times the recipe's 128 GPTQ samples: the tiny adapters' 288-row train split is used whole (measured with
# the int8 LM head: docs/npu-quality.md), as is any train split smaller than this.
CALIBRATION_SAMPLES = 512
# The LM head's weight bits in the qnn chain (Model Builder's last_matmul override; the recipe: 4). Model
# Builder names its MatMulNBits /lm_head/MatMul_Q<bits>, which MatMulNBitsToQDQ must leave alone.
QNN_LM_HEAD_BITS = 8

# Snapdragon X Elite (the recipes' soc_model "60"), HTP in burst mode.
QNN_PROVIDER_OPTIONS = {
    "htp_performance_mode": "burst",
    "htp_graph_finalization_optimization_mode": "3",
    "soc_model": "60",
}
# StaticLLM's prefill chunk: the context graph takes this many tokens per call.
QNN_CONTEXT_LENGTH = 64

# The Phi-3-mini NPU recipe's static prompt and response budget (OpenVINO NPU compiles for fixed sizes),
# shrunk in the same 2:1 proportion for a model whose context window is smaller.
OPENVINO_MAX_PROMPT_LEN = 1024
OPENVINO_MIN_RESPONSE_LEN = 512
# NNCF weight compression per precision: symmetric int4 is the format the NPU plugin runs fastest
# (embeddings and lm_head fall back to int8); int8 is per-channel symmetric. A layer whose input width is no
# multiple of 128 (SmolLM2's 576) takes the largest power of two that divides it (NNCF's "adjust", as optimum's
# own model presets do) instead of failing the export.
OPENVINO_WEIGHTS: dict[str, dict[str, Any]] = {
    "int4": {
        "weight_format": "int4",
        "group_size": 128,
        "group_size_fallback": "adjust",
        "ratio": 1.0,
        "sym": True,
        "backup_precision": "int8_asym",
    },
    "int8": {"weight_format": "int8", "sym": True},
}


def _qnn_builder_pass(plan: Plan) -> dict[str, Any]:
    builder = {**model_builder_pass(plan), "int4_op_types_to_quantize": ["MatMul", "Gather"]}
    builder["extra_options"] = {
        **builder.get("extra_options", {}),
        # Symmetric GPTQ leaves no zero points, and Model Builder's packed Q/K/V path (for Phi-3's fused
        # qkv_proj) concatenates them (TypeError in make_packed_matmul_int4): keep Q, K and V separate MatMuls.
        "fuse_qkv": False,
        "matmul_mixed_precision": {"last_matmul": f"int{QNN_LM_HEAD_BITS}"},
    }
    return builder


def _kv_cache_dim_pass(plan: Plan) -> dict[str, Any]:
    """Model Builder 0.18 writes the KV cache's last dimension as the symbolic `kv_cache_dim` (one export for
    plain and quantized caches); Olive 0.13's calibration reader sizes its empty cache from that dimension
    and fails on a name, so it is fixed to the head size. Unknown without a local config.json: then absent."""
    if plan.head_size is None:
        return {}
    return {
        "kv_dim": {
            "type": "DynamicToFixedShape",
            "dim_param": ["kv_cache_dim"],
            "dim_value": [plan.head_size],
            "save_as_external_data": True,
        }
    }


def qnn_route(plan: Plan, adapter: AdapterPlan) -> dict[str, Any]:
    passes: dict[str, Any] = {
        "rotate": {"type": "QuaRot"},
        # Channel-wise symmetric int4, as the HTP runs it; lm_head is left to Model Builder.
        "gptq": {
            "type": "Gptq",
            "bits": 4,
            "sym": True,
            "group_size": -1,
            "lm_head": False,
            "data_config": CALIBRATION_DATA,
        },
        "split_info": {"type": "CaptureSplitInfo", "num_splits": 4, "unique_embeds_lm_head_splits": True},
        # Model Builder keeps GPTQ's int4 weights, quantizes the embedding table (Gather) to int4 too and the
        # LM head to QNN_LM_HEAD_BITS.
        "builder": _qnn_builder_pass(plan),
        "to_qdq": {
            "type": "MatMulNBitsToQDQ",
            "use_signed_int": True,
            "add_zero_point": True,
            # lm_head was not GPTQ-quantized: it keeps Model Builder's MatMulNBits, in a split of its own.
            "nodes_to_exclude": [f"/lm_head/MatMul_Q{QNN_LM_HEAD_BITS}"],
            "save_as_external_data": True,
        },
        **_kv_cache_dim_pass(plan),
        "surgeries": {
            "type": "GraphSurgeries",
            "surgeries": [
                {"surgeon": "RemoveRopeMultiCache"},
                {"surgeon": "AttentionMaskToSequenceLengths"},
                {"surgeon": "SimplifiedLayerNormToL2Norm"},
            ],
            "save_as_external_data": True,
        },
        "static_quant": {
            "type": "OnnxStaticQuantization",
            "data_config": CALIBRATION_DATA,
            "activation_type": "uint16",
            "precision": "uint8",
            "calibration_providers": ["CPUExecutionProvider"],
            "quant_preprocess": True,
            "op_types_to_exclude": ["GatherBlockQuantized", "GroupQueryAttention", "MatMulNBits"],
            "save_as_external_data": True,
        },
        "split": {"type": "SplitModel"},
        "static_llm": {"type": "StaticLLM", "batch_size": 1, "context_length": QNN_CONTEXT_LENGTH},
        "context_binary": {
            "type": "EPContextBinaryGenerator",
            "provider_options": dict(QNN_PROVIDER_OPTIONS),
            # Not shared between a split's context and iterator graphs (the recipe shares them): with the
            # onnxruntime-qnn 2.7 plugin the shared binary is written under the iterator's name while the
            # context graph still points at its own, so ComposeOnnxModels finds no file. Costs a second copy
            # of each split's weights on the device.
            "weight_sharing": False,
        },
        "compose": {"type": "ComposeOnnxModels"},
    }
    return {
        "systems": {
            "local_system": system("cpu", "CPUExecutionProvider"),
            "qnn_system": python_environment(plan.target.venv, plan.target),
        },
        "data_configs": [
            data_config(
                CALIBRATION_DATA, adapter, adapter.train_data, batch_size=1, max_samples=CALIBRATION_SAMPLES
            )
        ],
        "passes": passes,
        "host": "local_system",
        # The context-binary pass runs on the target: Olive registers the plugin EP in that environment.
        "target": "qnn_system",
    }


def openvino_route(plan: Plan, adapter: AdapterPlan) -> dict[str, Any]:
    budget = OPENVINO_MAX_PROMPT_LEN + OPENVINO_MIN_RESPONSE_LEN
    context_length = min(budget, plan.max_positions) if plan.max_positions else budget
    prompt_len = context_length * OPENVINO_MAX_PROMPT_LEN // budget
    npu_config = {"NPU": {"MAX_PROMPT_LEN": str(prompt_len), "MIN_RESPONSE_LEN": str(context_length - prompt_len)}}
    quant = dict(OPENVINO_WEIGHTS[plan.precision])
    if plan.spec.base_model.trust_remote_code:
        quant["trust_remote_code"] = True
    passes: dict[str, Any] = {
        "convert": {
            "type": "OpenVINOOptimumConversion",
            # The merged model is a local folder: optimum cannot look its task up on the hub.
            "extra_args": {"device": "npu", "task": "text-generation-with-past"},
            "ov_quant_config": quant,
        },
        "io_update": {"type": "OpenVINOIoUpdate", "static": False, "reuse_cache": True},
        "encapsulation": {
            "type": "OpenVINOEncapsulation",
            "target_device": "npu",
            "keep_ov_dynamic_dims": True,
            "reuse_cache": True,
            "genai_config_override": {
                "model": {
                    "context_length": context_length,
                    "decoder": {
                        "session_options": {
                            "provider_options": [
                                {
                                    "OpenVINO": {
                                        "device_type": "NPU",
                                        "enable_causallm": "True",
                                        "load_config": json.dumps(npu_config, separators=(",", ":")),
                                    }
                                }
                            ]
                        }
                    },
                },
                "search": {"max_length": context_length},
            },
        },
    }
    return {
        "systems": {"local_system": target_system(plan.target)},
        "passes": passes,
        "host": "local_system",
        "target": "local_system",
    }

