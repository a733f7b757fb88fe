"""The embedded tiny Phi-3 base model and the two shipped datasets, all generated locally.

Kept import-light (no torch): planning reads ``builtin_config`` before the model exists.
``base_model`` builds the model, ``datasets`` writes ``pipelines/data``, ``corpus`` is the
pretraining text.
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


def builtin_config(name: str) -> dict:
    """The ``config.json`` fields a built-in base will have, known before it is built."""
    if name != "tiny-phi3":
        raise ValueError(f"unknown built-in base model {name!r}; known: tiny-phi3")
    heads = TINY_PHI3_ARCH["hidden_size"] // HEAD_SIZE
    return {
        "model_type": "phi3",
        "architectures": ["Phi3ForCausalLM"],
        **TINY_PHI3_ARCH,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
    }
