"""A spec's search space in Optuna's terms, and a trial's settings applied to an adapter's spec."""

from __future__ import annotations

import itertools
from typing import Any

from phi_pipeline.pipeline_spec.schema import AdapterSpec, SearchChoices, SearchSpec, _field_types, _searched_field

# TPE proposes at random until this many trials have finished, then from their results. Optuna's
# default (10) assumes budgets of 50+ trials; a fine-tune search runs a dozen.
TPE_STARTUP_TRIALS = 4


def sampler(search: SearchSpec, trial_number: int):
    """The sampler that proposes trial `trial_number`, seeded by (seed, trial number): a resumed study
    proposes what an uninterrupted one would have, given the same finished trials."""
    import optuna

    seed = search.seed + trial_number
    # grid: run_study enqueues each combination itself (grid_points), so the sampler only has fixed values to
    # return. Optuna's GridSampler is not used: under ask-and-tell with a sampler per trial it revisited
    # combinations and left others out, and it calls Study.stop() when the grid is done, which raises outside
    # Study.optimize.
    if search.strategy in ("grid", "random"):
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS)


def grid(search: SearchSpec) -> dict[str, list[Any]]:
    """strategy grid: every listed value of every path (the spec refuses ranges with grid)."""
    return {path: list(dim.choices) for path, dim in search.space.items() if isinstance(dim, SearchChoices)}


def grid_points(search: SearchSpec) -> list[dict[str, Any]]:
    """strategy grid: every combination of the listed values, in the spec's order."""
    values = grid(search)
    return [dict(zip(values, combination)) for combination in itertools.product(*values.values())]


def grid_size(search: SearchSpec) -> int:
    return len(grid_points(search))


def suggest(trial, search: SearchSpec) -> dict[str, Any]:
    """Ask an Optuna trial for one value per path of the space."""
    params: dict[str, Any] = {}
    for path, dim in search.space.items():
        if isinstance(dim, SearchChoices):
            params[path] = trial.suggest_categorical(path, dim.choices)
        elif float in _field_types(_searched_field(path)):
            params[path] = trial.suggest_float(path, dim.low, dim.high, log=dim.log, step=dim.step)
        else:
            params[path] = trial.suggest_int(path, int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
    return params


def own_values(spec: AdapterSpec, search: SearchSpec) -> dict[str, Any] | None:
    """The adapter's own values of the searched settings, when the space holds every one of them."""
    values = {}
    for path, dim in search.space.items():
        block, _, key = path.partition(".")
        value = getattr(getattr(spec, block), key)
        inside = value in dim.choices if isinstance(dim, SearchChoices) else (
            value is not None and dim.low <= value <= dim.high
        )
        if not inside:
            return None
        values[path] = value
    return values


def apply(spec: AdapterSpec, params: dict[str, Any], name: str) -> AdapterSpec:
    """The adapter's spec with a trial's settings (and a trial name); pydantic's ValueError when the
    combination is invalid (e.g. a searched max_steps next to epochs)."""
    data = spec.model_dump()
    for path, value in params.items():
        block, _, key = path.partition(".")
        data[block][key] = value
    data["name"] = name
    data["search"] = None
    return AdapterSpec.model_validate(data)


def describe(params: dict[str, Any]) -> str:
    return " ".join(f"{path.split('.', 1)[1]}={_short(v)}" for path, v in params.items())


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
