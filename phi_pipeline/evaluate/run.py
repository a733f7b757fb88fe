"""Evaluating a bundle: every task, base and adapter, on both runtimes; every figure as a dict."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from phi_pipeline.bundle.layout import MANIFEST
from phi_pipeline.pipeline_spec.data import Example
from phi_pipeline.errors import PipelineError, UsageError
from phi_pipeline.evaluate.metrics import DEFINITIONS as METRIC_DEFINITIONS
from phi_pipeline.evaluate.metrics import LABEL_METRICS, label_report, score
from phi_pipeline.evaluate.onnx_side import OnnxSide, token_nll
from phi_pipeline.evaluate.parity import Tally, ppl, ratio
from phi_pipeline.evaluate.tasks import EvalTask
from phi_pipeline.evaluate.torch_side import TorchSide

FORMAT = "phi-pipeline-eval/1"
VARIANTS = ("base", "adapter")

DEFINITIONS = {
    "prompt": "the text the adapter saw in training before its answer, tokenized once by the bundle's tokenizer; "
    "both runtimes get the same ids",
    "answer_tokens": "ids following the prompt ids in tokenize(prompt + separator + reference); no end marker scored",
    "perplexity": "exp(total NLL of the answer tokens / their count), conditioned on the prompt",
    "token_agreement": "PyTorch greedy continuation (eos included) teacher-forced through the ONNX model: share of "
    "positions where the ONNX argmax equals PyTorch's token",
    "identical_outputs": "share of examples whose free-running greedy token ids are the same in both runtimes",
    "logit_abs_diff": "|ONNX - PyTorch| logits over the vocabulary at every teacher-forced position "
    "(reference answers and PyTorch greedy continuations)",
    **METRIC_DEFINITIONS,
}


def _split_answer(prompt_ids: list[int], full_ids: list[int]) -> tuple[list[int], list[int]]:
    """Prompt and answer ids; where tokenization merges across the boundary, the shared prefix is the prompt."""
    k = 0
    while k < min(len(prompt_ids), len(full_ids)) and prompt_ids[k] == full_ids[k]:
        k += 1
    return full_ids[:k], full_ids[k:]


def _decode(onnx: OnnxSide, ids: Sequence[int]) -> str:
    """Generated text as BundleModel.generate returns it (end-of-sequence tokens dropped, stripped)."""
    ids = [t for t in ids if t not in onnx.eos]
    return onnx.bm.tokenizer.decode(np.asarray(ids, dtype=np.int32)).strip() if ids else ""


def _strip_eos(ids: Sequence[int], eos: set[int]) -> list[int]:
    return [t for t in ids if t not in eos]


def _progress(total: int, enabled: bool | None):
    from tqdm import tqdm

    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(total=total, desc="evaluating", unit="example", file=sys.stderr, disable=disable, leave=False)


def evaluate_bundle(
    bundle: Path,
    tasks: Sequence[EvalTask],
    *,
    base_model: str | None = None,
    peft_dirs: Mapping[str, Path] | None = None,
    trust_remote_code: bool = False,
    require_pytorch: bool = False,
    progress: bool | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Evaluate base and adapters of `bundle` on each task's eval split; every figure, as a dict.

    The PyTorch side runs when `base_model` and a PEFT folder for every task's adapter are given and
    load; otherwise the ONNX figures alone are reported, with the reason (or PipelineError when
    `require_pytorch`). A merged bundle (one model per adapter, no base model shipped) is evaluated
    model by model; its base figures come from PyTorch only.
    """
    from phi_pipeline.runtime.genai import BundleModel
    from phi_pipeline.runtime.target_models import eval_side

    start = time.perf_counter()
    manifest = json.loads((Path(bundle) / MANIFEST).read_text())
    names = [a["name"] for a in manifest.get("adapters", [])]
    missing = [t.adapter for t in tasks if t.adapter not in names]
    if missing:
        raise UsageError(str(bundle), [f"no adapter {', '.join(map(repr, missing))} in this bundle"])
    merged = manifest.get("layout") == "merged"
    shared = None if merged else OnnxSide(BundleModel(Path(bundle)))

    torch_side, reason = _load_torch(tasks, base_model, peft_dirs or {}, trust_remote_code)
    if torch_side is None and require_pytorch:
        raise PipelineError(f"the PyTorch reference for evaluation could not be loaded: {reason}")

    prepared = [(task, task.examples()) for task in tasks]
    results: dict[str, Any] = {
        "format": FORMAT,
        "bundle": {k: manifest.get(k) for k in ("pipeline", "target", "precision", "layout")},
        "pytorch": {
            "available": torch_side is not None,
            "reason": reason,
            "base_model": base_model,
            "dtype": "float32",
        },
        "definitions": DEFINITIONS,
        "adapters": {},
    }
    bar = _progress(sum(len(ex) for _, ex in prepared) * len(VARIANTS), progress)
    try:
        for task, examples in prepared:
            # NPU bundles run on their own runtime (phi_pipeline/runtime/target_models.py), the others on onnxruntime-genai
            onnx = shared or eval_side(Path(bundle), task.adapter) or OnnxSide(BundleModel(Path(bundle), variant=task.adapter))
            results["adapters"][task.adapter] = _evaluate_task(task, examples, onnx, torch_side, bar, batch_size)
            # which runtime and provider produced the bundle's figures: a CPU fallback is never the target's own
            results["adapters"][task.adapter]["runtime"] = onnx.describe().to_json()
    finally:
        bar.close()
    results["seconds"] = round(time.perf_counter() - start, 2)
    return results


