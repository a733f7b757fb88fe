"""The evaluation entry points: `phi-pipeline run`'s (the staged bundle) and `phi-pipeline eval`'s."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from phi_pipeline.bundle.layout import MANIFEST
from phi_pipeline.errors import UsageError
from phi_pipeline.evaluate.gates import learning_record, record_gates
from phi_pipeline.evaluate.run import evaluate_bundle
from phi_pipeline.evaluate.tasks import tasks_from_manifest, tasks_from_plan

if TYPE_CHECKING:
    from phi_pipeline.pipeline_spec.plan import Plan


def peft_dirs_from_cache(manifest: Mapping[str, Any], cache_dir: Path) -> dict[str, Path]:
    """PEFT folders of a bundle's adapters in the content cache (cache_key recorded by the manifest); an entry
    that is missing or fails its integrity check is left out (and reported), never used."""
    from phi_pipeline.orchestration.cache import Cache

    cache = Cache(cache_dir)
    entries = {a["name"]: cache.get("adapters", a["cache_key"]) for a in manifest.get("adapters", []) if a.get("cache_key")}
    return {name: entry / "adapter" for name, entry in entries.items() if entry is not None}



def evaluate_staged(plan: "Plan", staged: Path, trained: Sequence[Any], *, enforced: bool) -> dict[str, Any]:
    """`phi-pipeline run`'s evaluation: the staged bundle against PyTorch + PEFT (required), gates
    checked, eval.json / report.md / charts written into the bundle and copied to the run folder
    (so a bundle refused by its gates still leaves its report behind). Returns the results."""
    results = gated_results(plan, staged, trained, enforced=enforced)
    return write_staged_report(plan, staged, trained, results)


def _record_learning(results: dict[str, Any], trained: Mapping[str, tuple[Sequence[Any], bool]]) -> None:
    """What the learned floor reads, per evaluated adapter: from its (training history, load_best_model_at_end)."""
    for name, (history, load_best) in trained.items():
        if name in results["adapters"]:
            results["adapters"][name]["learning"] = learning_record(history, load_best)


def gated_results(plan: "Plan", staged: Path, trained: Sequence[Any], *, enforced: bool) -> dict[str, Any]:
    """The staged bundle's figures against PyTorch + PEFT (required), gates checked; nothing written."""
    results = evaluate_bundle(
        staged,
        tasks_from_plan(plan),
        base_model=plan.base_model,
        peft_dirs={t.plan.name: t.folder / "adapter" for t in trained},
        trust_remote_code=plan.spec.base_model.trust_remote_code,
        require_pytorch=True,
    )
    from phi_pipeline.bundle.staging import training_history

    _record_learning(results, {t.plan.name: (training_history(t.folder), t.plan.spec.training.load_best_model_at_end)
                               for t in trained})
    record_gates(results, None, enforced=enforced)
    return results


def write_staged_report(plan: "Plan", staged: Path, trained: Sequence[Any], results: dict[str, Any]) -> dict[str, Any]:
    """eval.json / report.md / charts of `results` into the staged bundle and the run folder; the results."""
    import shutil

    from phi_pipeline.evaluate.report import CHARTS_DIR, EVAL_JSON, REPORT_MD, write_report

    searched = {t.plan.name: t.search for t in trained if t.search}
    if searched:
        results["search"] = searched
    write_report(
        staged,
        results,
        histories={t.plan.name: _history(t.folder) for t in trained},
        tensorboard={t.plan.name: t.folder / "tensorboard" if (t.folder / "tensorboard").is_dir() else None for t in trained},
    )
    copy = plan.paths.run_dir / "evaluation"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for name in (EVAL_JSON, REPORT_MD):
        shutil.copy2(staged / name, copy / name)
    if (staged / CHARTS_DIR).is_dir():
        shutil.copytree(staged / CHARTS_DIR, copy / CHARTS_DIR)
    results["report_copy"] = copy.as_posix()
    return results


def _history(folder: Path) -> list[dict[str, Any]]:
    from phi_pipeline.bundle.staging import training_history

    return training_history(folder)


