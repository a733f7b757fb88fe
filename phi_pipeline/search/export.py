"""The export search: which export of the trained adapters ships (the spec's `export.search`).

Each variant is the spec's export settings with one candidate's changes (variant `spec`: none),
exported through the same Olive workflow and staged like any bundle. The orchestration
(pipeline.py) gates every variant on the eval splits; this module times the passing ones and
applies the choice rule:

1. Variants that fail a publish gate are out.
2. The most accurate passing variant is the reference: highest mean gate metric over the adapters,
   then lowest mean ONNX/PyTorch perplexity ratio; a tie keeps the spec's order (`spec` first).
3. Every passing variant runs once per timing round, in a shuffled order (evaluate/speed.py), each
   round's figures paired: decode tokens/s and first-token speed relative to the reference. A control
   row runs the reference a second time in every round: its ratios against the reference measure
   this machine's noise.
4. A variant is *faster* when evaluate/speed.py's verdict rule calls one of the two `faster` and
   neither `slower` (beyond the noise at every prompt length, in 80 % of the rounds) and its
   speed-up (geometric mean of the median ratios) is beyond the noise too.
5. The winner is the faster variant with the largest speed-up (ties: the more accurate). The
   reference wins when none is faster (a model so small that per-request overhead dominates) or when
   the control is not `no measurable change` against the reference (a machine too busy to time: the
   same bundle measured faster or slower than itself). Accuracy is never traded for a difference the
   machine cannot show.

Timed requests run with the first adapter active, as an adapter bundle is used.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, Callable

from phi_pipeline.orchestration.cache import Cache, content_key, file_sha256
from phi_pipeline.orchestration.configs import EXPORT_FILE, variant_file
from phi_pipeline.orchestration.diskspace import tree_size
from phi_pipeline.orchestration.progress import Stages
from phi_pipeline.orchestration.trained import TrainedAdapter
from phi_pipeline.bundle.layout import ADAPTERS_DIR
from phi_pipeline.errors import PipelineError
from phi_pipeline.evaluate.speed import CONSISTENT, NOISE, cpu, measure_rounds, random_prompt, time_request, verdict
from phi_pipeline.evaluate.stats import load_average, per_round_ratios, summary
from phi_pipeline.pipeline_spec.plan import Plan, variant_plan
from phi_pipeline.pipeline_spec.schema import CONTROL_ROW, SPEC_VARIANT, ExportSearchSpec
from phi_pipeline.versions import package_versions

WARMUP = (16, 8)  # prompt tokens, new tokens of each load's untimed first request
RECORD_FILE = "record.json"  # an export-search cache entry's one file


@dataclass(frozen=True)
class Variant:
    """One export variant and how it fared at the gates."""

    name: str
    changes: dict[str, Any]
    """Export keys that differ from the spec's (empty for `spec`)."""
    passed: bool
    failures: list[str] = field(default_factory=list)
    metric: float | None = None
    """Mean over the adapters of the ONNX gate metric on the eval split."""
    perplexity_ratio: float | None = None
    """Mean over the adapters of ONNX / PyTorch perplexity of the eval answers."""
    token_agreement: float | None = None
    size_bytes: int | None = None
    built: bool = True
    """False: the variant could not be exported, staged or loaded (its failures say why)."""


def from_results(name: str, changes: dict[str, Any], results: dict[str, Any], size_bytes: int) -> Variant:
    """A variant's standing from its evaluation results (evaluate_bundle + record_gates)."""

    def mean(values: list[Any]) -> float | None:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    adapters = results["adapters"].values()
    return Variant(
        name=name,
        changes=changes,
        passed=bool(results["gates"]["passed"]),
        failures=list(results["gates"]["failures"]),
        metric=mean([a["adapter"]["onnx"]["metric"] for a in adapters]),
        perplexity_ratio=mean([(a["adapter"]["parity"] or {}).get("perplexity_ratio") for a in adapters]),
        token_agreement=mean([(a["adapter"]["parity"] or {}).get("token_agreement") for a in adapters]),
        size_bytes=size_bytes,
    )


def accuracy(v: Variant) -> tuple[float, float]:
    """Sort key, higher is more accurate: gate metric, then perplexity ratio (lower is better)."""
    return (v.metric if v.metric is not None else -math.inf,
            -v.perplexity_ratio if v.perplexity_ratio is not None else -math.inf)


