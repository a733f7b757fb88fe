"""The evaluation's outputs: eval.json (every figure), report.md (tables, gates, charts) and PNG charts.

Written into the staged bundle before its manifest lists the files, so the report ships with, and is
hashed like, the model it describes. TensorBoard logs stay beside the bundle's cache entry (bundles
are for devices); report.md gives their path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from phi_pipeline.pipeline_spec.schema import OBJECTIVE_NAMES

EVAL_JSON = "eval.json"
REPORT_MD = "report.md"
CHARTS_DIR = "report"
METRICS_CHART = f"{CHARTS_DIR}/metrics.png"
METRIC_LABEL = {"exact_match": "exact match (0-1)", "chrf": "chrF (0-100)"}


def loss_chart(adapter: str) -> str:
    return f"{CHARTS_DIR}/loss-{adapter}.png"


def write_report(
    folder: Path,
    results: Mapping[str, Any],
    *,
    histories: Mapping[str, list[dict[str, Any]]] | None = None,
    tensorboard: Mapping[str, Path | None] | None = None,
) -> list[Path]:
    """Write eval.json, report.md and the charts into `folder`; return the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    histories = histories or {}
    written = [folder / EVAL_JSON]
    (folder / EVAL_JSON).write_text(json.dumps(_finite(results), indent=2) + "\n")
    charts: dict[str, str] = {}
    if results.get("adapters"):
        plot_metrics(results, folder / METRICS_CHART)
        written.append(folder / METRICS_CHART)
    for name in results.get("adapters", {}):
        history = histories.get(name) or []
        if any("loss" in h or "eval_loss" in h for h in history):
            plot_training(name, history, folder / loss_chart(name))
            charts[name] = loss_chart(name)
            written.append(folder / loss_chart(name))
    search_charts: dict[str, str] = {}
    for name, outcome in (results.get("search") or {}).items():
        if any(t["objective"] is not None for t in outcome["trials"]):
            plot_search(outcome, folder / search_chart(name))
            search_charts[name] = search_chart(name)
            written.append(folder / search_chart(name))
    (folder / REPORT_MD).write_text(
        render_markdown(results, charts=charts, tensorboard=tensorboard or {}, search_charts=search_charts)
    )
    written.append(folder / REPORT_MD)
    return written