def _load_torch(
    tasks: Sequence[EvalTask], base_model: str | None, peft_dirs: Mapping[str, Path], trust_remote_code: bool
) -> tuple[TorchSide | None, str | None]:
    if not base_model:
        return None, "no base model given"
    local = Path(base_model)
    if (local.is_absolute() or base_model.startswith(".") or base_model.count("/") != 1) and not local.is_dir():
        return None, f"base model folder {base_model} not found"
    for t in tasks:
        folder = peft_dirs.get(t.adapter)
        if folder is None or not (Path(folder) / "adapter_config.json").is_file():
            return None, f"PEFT adapter {t.adapter!r} not found (looked in {folder}); was the cache cleaned?"
    try:
        import torch  # noqa: F401  (imported here so the ONNX side never needs it)
    except ImportError:
        return None, "torch is not installed"
    try:
        return TorchSide(base_model, {t.adapter: Path(peft_dirs[t.adapter]) for t in tasks},
                         trust_remote_code=trust_remote_code), None
    except Exception as exc:  # a hub id not in the offline cache, a corrupt checkpoint, ...
        return None, f"cannot load the PyTorch model: {type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class _Item:
    line: int
    reference: str
    prompt: list[int]
    """Prompt ids as generation sees them."""
    context: list[int]
    """Prompt ids the answer is scored after (shorter than `prompt` only where tokens merge across the boundary)."""
    answer: list[int]


def _prepare(task: EvalTask, examples: list[Example], onnx: OnnxSide) -> list[_Item]:
    bm = onnx.bm
    items = []
    for ex in examples:
        text = bm.prompt_for(ex.prompt, task.adapter)
        prompt = [int(t) for t in bm.tokenizer.encode(text)]
        full = [int(t) for t in bm.tokenizer.encode(text + task.separator + ex.reference)]
        context, answer = _split_answer(prompt, full)
        items.append(_Item(ex.line, ex.reference, prompt, context, answer))
    return items


def _figures(
    names: Sequence[str], gate_metric: str, texts: list[str], references: list[str], perplexity: float | None
) -> dict[str, Any]:
    """One runtime's figures: every metric, the gate metric's value as `metric`, and perplexity."""
    metrics = score(names, texts, references)
    return {"metric": metrics[gate_metric], "metrics": metrics, "perplexity": perplexity}