def manifest_summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """The headline figures for manifest.json (eval.json has the rest)."""
    summary: dict[str, Any] = {"file": "eval.json", "report": "report.md",
                               "pytorch_reference": results["pytorch"]["available"], "adapters": {}}
    for name, r in results["adapters"].items():
        parity = r["adapter"]["parity"] or {}
        summary["adapters"][name] = {
            "metric": r["metric"],
            "examples": r["examples"],
            "base_onnx": (r["base"]["onnx"] or {}).get("metric"),  # None in a merged bundle: no base model
            "base_pytorch": (r["base"]["pytorch"] or {}).get("metric"),
            "adapter_onnx": r["adapter"]["onnx"]["metric"],
            "adapter_pytorch": (r["adapter"]["pytorch"] or {}).get("metric"),
            "perplexity_ratio": parity.get("perplexity_ratio"),
            "token_agreement": parity.get("token_agreement"),
        }
    return summary


def eval_cli(
    bundle: str,
    *,
    adapter: str | None = None,
    data: str | None = None,
    spec: str | None = None,
    cache_dir: str | None = None,
    onnx_only: bool = False,
    out: str | None = None,
) -> int:
    """`phi-pipeline eval`: evaluate a bundle on demand, print the table; 1 if a gate fails."""
    import json

    from phi_pipeline.evaluate.report import format_table, write_report
    from phi_pipeline.pipeline_spec.schema import load_spec

    folder = Path(bundle)
    if not (folder / MANIFEST).is_file():
        raise UsageError(bundle, [f"no {MANIFEST} here; give a folder published by phi-pipeline run"])
    manifest = json.loads((folder / MANIFEST).read_text())
    pipeline_spec = load_spec(spec) if spec else None
    tasks = tasks_from_manifest(manifest, spec=pipeline_spec, adapter=adapter, data_file=data)
    problems = [f"{t.eval_file}: eval split of adapter {t.adapter!r} not found" for t in tasks if t.missing()]
    if problems:
        raise UsageError(bundle, problems + ["run from the project root the bundle was built in, or pass --data"])
    cache = Path(cache_dir) if cache_dir else Path(pipeline_spec.work_dir if pipeline_spec else ".phi-pipeline") / "cache"
    base = None if onnx_only else manifest.get("base_model", {}).get("name_or_path")
    why_not = "--onnx-only" if onnx_only else _base_changed(manifest, cache)
    if why_not:
        base = None
    results = evaluate_bundle(
        folder,
        tasks,
        base_model=base,
        peft_dirs=peft_dirs_from_cache(manifest, cache),
        trust_remote_code=bool(pipeline_spec and pipeline_spec.base_model.trust_remote_code),
    )
    if why_not:
        results["pytorch"]["reason"] = why_not
    for name, r in results["adapters"].items():
        if r["eval_split_changed"]:
            print(
                f"warning: {r['eval_file']} (adapter {name!r}) is not the eval split the bundle was built with "
                "(sha256 differs from manifest.json); figures are not comparable with the bundle's eval.json",
                file=sys.stderr,
            )
    if not results["pytorch"]["available"]:
        print(
            f"note: evaluating the ONNX bundle only ({results['pytorch']['reason']}); "
            "gates that compare with PyTorch are not checked",
            file=sys.stderr,
        )
    _record_learning(results, {a["name"]: (a.get("training_history", []), a.get("training", {}).get("load_best_model_at_end", True))
                               for a in manifest.get("adapters", [])})
    failures = record_gates(results, None, enforced=True)
    if out:
        write_report(
            Path(out),
            results,
            histories={a["name"]: a.get("training_history", []) for a in manifest.get("adapters", [])},
            tensorboard={
                a["name"]: cache / "adapters" / a["cache_key"] / "tensorboard"
                for a in manifest.get("adapters", [])
                if a.get("cache_key") and (cache / "adapters" / a["cache_key"] / "tensorboard").is_dir()
            },
        )
    print(format_table(results))
    print(f"evaluated in {results['seconds']:.1f}s" + (f"; report in {out}" if out else ""))
    return 1 if failures else 0


def _base_changed(manifest: Mapping[str, Any], cache: Path) -> str | None:
    """Why the local base model cannot serve as the PyTorch reference any more, or None."""
    from phi_pipeline.orchestration.cache import DigestMemo, tree_sha256

    base = manifest.get("base_model", {})
    digest, path = base.get("digest"), base.get("name_or_path")
    if not digest or digest.startswith("hub:") or not path or not Path(path).is_dir():
        return None
    memo = DigestMemo(cache / "digests.json")  # the pipeline's memo: unchanged files are not re-hashed
    if tree_sha256(Path(path), memo) != digest:
        return f"the base model in {path} is not the one the bundle was built from (its files changed)"
    return None
