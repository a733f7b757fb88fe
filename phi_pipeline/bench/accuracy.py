"""Accuracy proxies of a quantized bench export against its full-precision one (GitHub issue 12).

The benchmark base has random weights, so there is no task to score; what quantization changes is
still measurable on random prompts: the reference's greedy continuation is fed to both models
teacher-forced, and at every position we record whether the quantized model picks the same next
token (token agreement), both models' perplexity of that continuation, and the KL divergence of the
quantized model's next-token distribution from the reference's. Random weights give near-flat
logits, so agreement here is a pessimistic proxy (near-ties flip easily); ratios between exports of
the same base are what to compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from phi_pipeline.evaluate.speed import random_prompt
from phi_pipeline.evaluate.stats import summary


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def teacher_forced(model: Any, og: Any, prompt: list[int], forced: list[int] | None, new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Log-probabilities at each of `new_tokens` positions after `prompt`, feeding `forced` tokens
    (None: the model's own greedy choices); returns (tokens fed, log-probs [new_tokens, vocab])."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens + 1)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    fed, rows = [], []
    for i in range(new_tokens):
        logits = np.asarray(generator.get_logits(), dtype=np.float64)
        logp = _log_softmax(logits.reshape(-1, logits.shape[-1])[-1])
        rows.append(logp)
        token = int(np.argmax(logp)) if forced is None else forced[i]
        fed.append(token)
        generator.append_tokens([token])
    return fed, np.stack(rows)


def compare(reference: Path, quantized: Path, *, prompts: int = 4, prompt_len: int = 64, new_tokens: int = 32,
            threads: int | None = None) -> dict[str, Any]:
    """Token agreement, perplexities and KL of `quantized` vs `reference` (ONNX Runtime GenAI folders)."""
    import json

    import onnxruntime_genai as og

    def load(folder: Path) -> Any:
        config = og.Config(str(folder))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        return og.Model(config)

    ref_model, q_model = load(reference), load(quantized)
    vocab = json.loads((reference / "genai_config.json").read_text())["model"]["vocab_size"]
    agree, nll_ref, nll_q, kl = [], [], [], []
    for seed in range(prompts):
        prompt = random_prompt(prompt_len, vocab, seed=1000 * (seed + 1))
        tokens, ref = teacher_forced(ref_model, og, prompt, None, new_tokens)
        _, q = teacher_forced(q_model, og, prompt, tokens, new_tokens)
        positions = np.arange(new_tokens)
        agree.append(float((q.argmax(axis=1) == np.asarray(tokens)).mean()))
        nll_ref.append(float(-ref[positions, tokens].mean()))
        nll_q.append(float(-q[positions, tokens].mean()))
        kl.append(float((np.exp(ref) * (ref - q)).sum(axis=1).mean()))
    ppl_ref, ppl_q = float(np.exp(np.mean(nll_ref))), float(np.exp(np.mean(nll_q)))
    return {
        "reference": str(reference),
        "quantized": str(quantized),
        "prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "token_agreement": summary(agree),
        "perplexity_reference": round(ppl_ref, 4),
        "perplexity_quantized": round(ppl_q, 4),
        "perplexity_ratio": round(ppl_q / ppl_ref, 4),
        "kl_nats_per_token": summary(kl, digits=6),
    }