def _finite(value: Any) -> Any:
    """JSON has no Infinity/NaN: such figures (an overflowing perplexity) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ formatting


def fmt_metric(metric: str, value: float | None) -> str:
    from phi_pipeline.evaluate.metrics import fmt

    return fmt(metric, value)


def _num(value: float | None, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _diff(value: float | None) -> str:
    """Logit differences: fp32 exports agree to ~1e-6, quantized ones differ by ~0.1."""
    if value is None:
        return "n/a"
    return f"{value:.4f}" if value >= 1e-3 or value == 0 else f"{value:.1e}"


def _ppl(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}" if value < 1e4 else f"{value:.3e}"


def _rows(name: str, r: Mapping[str, Any]) -> list[list[str]]:
    metric = r["metric"]
    rows = []
    for variant, label in (("base", "base (no adapter)"), ("adapter", f"{name}")):
        v = r[variant]
        onnx, pt, par = v.get("onnx") or {}, v.get("pytorch") or {}, v.get("parity") or {}
        rows.append(
            [
                label,
                fmt_metric(metric, onnx.get("metric")),
                fmt_metric(metric, pt.get("metric")),
                _ppl(onnx.get("perplexity")),
                _ppl(pt.get("perplexity")),
                _num(par.get("perplexity_ratio")),
                _num(par.get("token_agreement")),
                _num(par.get("identical_outputs")),
                _diff(par.get("logit_max_abs_diff")),
                _diff(par.get("logit_mean_abs_diff")),
            ]
        )
    return rows


HEADER = [
    "model",
    "{m} ONNX",
    "{m} PyTorch",
    "ppl ONNX",
    "ppl PyTorch",
    "ppl ratio",
    "token agreement",
    "identical outputs",
    "max |Δlogit|",
    "mean |Δlogit|",
]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _gate_rows(results: Mapping[str, Any], adapter: str) -> list[list[str]]:
    rows = []
    for c in results.get("gates", {}).get("checks", []):
        if c["adapter"] != adapter:
            continue
        status = {True: "pass", False: "**FAIL**", None: "not checked"}[c["passed"]]
        rows.append([f"`{c['gate']}`", _num(c["bound"]), _num(c["value"]), status, c["message"]])
    return rows


def render_markdown(
    results: Mapping[str, Any],
    *,
    charts: Mapping[str, str],
    tensorboard: Mapping[str, Path | None],
    search_charts: Mapping[str, str] | None = None,
) -> str:
    b = results.get("bundle", {})
    gates = results.get("gates", {})
    torch_info = results.get("pytorch", {})
    out = [f"# Evaluation: {b.get('pipeline')} ({b.get('target')}, {b.get('precision')})", ""]
    if gates:
        verdict = "passed" if gates.get("passed") else "**FAILED**"
        enforced = "enforced" if gates.get("enforced") else "not enforced (published with --no-gate)"
        out.append(f"Publish gates: {verdict}, {enforced}.")
        out += [f"- {f}" for f in gates.get("failures", [])]
        out.append("")
    if torch_info.get("available"):
        out.append(
            f"ONNX bundle (greedy, on the runtime each adapter's section names) against the PyTorch reference: transformers + PEFT, "
            f"{torch_info.get('dtype')}, base `{torch_info.get('base_model')}`, same prompt token ids."
        )
    else:
        out.append(f"ONNX figures only: no PyTorch reference ({torch_info.get('reason')}).")
    out += ["", f"Evaluation took {results.get('seconds', 0):.1f}s.", ""]
    if results.get("adapters"):
        out += [f"![task metric per adapter]({METRICS_CHART})", ""]
    for name, r in results.get("adapters", {}).items():
        metric = r["metric"]
        out += [
            f"## Adapter `{name}`",
            "",
            f"{metric} on `{r['eval_file']}`: {r['examples']} examples, at most {r['max_new_tokens']} new tokens, "
            f"{r['answer_tokens']} reference answer tokens scored for perplexity."
            + (" **The eval split differs from the one the bundle was built with.**" if r.get("eval_split_changed") else ""),
            "",
            _md_table([h.format(m=metric) for h in HEADER], _rows(name, r)),
            "",
        ]
        out += _other_metrics(r) + _confusion(r)
        rt = r.get("runtime")
        if rt:
            out += [
                f"Bundle figures from {rt['runtime']}, {rt['provider']} on {rt['device']}"
                + (" (**CPU fallback**: the target's own execution provider did not run here)" if rt["cpu_fallback"] else "")
                + (" (the accelerator simulated on this host)" if rt.get("simulated") else "")
                + ".",
                "",
            ]
        gate_rows = _gate_rows(results, name)
        if gate_rows:
            out += [_md_table(["gate", "bound", "value", "result", "detail"], gate_rows), ""]
        samples = r.get("predictions", [])[:5]
        if samples:
            cols = ["line", "reference", "base ONNX", f"{name} ONNX"] + (
                [f"{name} PyTorch"] if "adapter_pytorch" in samples[0] else []
            )
            rows = [
                [str(s["line"]), s["reference"], s.get("base_onnx", ""), s.get("adapter_onnx", "")]
                + ([s.get("adapter_pytorch", "")] if "adapter_pytorch" in samples[0] else [])
                for s in samples
            ]
            out += [f"First {len(rows)} examples (all of them are in `{EVAL_JSON}`):", "", _md_table(cols, rows), ""]
        if name in charts:
            out += [f"![training and validation loss of {name}]({charts[name]})", ""]
        tb = tensorboard.get(name)
        if tb:
            out += [f"Training logs (TensorBoard, kept beside the cache entry, not shipped): `tensorboard --logdir {tb}`", ""]
        outcome = (results.get("search") or {}).get(name)
        if outcome:
            out += search_markdown(outcome, (search_charts or {}).get(name))
    if results.get("export_search"):
        out += export_search_markdown(results["export_search"])
    defs = results.get("definitions", {})
    if defs:
        out += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in defs.items()] + [""]
    return "\n".join(out)


def export_search_markdown(record: Mapping[str, Any]) -> list[str]:
    """The export search's section: every variant, its gates, its speed against the most accurate
    passing variant, and why it won or lost."""
    lens = [str(n) for n in record["prompt_tokens"]]
    where = record.get("machine", {})
    out = [
        "## Export search",
        "",
        f"Shipped: variant `{record['winner']}`. Rule: {record['rule']}. Timed in {record['rounds']} paired rounds "
        f"(prompt {', '.join(lens)} tokens, {record.get('new_tokens')} new tokens, first adapter active) on "
        f"{where.get('model', 'this machine')} ({where.get('cores')} cores, {' '.join(where.get('isa', [])) or 'ISA unknown'}; load average at the end "
        f"{', '.join(map(str, where.get('load_average', [])))})"
        + (", figures from the cache (`phi-pipeline run --remeasure` times them again)" if record.get("cached") else "")
        + ".",
        "",
    ]
    header = ["variant", "changes", "gates", "metric", "ppl ratio", "size MiB",
              *(f"decode tok/s @{n}" for n in lens), *(f"vs reference: decode @{n}" for n in lens),
              *(f"vs reference: first token @{n}" for n in lens), "outcome", "why"]
    rows = []
    for name, v in record["variants"].items():
        vs = v.get("vs_reference") or {}
        changes = ", ".join(f"{k}={x}" for k, x in v["changes"].items()) or "(the spec's settings)"
        rows.append([
            f"`{name}`", changes, "pass" if v["passed"] else "**FAIL**", _num(v["metric"]), _num(v["perplexity_ratio"]),
            f"{v['size_bytes'] / 2**20:.1f}" if v.get("size_bytes") else "",
            *(_num((v.get("decode_tok_s") or {}).get(n, {}).get("median"), ".1f") for n in lens),
            *(_spread(vs.get("decode", {}).get(n)) for n in lens),
            *(_spread(vs.get("first_token_speed", {}).get(n)) for n in lens),
            v["outcome"], v["why"],
        ])
    return out + [_md_table(header, rows), ""]


def _spread(s: Mapping[str, Any] | None) -> str:
    """A paired ratio as median [min-max]."""
    if not s or s.get("median") is None:
        return ""
    return f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"


def format_table(results: Mapping[str, Any]) -> str:
    """The figures as a plain-text table for the console."""
    header = ["adapter", "model", "metric", "ONNX", "PyTorch"] + HEADER[3:]
    rows = []
    for name, r in results.get("adapters", {}).items():
        for row in _rows(name, r):
            rows.append([name, row[0], r["metric"], *row[1:]])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    torch_info = results.get("pytorch", {})
    if not torch_info.get("available"):
        lines.append(f"(ONNX only: no PyTorch reference; {torch_info.get('reason')})")
    gates = results.get("gates")
    if gates:
        checks = gates.get("checks", [])
        failed = [c for c in checks if c["passed"] is False]
        unchecked = [c for c in checks if c["passed"] is None]
        lines.append(
            f"gates: {len(checks) - len(failed) - len(unchecked)} passed, {len(failed)} failed"
            + (f", {len(unchecked)} not checked (no PyTorch reference)" if unchecked else "")
        )
        lines += [f"  FAIL {c['message']}" for c in failed]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- charts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _other_metrics(r: dict[str, Any]) -> list[str]:
    """Every metric of eval.metric, for each runtime that ran (the table above shows the gate metric)."""
    names = r.get("metrics", [])
    if len(names) < 2:
        return []
    rows = []
    for variant in ("base", "adapter"):
        for runtime in ("onnx", "pytorch"):
            figures = r[variant].get(runtime)
            if figures and "metrics" in figures:
                rows.append([f"{variant} ({'ONNX' if runtime == 'onnx' else 'PyTorch'})"]
                            + [fmt_metric(m, figures["metrics"].get(m)) for m in names])
    return [_md_table(["model", *names], rows), ""] if rows else []


def _confusion(r: dict[str, Any]) -> list[str]:
    """The adapter's confusion table for label metrics (accuracy, f1): reference rows, answer columns."""
    labels = (r.get("adapter") or {}).get("labels")
    if not labels:
        return []
    rows = [[f"**{ref}**", *map(str, counts), f"{labels['f1'][ref]:.3f}"] for ref, counts in zip(labels["labels"], labels["confusion"])]
    return ["Confusion table of the adapter (rows: reference label, columns: answer):", "",
            _md_table(["reference \\ answer", *labels["columns"], "F1"], rows), ""]


