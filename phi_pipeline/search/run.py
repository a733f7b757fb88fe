"""One adapter's search wired into a run: trial plans and their Olive workflows, training, scoring, the pick.

Each trial is an ordinary fine-tune workflow (olive_configs/<name>/<target>/search/<adapter>/trial-NNN.json)
with the trial's settings, trained through the pipeline's callback and so through its content-keyed cache:
a trial's work folder and cache key follow from its settings, not its number.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from pydantic import ValidationError

from phi_pipeline.orchestration.cache import content_key
from phi_pipeline.bundle.staging import training_history
from phi_pipeline.orchestration.configs import render
from phi_pipeline.pipeline_spec.plan import AdapterPlan, Plan
from phi_pipeline.search.objective import validation_loss, validation_metric
from phi_pipeline.search.space import apply, own_values
from phi_pipeline.search.study import SearchOutcome, TrialFailed, run_study
from phi_pipeline.orchestration.trained import TrainedAdapter
from phi_pipeline.orchestration.workflows.finetune import finetune_config

SEARCH_DIR = "search"

# Trains an adapter plan from the workflow written at configs_dir / config_file (the pipeline's fine-tune).
Train = Callable[[AdapterPlan, str, dict[str, Any]], TrainedAdapter]


def trial_config_file(adapter: str, number: int) -> str:
    return f"{SEARCH_DIR}/{adapter}/trial-{number:03d}.json"


def trial_plan(adapter: AdapterPlan, params: dict[str, Any]) -> AdapterPlan:
    """The adapter with a trial's settings, named after them: its own work folder and progress file."""
    return replace(adapter, spec=apply(adapter.spec, params, f"{adapter.name}.trial-{content_key(params)[:10]}"))


def search_adapter(
    plan: Plan,
    adapter: AdapterPlan,
    *,
    study_key: str,
    train: Train,
    say: Callable[[str], None],
    trials: int | None = None,
) -> tuple[TrainedAdapter, SearchOutcome]:
    """Run (or resume) the adapter's search; return its best trial's adapter under the adapter's own name,
    its spec carrying the best settings, and the search's outcome."""
    search = adapter.spec.search
    def trained_trial(params: dict[str, Any], number: int) -> TrainedAdapter:
        try:
            candidate = trial_plan(adapter, params)
        except ValidationError as exc:
            raise TrialFailed(f"invalid settings: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        config = finetune_config(plan, candidate)
        config["workflow_id"] = f"{plan.spec.name}-search-{adapter.name}-trial-{number:03d}"
        name = trial_config_file(adapter.name, number)
        path = plan.paths.configs_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != render(config):
            path.write_text(render(config))
        return train(candidate, name, config)

    scored: dict[int, TrainedAdapter] = {}

    def score(params: dict[str, Any], number: int) -> tuple[float, float | None]:
        trained = scored[number] = trained_trial(params, number)
        if search.objective == "loss":
            return validation_loss(trained), _train_seconds(trained)
        return validation_metric(plan, adapter, trained), _train_seconds(trained)

    baseline = own_values(adapter.spec, search) if search.baseline else None
    outcome = run_study(
        adapter.name, search, plan.paths.search_study(study_key), study_key, score, say, trials=trials, baseline=baseline
    )
    # the best trial was trained in this run or an earlier one: either way its adapter is in the cache
    best = scored.get(outcome.best.number) or trained_trial(outcome.best.params, outcome.best.number)
    shipped = replace(adapter, spec=apply(adapter.spec, outcome.best.params, adapter.name))
    return replace(best, plan=shipped, search=outcome.to_dict()), outcome


def _train_seconds(trained: TrainedAdapter) -> float | None:
    runtimes = [h["train_runtime"] for h in training_history(trained.folder) if "train_runtime" in h]
    return round(runtimes[-1], 1) if runtimes else None


def study_key(adapter: AdapterPlan, training_key: str) -> str:
    """What names the adapter's study: the adapter's own fine-tune (base, data, settings, packages) and its
    search, without the trial budget (raising `trials` continues the same study)."""
    search = adapter.spec.search
    return content_key({"finetune": training_key, "search": search.model_dump(exclude={"trials"})})