def _evaluate_task(
    task: EvalTask, examples: list[Example], onnx: OnnxSide, torch_side: TorchSide | None, bar, batch_size: int
) -> dict[str, Any]:
    start = time.perf_counter()
    max_new = task.eval.max_new_tokens
    items = _prepare(task, examples, onnx)
    pad = int(onnx.bm.tokenizer.pad_token_id)
    tally = {v: Tally() for v in VARIANTS}
    predictions: list[dict[str, Any]] = [{"line": it.line, "reference": it.reference} for it in items]
    for variant in VARIANTS:
        adapter = task.adapter if variant == "adapter" else None
        run_onnx = onnx.merged is None or adapter == onnx.merged
        t = tally[variant]
        for lo in range(0, len(items), batch_size):
            chunk = items[lo : lo + batch_size]
            onnx_new: list[list[int]] = []
            onnx_ref: list[np.ndarray] = []
            for it in chunk:
                n = len(it.context)
                t.answer_tokens += len(it.answer)
                if run_onnx:
                    onnx_new.append(onnx.generate(it.prompt, adapter, max_new))
                    onnx_ref.append(onnx.logits(it.context + it.answer[:-1], adapter, n - 1))  # a row per answer token
                    t.onnx_text.append(_decode(onnx, onnx_new[-1]))
                    t.onnx_nll += token_nll(onnx_ref[-1], it.answer)
                bar.update(1)
            if torch_side is None:
                continue
            generated = torch_side.generate([it.prompt for it in chunk], adapter, max_new, onnx.eos, pad)
            torch_ref = torch_side.logits([it.context + it.answer for it in chunk], adapter, pad)
            for k, (it, (p_new, p_steps), p_ref) in enumerate(zip(chunk, generated, torch_ref)):
                n = len(it.context)
                p_ref = p_ref[n - 1 : n - 1 + len(it.answer)]
                t.torch_text.append(_decode(onnx, p_new))
                t.torch_nll += token_nll(p_ref, it.answer)
                if not run_onnx:
                    continue
                t.diff(onnx_ref[k], p_ref)
                if p_new:
                    m = len(it.prompt)
                    forced = onnx.logits(it.prompt + p_new[:-1], adapter, m - 1)
                    t.agree += int((forced.argmax(axis=-1) == np.asarray(p_new)).sum())
                    t.positions += len(p_new)
                    t.diff(forced, p_steps)
                t.identical += int(_strip_eos(onnx_new[k], onnx.eos) == _strip_eos(p_new, onnx.eos))
        for row, text in zip(predictions, t.onnx_text):
            row[f"{variant}_onnx"] = text
        for row, text in zip(predictions, t.torch_text):
            row[f"{variant}_pytorch"] = text

    names, gate_metric = task.eval.metric, task.gate_metric
    references = [it.reference for it in items]
    sha = task.source_digest()
    out: dict[str, Any] = {
        "metric": gate_metric,
        "metrics": list(names),
        "eval_file": task.source,
        "eval_sha256": sha,
        "eval_split_changed": task.expected_sha256 is not None and sha != task.expected_sha256,
        "examples": len(items),
        "max_new_tokens": max_new,
        "answer_tokens": tally["base"].answer_tokens,
        "prompt_boundary_merges": sum(len(it.context) != len(it.prompt) for it in items),
        "gates": task.gates.model_dump(),
    }
    if torch_side is not None:
        out["pytorch_tokenizer_mismatches"] = sum(
            torch_side.encode(onnx.bm.prompt_for(ex.prompt, task.adapter)) != it.prompt for ex, it in zip(examples, items)
        )
    for variant, t in tally.items():
        has_onnx = onnx.merged is None or variant == "adapter"
        figures: dict[str, Any] = {
            "onnx": _figures(names, gate_metric, t.onnx_text, references, ppl(t.onnx_nll, t.answer_tokens))
            if has_onnx
            else None,
            "pytorch": None,
            "parity": None,
        }
        if torch_side is not None:
            figures["pytorch"] = _figures(names, gate_metric, t.torch_text, references, ppl(t.torch_nll, t.answer_tokens))
        if torch_side is not None and has_onnx:
            figures["parity"] = {
                "token_agreement": t.agree / t.positions if t.positions else None,
                "positions": t.positions,
                "identical_outputs": t.identical / len(items) if items else None,
                "perplexity_ratio": ratio(figures["onnx"]["perplexity"], figures["pytorch"]["perplexity"]),
                "logit_max_abs_diff": t.max_abs,
                "logit_mean_abs_diff": t.sum_abs / t.n_abs if t.n_abs else None,
            }
        if any(m in LABEL_METRICS for m in names):
            texts = t.onnx_text if has_onnx else t.torch_text
            figures["labels"] = label_report(texts, references) if texts else None
        out[variant] = figures
    out["predictions"] = predictions
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out
