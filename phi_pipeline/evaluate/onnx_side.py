"""The bundle's side: greedy generation and teacher-forced logits through phi_pipeline/runtime/genai.py (no torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from phi_pipeline.runtime.target_models import RuntimeDescription, genai_description

if TYPE_CHECKING:
    from phi_pipeline.runtime.genai import BundleModel


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, targets: Sequence[int]) -> float:
    """Summed negative log-likelihood of `targets`, logits[i] predicting targets[i]."""
    if len(targets) == 0:
        return 0.0
    lp = log_softmax(logits)
    return float(-lp[np.arange(len(targets)), np.asarray(targets)].sum())


class OnnxSide:
    """The evaluation's model interface (as target_runtime.TargetSide offers it for NPU runtimes) over a
    bundle loaded by the runtime: one model, its adapters switched per generator."""

    def __init__(self, model: "BundleModel"):
        self.bm = model
        self.eos = set(model.eos_token_ids)
        # a merged bundle's model has one adapter built into its weights (and no base model to run)
        self.merged = model.merged_variant

    def generate(self, prompt: Sequence[int], adapter: str | None, max_new_tokens: int) -> list[int]:
        """New token ids, the end-of-sequence token included when one was produced."""
        return self.bm.generate_ids(prompt, adapter, max_new_tokens)

    def logits(self, ids: Sequence[int], adapter: str | None, first: int = 0) -> np.ndarray:
        """(len(ids) - first, vocab) teacher-forced logits at positions first.. of `ids` (GenaiModel.logits)."""
        return self.bm.logits(ids, adapter, first)

    def describe(self) -> RuntimeDescription:
        return genai_description(self.bm.manifest.get("execution_provider", "CPUExecutionProvider"), self.bm.cpu_fallback)
