"""The bundle's side: greedy generation and teacher-forced logits with onnxruntime-genai (no torch).

Self-contained on purpose: it will move onto phi_pipeline/runtime.py with the serving code."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from phi_pipeline.generate import BundleModel


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
    """Greedy generation and teacher-forced logits with onnxruntime-genai (no torch)."""

    def __init__(self, model: "BundleModel"):
        self.bm = model
        self.og = model.og
        self.eos = {int(t) for t in model.tokenizer.eos_token_ids}
        # a merged bundle's model has one adapter built into its weights (and no base model to run)
        self.merged = getattr(model, "merged_variant", None)

    def _generator(self, adapter: str | None, max_length: int):
        if adapter != self.merged and self.merged is not None:
            raise ValueError(f"this model is adapter {self.merged!r} merged into the base; it cannot run {adapter!r}")
        params = self.og.GeneratorParams(self.bm.model)
        params.set_search_options(do_sample=False, max_length=max_length)
        generator = self.og.Generator(self.bm.model, params)
        if adapter is not None and self.merged is None:
            generator.set_active_adapter(self.bm.adapters, adapter)
        return generator

    def generate(self, prompt: Sequence[int], adapter: str | None, max_new_tokens: int) -> list[int]:
        """New token ids, the end-of-sequence token included when one was produced."""
        generator = self._generator(adapter, len(prompt) + max_new_tokens)
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        new: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        return new

    def logits(self, ids: Sequence[int], adapter: str | None) -> np.ndarray:
        """(len(ids), vocab) logits of one teacher-forced pass over `ids`."""
        generator = self._generator(adapter, len(ids) + 1)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        return np.asarray(generator.get_output("logits"))[0].astype(np.float32)