def plot_training(adapter: str, history: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation loss against the optimizer step, from the trainer's log history."""
    plt = _pyplot()
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if train:
        ax.plot(*zip(*train), marker="o", markersize=3, label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="s", markersize=3, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(f"Fine-tuning loss: adapter '{adapter}'")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def plot_metrics(results: Mapping[str, Any], path: Path) -> None:
    """Per adapter: the task metric of the base model and of the adapter, ONNX and PyTorch side by side."""
    plt = _pyplot()
    adapters = results.get("adapters", {})
    n = len(adapters)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 0.6, 4.0), dpi=100, squeeze=False)
    colors = {"ONNX": "#1f77b4", "PyTorch": "#ff7f0e"}
    for ax, (name, r) in zip(axes[0], adapters.items()):
        metric = r["metric"]
        top = 1.0 if metric == "exact_match" else 100.0
        for i, variant in enumerate(("base", "adapter")):
            for j, (side, key) in enumerate((("ONNX", "onnx"), ("PyTorch", "pytorch"))):
                figures = r[variant].get(key)
                if not figures:
                    continue
                x = i + (j - 0.5) * 0.38
                bar = ax.bar(x, figures["metric"], width=0.36, color=colors[side], label=side if i == 0 else None)
                ax.bar_label(bar, labels=[fmt_metric(metric, figures["metric"])], padding=2, fontsize=8)
        ax.set_xticks([0, 1], ["base (no adapter)", f"adapter '{name}'"])
        ax.set_ylim(0, top * 1.12)
        ax.set_ylabel(METRIC_LABEL.get(metric, metric))
        ax.set_title(f"{name}: {metric} ({r['examples']} examples)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


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
    from matplotlib.ticker import MaxNLocator

    left.xaxis.set_major_locator(MaxNLocator(integer=True))
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
            from matplotlib.ticker import NullFormatter

            right.set_xscale("log")
            right.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a narrow log range overlap
        right.set_xlabel(axis)
        right.set_ylabel(objective)
        right.set_title(f"{objective} against {axis.split('.', 1)[1]}")
        right.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def format_search(outcome: Mapping[str, Any]) -> str:
    """A search's trials as a plain-text table for the console, the best marked with '*'."""
    paths = list(outcome["trials"][0]["params"]) if outcome["trials"] else []
    header = ["trial", *(p.split(".", 1)[1] for p in paths), OBJECTIVE_NAMES[outcome["objective"]], "train s", "state"]
    rows = [
        [f"{t['number']}{'*' if t['number'] == outcome['best_trial'] else ''}"]
        + [_value(t["params"].get(p)) for p in paths]
        + [_value(t["objective"]), _value(t.get("train_seconds")), t["state"] + (f": {t['reason']}" if t.get("reason") else "")]
        for t in outcome["trials"]
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = [f"search {outcome['adapter']} ({outcome['strategy']}): best trial {outcome['best_trial']} (*)"]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(2, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
