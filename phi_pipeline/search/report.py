"""A search's part of report.md: every trial in a table, the best marked, and its chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from phi_pipeline.report import CHARTS_DIR, _md_table, _pyplot
from phi_pipeline.search.study import OBJECTIVE_NAMES


def search_chart(adapter: str) -> str:
    return f"{CHARTS_DIR}/search-{adapter}.png"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def search_markdown(outcome: Mapping[str, Any], chart: str | None) -> list[str]:
    """Markdown lines: what was searched, the trial table (best in bold) and the chart."""
    trials = outcome["trials"]
    paths = list(trials[0]["params"]) if trials else []
    objective = OBJECTIVE_NAMES[outcome["objective"]]
    better = "lower" if outcome["direction"] == "minimize" else "higher"
    out = [
        f"### Search: {len(trials)} trials, strategy {outcome['strategy']}, ranked by {objective} ({better} is better)",
        "",
        f"Best: trial {outcome['best_trial']} ({objective} {_value(outcome['best_objective'])}); its adapter is the "
        "one published, with " + ", ".join(f"`{k}` = {_value(v)}" for k, v in outcome["best_params"].items()) + ".",
        "",
    ]
    rows = []
    for t in trials:
        best = t["number"] == outcome["best_trial"]
        mark = (lambda s: f"**{s}**") if best else (lambda s: s)
        state = t["state"] + (f": {t['reason']}" if t.get("reason") else "")
        rows.append(
            [mark(str(t["number"]) + (" (best)" if best else ""))]
            + [mark(_value(t["params"].get(p))) for p in paths]
            + [mark(_value(t["objective"])), _value(t.get("train_seconds")), state]
        )
    out += [_md_table(["trial", *paths, objective, "training s", "state"], rows), ""]
    if chart:
        out += [f"![search of {outcome['adapter']}]({chart})", ""]
    return out


def plot_search(outcome: Mapping[str, Any], path: Path) -> None:
    """Left: the objective of each trial in order, with the best so far. Right: objective against the
    learning rate when it was searched (else against the first searched setting)."""
    plt = _pyplot()
    done = [t for t in outcome["trials"] if t["objective"] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=100)
    objective = OBJECTIVE_NAMES[outcome["objective"]]
    pick = min if outcome["direction"] == "minimize" else max
    xs = [t["number"] for t in done]
    ys = [t["objective"] for t in done]
    left.plot(xs, ys, "o", label="trial")
    running = [pick(ys[: i + 1]) for i in range(len(ys))]
    left.step(xs, running, where="post", label="best so far")
    failed = [t["number"] for t in outcome["trials"] if t["objective"] is None]
    if failed and ys:
        left.plot(failed, [max(ys)] * len(failed), "x", color="red", label="failed")
    left.set_xlabel("trial")
    left.set_ylabel(objective)
    left.set_title(f"Search of '{outcome['adapter']}'")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    params = list(outcome["trials"][0]["params"]) if outcome["trials"] else []
    axis = "training.learning_rate" if "training.learning_rate" in params else (params[0] if params else None)
    if axis:
        right.plot([t["params"][axis] for t in done], ys, "o")
        if axis == "training.learning_rate":
            right.set_xscale("log")
        right.set_xlabel(axis)
        right.set_ylabel(objective)
        right.set_title(f"{objective} against {axis.split('.', 1)[1]}")
        right.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
