"""tiny-phi3's weights in another family's layout: tiny-llama, tiny-mistral and tiny-qwen2, in seconds.

Phi-3's decoder is Llama's with two fused Linears (transformers' modeling_phi3.py): ``qkv_proj``
stacks q, k and v along its output rows in that order (Phi3Attention slices them so), and
``gate_up_proj`` stacks gate then up (Phi3MLP: ``gate, up = gate_up_proj(x).chunk(2, dim=-1)``,
``down(up * silu(gate))``, as Llama's MLP). Splitting them, and carrying everything else over
unchanged (embeddings, RMSNorm weights and eps, default RoPE and its theta, the activation, untied
LM head, special token ids, generation config, tokenizer and chat template), gives the same model:
the same logits for the same ids. Qwen2's q/k/v biases are zero; Mistral's and Qwen2's sliding
window is off, as Phi-3's is. So every family is fine-tuned from the same pretrained state, and a
difference between families' results is the layout's, not the base's.

Qwen3 is not derived: its per-head RMSNorm of q and k has no identity setting, so no Qwen3 model
computes Phi-3's attention.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
# Files save_pretrained writes for the model; every other file of the source (tokenizer, chat
# template) is copied byte for byte.
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tiny_base.json"}


def _check_source(config: PretrainedConfig) -> None:
    """Refuse the Phi-3 settings that have no equal in the other families."""
    rope = config.rope_parameters or {}
    problems = []
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"rope_parameters {rope} (only full-width default RoPE carries over)")
    if config.original_max_position_embeddings != config.max_position_embeddings:
        problems.append("original_max_position_embeddings != max_position_embeddings (LongRoPE)")
    if config.sliding_window is not None:
        problems.append(f"sliding_window {config.sliding_window}")
    if config.resid_pdrop:
        problems.append(f"resid_pdrop {config.resid_pdrop} (the other families have no residual dropout)")
    if problems:
        raise ValueError("cannot derive an equal model from this Phi-3: " + "; ".join(problems))


def family_config(phi3: PretrainedConfig, model_type: str) -> PretrainedConfig:
    """The family's config for the same model as ``phi3`` (head size: hidden_size // heads in all four)."""
    _check_source(phi3)
    config_class, model_class = FAMILIES[model_type]
    fields = {
        "vocab_size": phi3.vocab_size,
        "hidden_size": phi3.hidden_size,
        "intermediate_size": phi3.intermediate_size,
        "num_hidden_layers": phi3.num_hidden_layers,
        "num_attention_heads": phi3.num_attention_heads,
        "num_key_value_heads": phi3.num_key_value_heads,
        "hidden_act": phi3.hidden_act,
        "max_position_embeddings": phi3.max_position_embeddings,
        "initializer_range": phi3.initializer_range,
        "rms_norm_eps": phi3.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": phi3.rope_parameters["rope_theta"]},
        "attention_dropout": phi3.attention_dropout,
        "tie_word_embeddings": phi3.tie_word_embeddings,
        "bos_token_id": phi3.bos_token_id,
        "eos_token_id": phi3.eos_token_id,
        "pad_token_id": phi3.pad_token_id,
        "use_cache": phi3.use_cache,
        "architectures": [model_class.__name__],
    }
    if model_type == "llama":
        fields |= {"attention_bias": False, "mlp_bias": False}
    else:  # Mistral defaults to a 4096-token window, Qwen2 to one under use_sliding_window: off, as in Phi-3
        fields["sliding_window"] = None
    if model_type == "qwen2":
        fields["use_sliding_window"] = False
    return config_class(**fields)


def split_state_dict(state: dict[str, torch.Tensor], config: PretrainedConfig, *, qkv_bias: bool) -> dict[str, torch.Tensor]:
    """Phi-3's tensors with ``qkv_proj`` and ``gate_up_proj`` split into the separate projections."""
    head_dim = config.hidden_size // config.num_attention_heads
    q_rows, kv_rows = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        # clone: split views share their storage, which save_pretrained would deduplicate
        if name.endswith("self_attn.qkv_proj.weight"):
            prefix = name.removesuffix("qkv_proj.weight")
            for proj, part in zip("qkv", tensor.split([q_rows, kv_rows, kv_rows])):
                out[f"{prefix}{proj}_proj.weight"] = part.clone()
                if qkv_bias:
                    out[f"{prefix}{proj}_proj.bias"] = torch.zeros(part.shape[0], dtype=part.dtype)
        elif name.endswith("mlp.gate_up_proj.weight"):
            prefix = name.removesuffix("gate_up_proj.weight")
            gate, up = tensor.chunk(2)
            out[f"{prefix}gate_proj.weight"], out[f"{prefix}up_proj.weight"] = gate.clone(), up.clone()
        else:
            out[name] = tensor.clone()
    return out


@torch.no_grad()
def derive_model(phi3: Phi3ForCausalLM, model_type: str) -> PreTrainedModel:
    """The same model as ``phi3`` in the family's classes (same logits; ``generation_config`` too)."""
    config = family_config(phi3.config, model_type)
    model = FAMILIES[model_type][1](config).to(phi3.dtype)
    state = split_state_dict(phi3.state_dict(), phi3.config, qkv_bias=model_type == "qwen2")
    model.load_state_dict(state, strict=True)  # strict: every tensor of the family is set
    model.generation_config = phi3.generation_config
    return model.eval()


def derive_base(source: Path, model_type: str, out_dir: Path) -> Path:
    """Write the family's model folder derived from the Phi-3 folder ``source``; return ``out_dir``."""
    source, out_dir = Path(source), Path(out_dir)
    phi3 = Phi3ForCausalLM.from_pretrained(source, dtype=torch.float32)
    model = derive_model(phi3, model_type)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for f in sorted(source.iterdir()):
        if f.is_file() and f.name not in _MODEL_FILES:
            shutil.copyfile(f, out_dir / f.name)
    report = {
        "derived_from": str(source.name),
        "source_model_sha256": hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest(),
        "model_type": model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
    }
    # Deterministic content only: the pipeline hashes this folder.
    (out_dir / "tiny_base.json").write_text(json.dumps(report, indent=2) + "\n")
    return out_dir