def time_variants(
    bundles: dict[str, Path], adapter: str | None, search: ExportSearchSpec, say: Callable[[str], None]
) -> dict[str, list[dict[str, Any]]]:
    """Per variant, one result per round: {prompt length: {ttft_s, decode_tok_s}}. Each round loads the
    bundle afresh (one model in memory at a time) and warms it up before the timed requests."""
    from phi_pipeline.runtime.genai import BundleModel

    def run_row(name: str, _round: int) -> dict[str, Any]:
        model = BundleModel(bundles[name])
        try:
            time_request(model, random_prompt(WARMUP[0], model.vocab_size), WARMUP[1], adapter)
            out = {}
            for n in search.prompt_tokens:
                t = time_request(model, random_prompt(n, model.vocab_size), search.new_tokens, adapter)
                out[str(n)] = {"ttft_s": t.ttft_s, "decode_tok_s": t.decode_tok_s}
            return out
        finally:
            del model

    said: set[str] = set()

    def each_round(message: str) -> None:  # "round i/n: <row>": one line per round, not per row
        head = message.partition(":")[0]
        if head not in said:
            said.add(head)
            say(f"timing export variants, {head}")

    return measure_rounds(list(bundles), run_row, search.rounds, each_round)


def _speedup(decode: list[list[float]], first: list[list[float]]) -> float:
    """Geometric mean of the median paired ratios (decode and first-token speed, every prompt length)."""
    medians = [median(r) for r in (*decode, *first) if r]
    return math.exp(sum(math.log(m) for m in medians) / len(medians)) if medians else 1.0


def machine() -> dict[str, Any]:
    """What the timings were taken on (a search re-times on another machine: it is in the cache key)."""
    return {**cpu(), "system": platform.system()}


def reference_of(variants: list[Variant]) -> Variant | None:
    """The most accurate passing variant (None when none passed)."""
    passing = [v for v in variants if v.passed]
    return max(passing, key=accuracy) if passing else None


def _paired(runs: list[dict[str, Any]], against: list[dict[str, Any]], lens: list[str]) -> dict[str, Any]:
    """Per-round ratios of `runs` to `against` at each prompt length, their verdicts and the speed-up."""
    decode = [per_round_ratios(runs, against, n, "decode_tok_s") for n in lens]
    first = [per_round_ratios(runs, against, n, "ttft_s", invert=True) for n in lens]
    return {
        "decode": {n: summary(r) for n, r in zip(lens, decode)},
        "first_token_speed": {n: summary(r) for n, r in zip(lens, first)},
        "decode_verdict": verdict(decode),
        "first_token_verdict": verdict(first),
        "speedup": round(_speedup(decode, first), 4),
    }


