"""A trained adapter as later stages see it: below both pipeline (which trains) and bundle (which ships)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from phi_pipeline.pipeline_spec.plan import AdapterPlan


TRAINER_STATE = "trainer_state.json"
"""In a fine-tune result: the trainer's state, its log_history the loss curves."""


@dataclass(frozen=True)
class TrainedAdapter:
    plan: AdapterPlan
    folder: Path
    """Cache entry: the PEFT adapter (adapter/), trainer_state.json and tensorboard/ logs."""
    key: str
    dataset_sha256: dict[str, str]
    """sha256 of each local split file the adapter was trained and evaluated on (hub splits: their name)."""
    validation: dict[str, Any] | None = None
    """Which rows the trainer validated on: a file, a hub split, or the training rows held out."""
    search: dict[str, Any] | None = None
    """The hyperparameter search that picked this adapter (search.study.SearchOutcome.to_dict()), if any."""


def validation_losses(history: Sequence[dict[str, Any]], load_best: bool) -> tuple[float | None, float | None]:
    """(before training, shipped): the validation loss the trainer measured before its first step (the
    fine-tune evaluates on start), and that of the adapter it ships: the lowest evaluation's after training
    started when it keeps its best checkpoint (load_best_model_at_end), else the last one's. None where not logged."""
    evaluations = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    before = next((loss for step, loss in evaluations if step == 0), None)
    trained = [loss for step, loss in evaluations if step > 0]
    shipped = (min(trained) if load_best else trained[-1]) if trained else None
    return before, shipped
