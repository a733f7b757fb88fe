"""One adapter's search as an Optuna study: ask, train through a callback, tell; resumable from storage.

The study lives in SQLite under the work dir, named by everything that defines the search except
its trial budget: re-running a finished search asks nothing, raising `trials` asks only the new
ones, and a search killed mid-trial asks that trial again with the same settings. Trials are
trained through the pipeline's content-keyed cache, so a trial trained before is never retrained.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from phi_pipeline.errors import PipelineError
from phi_pipeline.search.space import describe, grid_points, grid_size, sampler, suggest
from phi_pipeline.pipeline_spec.schema import OBJECTIVE_NAMES, SearchSpec


class TrialFailed(Exception):
    """A trial that could not be scored (training failed, diverged, ran out of memory): recorded, not fatal."""


@dataclass(frozen=True)
class TrialRecord:
    number: int
    params: dict[str, Any]
    state: str
    """complete | failed"""
    objective: float | None
    train_seconds: float | None
    reason: str | None


@dataclass(frozen=True)
class SearchOutcome:
    adapter: str
    strategy: str
    objective: str
    direction: str
    trials: list[TrialRecord]
    best: TrialRecord

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "strategy": self.strategy,
            "objective": self.objective,
            "direction": self.direction,
            "best_trial": self.best.number,
            "best_params": self.best.params,
            "best_objective": self.best.objective,
            "trials": [asdict(t) for t in self.trials],
        }


# What a trial's training callback returns: the objective and the training time in seconds.
TrainTrial = Callable[[dict[str, Any], int], tuple[float, float | None]]


def run_study(
    adapter: str,
    search: SearchSpec,
    storage: Path,
    study_name: str,
    train: TrainTrial,
    say: Callable[[str], None],
    trials: int | None = None,
    baseline: dict[str, Any] | None = None,
) -> SearchOutcome:
    """Run the search until `trials` (default: the spec's; grid: every combination) have finished; a new
    study's first trial is `baseline` (the adapter's own settings) when given."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    direction = "minimize" if search.objective == "loss" else "maximize"
    storage.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=f"sqlite:///{storage}", study_name=study_name, direction=direction, load_if_exists=True
    )
    if baseline is not None and not study.trials:
        study.enqueue_trial(baseline)
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # left RUNNING by a killed run: failed without a reason (so not counted), its settings asked again
        study.tell(stale.number, state=TrialState.FAIL)
        study.enqueue_trial(stale.params)
        say(f"search {adapter}: trial {stale.number} was interrupted; asking its settings again")

    budget = grid_size(search) if search.strategy == "grid" else (trials or search.trials)
    finished = _finished(study)
    while len(finished) < budget:
        study.sampler = sampler(search, len(finished))
        if search.strategy == "grid" and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            done = [t.params for t in finished]
            study.enqueue_trial(next(p for p in grid_points(search) if p not in done))
        trial = study.ask()
        params = suggest(trial, search)
        start = time.perf_counter()
        try:
            objective, seconds = train(params, trial.number)
            if not math.isfinite(objective):
                raise TrialFailed(f"{OBJECTIVE_NAMES[search.objective]} is {objective} (diverged)")
        except (TrialFailed, PipelineError) as exc:
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            trial.set_user_attr("reason", reason)
            study.tell(trial, state=TrialState.FAIL)
            outcome = f"failed: {reason}"
        else:
            trial.set_user_attr("train_seconds", seconds)
            study.tell(trial, objective)
            outcome = f"{OBJECTIVE_NAMES[search.objective]} {objective:.4g}"
        finished = _finished(study)
        best = _best(study)
        best_text = f"best {best.values[0]:.4g} (trial {best.number})" if best else "no trial scored yet"
        say(
            f"search {adapter}: trial {len(finished)}/{budget} (#{trial.number}) {describe(params)} -> {outcome}; "
            f"{best_text}; {time.perf_counter() - start:.1f}s"
        )

    records = [_record(t) for t in finished]
    best = _best(study)
    if best is None:
        raise PipelineError(
            f"search {adapter}: every one of {len(records)} trials failed; nothing was published:\n"
            + "\n".join(f"  - trial {r.number} ({describe(r.params)}): {r.reason}" for r in records)
        )
    return SearchOutcome(
        adapter=adapter,
        strategy=search.strategy,
        objective=search.objective,
        direction=direction,
        trials=records,
        best=_record(best),
    )


def _finished(study) -> list:
    from optuna.trial import TrialState

    # a failed trial without a reason is one a killed run left behind, asked again since
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
        if t.state == TrialState.COMPLETE or "reason" in t.user_attrs
    ]


def _best(study):
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    pick = min if study.direction.name == "MINIMIZE" else max
    # ties go to the earliest trial, so the pick does not depend on storage order
    return pick(complete, key=lambda t: (t.values[0], -t.number) if pick is max else (t.values[0], t.number))


def _record(t) -> TrialRecord:
    complete = t.state.name == "COMPLETE"
    return TrialRecord(
        number=t.number,
        params=dict(t.params),
        state="complete" if complete else "failed",
        objective=t.values[0] if complete else None,
        train_seconds=t.user_attrs.get("train_seconds"),
        reason=t.user_attrs.get("reason"),
    )