def choose(
    variants: list[Variant], rounds: dict[str, list[dict[str, Any]]], search: ExportSearchSpec,
    control: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The choice rule (module docstring) over gated, timed variants: the search's record, with
    `winner` (None when no variant passed) and, per variant, its figures and why it won or lost.
    `control`: the control row's rounds and those of the row it repeats (default: rounds[CONTROL_ROW] and
    the reference's)."""
    lens = [str(n) for n in search.prompt_tokens]
    reference = reference_of(variants)
    if control is None and reference is not None and rounds.get(CONTROL_ROW):
        control = (rounds[CONTROL_ROW], rounds[reference.name])
    noise = _paired(*control, lens) if control else None
    too_noisy = noise is not None and {noise["decode_verdict"], noise["first_token_verdict"]} != {"no measurable change"}
    rows: dict[str, dict[str, Any]] = {}
    faster: list[tuple[float, Variant]] = []
    for v in variants:
        row: dict[str, Any] = {
            "changes": v.changes, "passed": v.passed, "failures": v.failures, "metric": v.metric,
            "perplexity_ratio": v.perplexity_ratio, "token_agreement": v.token_agreement, "size_bytes": v.size_bytes,
        }
        runs = rounds.get(v.name, [])
        if runs:
            row["decode_tok_s"] = {n: summary([r[n]["decode_tok_s"] for r in runs if n in r], digits=2) for n in lens}
            row["ttft_s"] = {n: summary([r[n]["ttft_s"] for r in runs if n in r]) for n in lens}
        if reference is not None and v.passed and v is not reference:
            vs = row["vs_reference"] = _paired(runs, rounds[reference.name], lens)
            verdicts = {vs["decode_verdict"], vs["first_token_verdict"]}
            if "faster" in verdicts and "slower" not in verdicts and vs["speedup"] > 1 + NOISE and not too_noisy:
                drop = _metric_drop(v, reference)
                if search.max_metric_drop is not None and drop is not None and drop > search.max_metric_drop:
                    row["too_inaccurate"] = f"its metric trails {reference.name!r}'s by {drop:.3f} > max_metric_drop " \
                                            f"{search.max_metric_drop}"
                else:
                    faster.append((vs["speedup"], v))
        rows[v.name] = row

    winner = max(faster, key=lambda f: (f[0], accuracy(f[1])))[1] if faster else reference
    for v in variants:
        rows[v.name]["outcome"] = "won" if v is winner else "lost"
        rows[v.name]["why"] = _why(v, winner, reference, rows, too_noisy)
    return {
        "winner": winner.name if winner else None,
        "reference": reference.name if reference else None,
        "rule": f"fastest passing variant; faster means decode or first-token speed beyond ±{100 * NOISE:.0f} % of the "
                f"most accurate passing variant's, with that sign in at least {100 * CONSISTENT:.0f} % of the rounds, "
                f"the other not slower and the combined speed-up beyond {100 * NOISE:.0f} %; none faster, or a control "
                "(the most accurate variant timed twice) that differs from itself: the most accurate passing variant",
        "control": noise,
        "prompt_tokens": list(search.prompt_tokens),
        "new_tokens": search.new_tokens,
        "rounds": max((len(r) for r in rounds.values()), default=0),
        "variants": rows,
    }


def _metric_drop(v: Variant, reference: Variant) -> float | None:
    return reference.metric - v.metric if reference.metric is not None and v.metric is not None else None


def _why(v: Variant, winner: Variant | None, reference: Variant | None, rows: dict[str, dict[str, Any]],
         too_noisy: bool) -> str:
    if not v.passed:
        return ("failed a publish gate: " if v.built else "failed: ") + "; ".join(v.failures)
    vs = rows[v.name].get("vs_reference")
    if v is winner:
        if v is not reference:
            return (f"fastest passing: x{vs['speedup']:.2f} the speed of the most accurate passing variant "
                    f"{reference.name!r} (decode {vs['decode_verdict']}, first token {vs['first_token_verdict']})")
        if len([r for r in rows.values() if r["passed"]]) == 1:
            return "the only variant that passed every gate"
        if too_noisy:
            return "most accurate passing variant; the machine was too busy to time (the control differed from itself)"
        return "most accurate passing variant; no other was measurably faster"
    if v is reference:
        return f"most accurate passing variant, but {winner.name!r} was measurably faster"
    against = (f"against {reference.name!r}: decode {vs['decode_verdict']}, first token {vs['first_token_verdict']}, "
               f"x{vs['speedup']:.2f}")
    if rows[v.name].get("too_inaccurate"):
        return f"faster ({against}), but {rows[v.name]['too_inaccurate']}"
    if winner is reference:
        return f"not measurably faster than the more accurate {reference.name!r} ({against})"
    return f"{winner.name!r} was faster ({against})"


def timing_context() -> dict[str, Any]:
    """The machine, and how busy it was when the rounds ended (the report prints both with the figures)."""
    return {"load_average": load_average(), **machine()}


@dataclass
class Outcome:
    """What the search hands back to the run: the winner staged and evaluated, and the search's record."""

    winner: str
    plan: Plan
    staged: Path
    results: dict[str, Any]
    """The winner's evaluation results (gates recorded), for its report."""
    record: dict[str, Any]


def _json_entry(cache: Cache, kind: str, key: str) -> Any | None:
    entry = cache.get(kind, key)
    return json.loads((entry / RECORD_FILE).read_text()) if entry is not None else None


def _put_json(cache: Cache, kind: str, key: str, value: Any, meta: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / RECORD_FILE).write_text(json.dumps(value, indent=1) + "\n")
        cache.put(kind, key, Path(tmp), meta)


def choice_key(plan: Plan, search: ExportSearchSpec, base: str) -> str:
    """What an export choice belongs to: the base model, the target, the candidates and the search's
    settings, this machine and the packages; never the adapters (adding or retraining one keeps the graph)."""
    exports = {name: variant_plan(plan, changes).spec.export.model_dump(mode="json", exclude={"search"})
               for name, changes in [(SPEC_VARIANT, {}), *((c.name, c.changes) for c in search.candidates)]}
    return content_key({"stage": "export-choice", "base": base, "target": plan.target.name, "exports": exports,
                        "search": search.model_dump(mode="json"), "machine": machine(), "packages": package_versions()})


def run_search(
    plan: Plan,
    search: ExportSearchSpec,
    trained: list[TrainedAdapter],
    stages: Stages,
    cache: Cache,
    export: Callable[[str, str], tuple[Path, str]],
    *,
    base: str,
    enforced: bool,
    remeasure: bool = False,
) -> Outcome:
    """Export, stage and gate every variant, time the passing ones and choose (module docstring).

    The choice is made once for a base model (digest `base`), target and machine, recorded in the cache
    (choice_key) and reused on later runs, whatever their adapters, so adding an adapter leaves model.onnx
    as it was: then only the chosen variant is gated, with the run's adapters, and an adapter that fails
    its gates fails the run rather than switching the graph. `remeasure` chooses again.

    `export(variant, config_file)` returns the variant's exported folder and its cache key. Evaluation
    figures and timing rounds are cache entries too (keyed by the exports, the adapters, the eval
    settings and, for timings, the machine), so a re-run measures nothing new unless `remeasure`. Every
    variant's staging but the winner's is removed; with `enforced` and no passing variant, PipelineError
    lists each one's failed gates (not enforced: the most accurate variant is returned)."""
    from phi_pipeline.bundle.staging import stage, verify
    from phi_pipeline.evaluate import gated_results

    candidates = [(SPEC_VARIANT, {}, EXPORT_FILE), *((c.name, c.changes, variant_file(c.name)) for c in search.candidates)]
    plans = {name: variant_plan(plan, changes) for name, changes, _ in candidates}
    adapters = {t.plan.name: t.key for t in trained}
    tasks = [{**t.plan.spec.model_dump(mode="json", include={"eval", "gates", "data"}),
              "eval_sha256": file_sha256(Path(t.plan.spec.data.eval)) if t.plan.spec.data.eval else None} for t in trained]
    staged: dict[str, Path] = {}
    results: dict[str, dict[str, Any]] = {}
    variants: list[Variant] = []
    export_keys: dict[str, str] = {}
    folders: dict[str, Path] = {}

    def staged_variant(name: str, folder: Path) -> Path:
        if name not in staged:
            staged[name] = stage(plans[name], folder, trained, stages, variant=name)
            problems = verify(staged[name])
            if problems:
                raise PipelineError(f"export variant {name!r}: the staged bundle failed verification:\n"
                                    + "\n".join(f"  - {p}" for p in problems))
        return staged[name]

    def gated(name: str, changes: dict[str, Any], config_file: str) -> Variant:
        """Export the variant, stage it and gate it with the run's adapters (figures cached by content)."""
        folders[name], export_keys[name] = export(name, config_file)
        key = content_key({"stage": "export-search-eval", "export": export_keys[name], "adapters": adapters,
                           "tasks": tasks, "enforced": enforced, "packages": package_versions()})
        cached = None if remeasure else _json_entry(cache, "export-search", key)
        if cached is None:
            with stages.stage(f"evaluate:{name}", f"gating export variant {name!r} (ONNX vs PyTorch+PEFT)"):
                folder = staged_variant(name, folders[name])
                cached = {"results": gated_results(plans[name], folder, trained, enforced=enforced),
                          # the adapters are the same in every variant
                          "size_bytes": tree_size(folder, exclude=(ADAPTERS_DIR,))}
            _put_json(cache, "export-search", key, cached, {"pipeline": plan.spec.name, "variant": name})
        results[name] = cached["results"]
        variant = from_results(name, changes, cached["results"], cached["size_bytes"])
        variants.append(variant)
        stages.say(f"export variant {name!r}: " + ("gates passed" if variant.passed else
                                                  f"{len(variant.failures)} gate(s) failed"))
        return variant

    chosen_key = choice_key(plan, search, base)
    chosen = None if remeasure else _json_entry(cache, "export-choice", chosen_key)
    winner: str | None = None
    try:
        if chosen is not None:
            winner = chosen["winner"]
            stages.mark_cached("time-variants")  # before staging: the manifest lists what was not measured again
            name, changes, config_file = next(c for c in candidates if c[0] == winner)
            variant = gated(name, changes, config_file)
            if not variant.passed and enforced:
                raise PipelineError(
                    f"export variant {winner!r}, which the export search chose for this base model, target and machine "
                    f"on {chosen['chosen_at']} (adapters then: {', '.join(chosen['adapters'])}), fails a publish gate with "
                    f"this run's adapters; the graph is kept, not switched, and {plan.paths.bundle_dir} was left as it was:\n"
                    + "\n".join(f"  - {f}" for f in variant.failures)
                    + "\n(fix the adapter's recipe, or `phi-pipeline run --remeasure` to choose again for this adapter set: "
                    "model.onnx may then change and devices download the base again)"
                )
            record = {**chosen["record"], "reused_choice": {"chosen_at": chosen["chosen_at"], "adapters": chosen["adapters"]},
                      "cached": True}
            stages.say(f"export search: shipping variant {winner!r}, chosen for this base model, target and machine on "
                       f"{chosen['chosen_at']} (`phi-pipeline run --remeasure` chooses again)")
            return Outcome(winner, plans[winner], staged_variant(winner, folders[winner]), results[winner], record)

        for name, changes, config_file in candidates:
            if name == SPEC_VARIANT:  # the spec's own settings: a failure there is the run's
                gated(name, changes, config_file)
                continue
            try:
                gated(name, changes, config_file)
            except Exception as exc:  # noqa: BLE001 - any export, staging or load failure of a candidate
                # a candidate that cannot be built or loaded (e.g. a setting the model's layout does not
                # support) is a failed candidate with its reason, not the end of the run
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                variants.append(Variant(name, changes, passed=False, failures=[f"could not be built or loaded: {reason}"],
                                        built=False))
                stages.say(f"export variant {name!r}: could not be built or loaded: {reason}")

        passing = [v.name for v in variants if v.passed]
        timing_key = content_key({"stage": "export-search-timing", "exports": {n: export_keys[n] for n in passing},
                                  "adapters": adapters, "search": search.model_dump(mode="json", include={"rounds", "prompt_tokens", "new_tokens"}),
                                  "machine": machine(), "packages": package_versions()})
        timed = None if remeasure or len(passing) < 2 else _json_entry(cache, "export-search", timing_key)
        if len(passing) < 2:
            timed = {"rounds": {}, "context": timing_context()}
        elif timed is None:
            with stages.stage("time-variants", f"timing {len(passing)} passing export variants, {search.rounds} rounds"):
                bundles = {n: staged_variant(n, folders[n]) for n in passing}
                bundles[CONTROL_ROW] = bundles[reference_of(variants).name]
                rounds = time_variants(bundles, trained[0].plan.name, search, stages.say)
                timed = {"rounds": rounds, "context": timing_context()}
            _put_json(cache, "export-search", timing_key, timed, {"pipeline": plan.spec.name, "timing": passing})
        else:
            stages.mark_cached("time-variants")
        record = choose(variants, timed["rounds"], search)
        record.update(machine=timed["context"], cached=not remeasure and "time-variants" in stages.cached)
        winner = record["winner"]
        if winner is None:
            if enforced:
                raise PipelineError(
                    f"no export variant passed every publish gate; {plan.paths.bundle_dir} was left as it was:\n"
                    + "\n".join(f"  - {v.name}: {'; '.join(v.failures)}" for v in variants)
                    + "\n(phi-pipeline run --no-gate publishes the most accurate variant anyway)"
                )
            winner = max(variants, key=accuracy).name
            record["winner"] = winner
            record["variants"][winner]["outcome"] = "won"
            record["variants"][winner]["why"] = "most accurate variant; none passed every gate (--no-gate)"
        else:  # a real choice: later runs of this base on this machine ship the same graph
            _put_json(cache, "export-choice", chosen_key,
                      {"winner": winner, "record": record, "adapters": sorted(adapters),
                       "chosen_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
                      {"pipeline": plan.spec.name, "winner": winner})
        stages.say(f"export search: shipping variant {winner!r}: {record['variants'][winner]['why']}")
        return Outcome(winner, plans[winner], staged_variant(winner, folders[winner]), results[winner], record)
    finally:
        for name, folder in staged.items():
            if name != winner:
                shutil.rmtree(folder, ignore_errors=True)
