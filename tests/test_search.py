"""Hyperparameter search: spec blocks, reproducible sampling, resume, failures, budgets."""

from __future__ import annotations

import math

import pytest

from phi_pipeline.errors import PipelineError, UsageError
from phi_pipeline.search.space import apply, grid_size
from phi_pipeline.search.study import TrialFailed, run_study
from phi_pipeline.pipeline_spec.schema import SearchSpec, parse_spec

SPEC = """\
name: demo
base_model: {name_or_path: models/base}
training: {max_steps: 10}
search:
  strategy: tpe
  trials: 4
  space:
    training.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}
    lora.r: {choices: [4, 8, 16]}
adapters:
  - name: first
    data: {train: a.jsonl, eval: b.jsonl, messages_field: messages}
  - name: second
    data: {train: c.jsonl, eval: d.jsonl, messages_field: messages}
    search: {trials: 2, space: {training.batch_size: {choices: [8, 16]}}}
  - name: third
    data: {train: c.jsonl, eval: d.jsonl, messages_field: messages}
    search: {enabled: false}
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(UsageError) as info:
        parse_spec(text, source="spec.yaml")
    return info.value.problems


def search(**overrides) -> SearchSpec:
    space = {"training.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "lora.r": {"choices": [4, 8, 16]}}
    return SearchSpec.model_validate({"trials": 6, "seed": 3, "space": space, **overrides})


def test_search_block_is_inherited_key_by_key_and_space_replaced_whole():
    first, second, third = parse_spec(SPEC).adapters
    assert first.search.trials == 4 and set(first.search.space) == {"training.learning_rate", "lora.r"}
    assert second.search.trials == 2 and second.search.strategy == "tpe"
    assert set(second.search.space) == {"training.batch_size"}
    assert third.search.enabled is False


def test_search_absent_everywhere_leaves_adapters_without_search():
    top, _, rest = SPEC.partition("search:\n")
    text = top + rest[rest.index("adapters:") :]
    text = text.replace("    search: {trials: 2, space: {training.batch_size: {choices: [8, 16]}}}\n", "")
    text = text.replace("    search: {enabled: false}\n", "")
    spec = parse_spec(text)
    assert spec.search is None and all(a.search is None for a in spec.adapters)


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ("lora.colour: {choices: [1]}", "'lora.colour' is not a lora or training setting"),
        ("lora.target_modules: {choices: [q]}", "'lora.target_modules' cannot be searched"),
        ("training.torch_dtype: {low: 1, high: 2}", "training.torch_dtype: a range needs a numeric setting"),
        ("training.batch_size: {low: 1.5, high: 4}", "an integer setting needs whole low, high and step"),
        ("lora.r: {choices: [4, 0]}", "lora.r: choice 0 is not a valid value"),
        ("training.learning_rate: {low: 0.1, high: 0.01}", "low (0.1) must be below high (0.01)"),
        ("training.learning_rate: {low: 0, high: 0.01, log: true}", "log: true needs low > 0"),
    ],
)
def test_search_space_errors_name_the_path(space, expected):
    text = SPEC.replace("lora.r: {choices: [4, 8, 16]}", space)
    problems = problems_of(text)
    assert any(expected in p for p in problems), problems
    assert all(p.startswith("line ") for p in problems)


def test_search_errors_reported_with_other_spec_errors():
    text = SPEC.replace("lora.r: {choices: [4, 8, 16]}", "lora.colour: {choices: [1]}").replace(
        "training: {max_steps: 10}", "training: {max_steps: -1}"
    )
    problems = problems_of(text)
    assert any("lora.colour" in p for p in problems) and any("max_steps" in p for p in problems)
    assert sum("lora.colour" in p for p in problems) == 1  # inherited by two adapters, reported once


def test_search_empty_space_is_refused():
    text = SPEC.replace(
        "  space:\n    training.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\n    lora.r: {choices: [4, 8, 16]}\n",
        "  space: {}\n",
    )
    problems = problems_of(text)
    assert any("space is empty" in p for p in problems), problems


def test_search_grid_trains_every_combination_once_and_finishes(tmp_path):
    from phi_pipeline.search.study import run_study

    grid = SearchSpec.model_validate({"strategy": "grid", "objective": "metric", "baseline": False, "space": {
        "training.learning_rate": {"choices": [0.002, 0.003, 0.004]}, "training.seed": {"choices": [42, 1]}}})
    seen = []

    def train(params, number):
        seen.append(params)
        return params["training.learning_rate"], 1.0

    outcome = run_study("a", grid, tmp_path / "s.sqlite3", "k", train, lambda _: None)
    assert seen == [{"training.learning_rate": lr, "training.seed": seed} for lr in (0.002, 0.003, 0.004) for seed in (42, 1)]
    assert outcome.best.params == {"training.learning_rate": 0.004, "training.seed": 42}
    # a rerun of a finished grid trains nothing more
    run_study("a", grid, tmp_path / "s.sqlite3", "k", train, lambda _: None)
    assert len(seen) == 6


def test_search_grid_refuses_ranges_and_counts_combinations():
    with pytest.raises(ValueError, match="strategy grid tries listed values only"):
        search(strategy="grid")
    grid = SearchSpec.model_validate(
        {"strategy": "grid", "space": {"lora.r": {"choices": [4, 8]}, "training.batch_size": {"choices": [8, 16, 32]}}}
    )
    assert grid_size(grid) == 6


def test_search_apply_sets_dotted_paths_and_validates():
    adapter = parse_spec(SPEC).adapters[0]
    trial = apply(adapter, {"lora.r": 16, "training.learning_rate": 0.001}, "first.trial")
    assert (trial.lora.r, trial.training.learning_rate, trial.name, trial.search) == (16, 0.001, "first.trial", None)
    with pytest.raises(ValueError, match="max_steps or epochs"):
        apply(adapter, {"training.epochs": 2.0}, "first.trial")


def _objective(params):
    return abs(math.log10(params["training.learning_rate"]) + 2.5) + params["lora.r"] / 100


def _trainer(calls, fail=lambda n: False):
    def train(params, number):
        calls.append((number, params))
        if fail(number):
            raise TrialFailed("CUDA out of memory")
        return _objective(params), 1.5

    return train


def test_search_sampling_is_reproducible_for_a_seed(tmp_path):
    runs = []
    for i in range(2):
        calls = []
        run_study("a", search(), tmp_path / f"{i}.db", "study", _trainer(calls), lambda _: None)
        runs.append([p for _, p in calls])
    assert runs[0] == runs[1] and len(runs[0]) == 6
    other = []
    run_study("a", search(seed=4), tmp_path / "other.db", "study", _trainer(other), lambda _: None)
    assert [p for _, p in other] != runs[0]


def test_search_rerun_trains_nothing_and_more_trials_train_only_new_ones(tmp_path):
    calls = []
    first = run_study("a", search(), tmp_path / "s.db", "study", _trainer(calls), lambda _: None)
    assert len(calls) == 6
    again = run_study("a", search(), tmp_path / "s.db", "study", _trainer(calls), lambda _: None)
    assert len(calls) == 6 and again.best == first.best
    more = run_study("a", search(), tmp_path / "s.db", "study", _trainer(calls), lambda _: None, trials=9)
    assert len(calls) == 9 and len(more.trials) == 9
    assert [n for n, _ in calls[6:]] == [6, 7, 8]


def test_search_failed_trial_is_recorded_and_search_goes_on(tmp_path):
    calls, lines = [], []
    outcome = run_study("a", search(), tmp_path / "s.db", "study", _trainer(calls, lambda n: n == 1), lines.append)
    failed = [t for t in outcome.trials if t.state == "failed"]
    assert [t.number for t in failed] == [1] and failed[0].reason == "CUDA out of memory"
    assert len(outcome.trials) == 6 and outcome.best.state == "complete"
    assert outcome.best.objective == min(t.objective for t in outcome.trials if t.objective is not None)
    assert any("failed: CUDA out of memory" in line for line in lines)


def test_search_nan_objective_is_a_failed_trial(tmp_path):
    def train(params, number):
        return (float("nan") if number == 0 else 1.0), None

    outcome = run_study("a", search(trials=2), tmp_path / "s.db", "study", train, lambda _: None)
    assert outcome.trials[0].state == "failed" and "diverged" in outcome.trials[0].reason


def test_search_every_trial_failing_stops_with_the_reasons(tmp_path):
    with pytest.raises(PipelineError, match="every one of 3 trials failed") as info:
        run_study("a", search(trials=3), tmp_path / "s.db", "study", _trainer([], lambda n: True), lambda _: None)
    assert "CUDA out of memory" in str(info.value)


def test_search_interrupted_trial_is_asked_again_with_its_settings(tmp_path):
    calls = []

    def killed(params, number):
        calls.append((number, params))
        if number == 2:
            raise KeyboardInterrupt  # the run is killed during trial 2
        return _objective(params), 1.0

    with pytest.raises(KeyboardInterrupt):
        run_study("a", search(), tmp_path / "s.db", "study", killed, lambda _: None)
    interrupted = calls[-1][1]
    resumed = []
    outcome = run_study("a", search(), tmp_path / "s.db", "study", _trainer(resumed), lambda _: None)
    assert resumed[0][1] == interrupted  # the interrupted settings first, then new ones
    assert len(resumed) == 4 and len(outcome.trials) == 6
    uninterrupted = []
    run_study("a", search(), tmp_path / "u.db", "study", _trainer(uninterrupted), lambda _: None)
    assert [p for _, p in calls[:2] + resumed] == [p for _, p in uninterrupted]


def test_search_report_marks_the_best_trial_and_draws_the_chart(tmp_path):
    from phi_pipeline.evaluate.report import plot_search, search_markdown

    outcome = run_study(
        "a", search(trials=4), tmp_path / "s.db", "study", _trainer([], lambda n: n == 2), lambda _: None
    ).to_dict()
    text = "\n".join(search_markdown(outcome, "report/search-a.png"))
    best = outcome["best_trial"]
    assert f"| **{best} (best)** |" in text
    assert text.count("\n| ") == 1 + 4  # header + one row per trial (separator row starts with '|---')
    assert "failed: CUDA out of memory" in text
    plot_search(outcome, tmp_path / "search.png")
    assert (tmp_path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_baseline_trial_is_the_adapters_own_recipe_when_the_space_holds_it(tmp_path):
    from phi_pipeline.search.space import own_values

    adapter = parse_spec(SPEC).adapters[0]  # lr 2e-4 (default), r 8: both inside the space
    baseline = own_values(adapter, adapter.search)
    assert baseline == {"training.learning_rate": 2e-4, "lora.r": 8}
    calls = []
    run_study("a", search(), tmp_path / "s.db", "study", _trainer(calls), lambda _: None, baseline=baseline)
    assert calls[0][1] == baseline and len(calls) == 6
    outside = parse_spec(SPEC.replace("training: {max_steps: 10}", "training: {max_steps: 10, learning_rate: 0.5}"))
    assert own_values(outside.adapters[0], outside.adapters[0].search) is None
