"""How a trial is scored on its adapter's validation split (never the eval split, which the gates use)."""

from __future__ import annotations

import math
from pathlib import Path

from phi_pipeline.pipeline_spec.data import load_examples
from phi_pipeline.pipeline_spec.plan import AdapterPlan, Plan
from phi_pipeline.search.study import TrialFailed
from phi_pipeline.bundle.staging import training_history
from phi_pipeline.orchestration.trained import TrainedAdapter, validation_losses


def validation_loss(trained: TrainedAdapter) -> float:
    """The validation loss of the adapter the trial ships (orchestration.trained.validation_losses)."""
    history = training_history(trained.folder)
    _, shipped = validation_losses(history, trained.plan.spec.training.load_best_model_at_end)
    if shipped is None:
        raise TrialFailed("the trainer logged no validation loss (no trainer state, or no validation split?)")
    if any(not math.isfinite(h["eval_loss"]) for h in history if "eval_loss" in h):
        return float("nan")
    return shipped


def validation_metric(plan: Plan, adapter: AdapterPlan, trained: TrainedAdapter) -> float:
    """The adapter's first eval metric on the validation rows, from greedy PyTorch+PEFT generations (the
    ONNX bundle does not exist yet while searching; the gates later hold it to PyTorch)."""
    from phi_pipeline.evaluate.metrics import score
    from phi_pipeline.evaluate.torch_side import TorchSide

    spec = trained.plan.spec
    examples = load_examples(spec.data, "validation", _validation_file(plan, adapter))
    side = TorchSide(
        plan.base_model, {adapter.name: trained.folder / "adapter"}, trust_remote_code=plan.spec.base_model.trust_remote_code
    )
    tok = side.tokenizer
    # the prompt text as the evaluation builds it: chat rows through the model's chat template
    texts = [
        tok.apply_chat_template(e.prompt, add_generation_prompt=True, tokenize=False) if isinstance(e.prompt, list) else e.prompt
        for e in examples
    ]
    eos = {i for i in (tok.eos_token_id, *_ids(side.model.generation_config.eos_token_id)) if i is not None}
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    hypotheses = []
    for start in range(0, len(texts), 16):
        batch = [side.encode(t) for t in texts[start : start + 16]]
        for new, _ in side.generate(batch, adapter.name, spec.eval.max_new_tokens, eos, pad):
            hypotheses.append(tok.decode([t for t in new if t not in eos], skip_special_tokens=True))
    metric = spec.eval.metric[0]
    return score([metric], hypotheses, [e.reference for e in examples])[metric]


def _ids(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _validation_file(plan: Plan, adapter: AdapterPlan) -> Path | None:
    data = adapter.spec.data
    if data.hub is not None:
        return None
    if data.validation is not None:
        return Path(data.validation)
    return plan.paths.split_file(adapter.name, "validation")
