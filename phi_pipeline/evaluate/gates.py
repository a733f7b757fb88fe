"""Publish gates: each adapter's figures against its bounds, one message per check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from phi_pipeline.evaluate.metrics import fmt
from phi_pipeline.orchestration.trained import validation_losses
from phi_pipeline.pipeline_spec.schema import GateSpec, PipelineSpec

LEARNED_TOO_LITTLE = (
    "; the adapter learned too little to ship. Likely causes: the learning rate (too high stalls a fine-tune "
    "on a plateau, too low barely moves it), max_steps, the rank r and alpha (alpha / r scales every update, "
    "and the number of adapted projections per layer changes what a setting does: 4 in Phi-3's fused layout, "
    "7 in Llama's). "
    "`phi-pipeline search SPEC` finds a recipe on the validation split; to ship it anyway, lower gates.{gate} "
    "in the spec"
)


@dataclass(frozen=True)
class GateCheck:
    adapter: str
    gate: str
    bound: float
    value: float | None
    passed: bool | None
    """None: not checked (the PyTorch reference was unavailable)."""
    message: str


def gate_checks(results: Mapping[str, Any], spec: PipelineSpec | Mapping[str, Any] | None = None) -> list[GateCheck]:
    """Every gate of every evaluated adapter, passed, failed or not checked, with its message.

    Gates apply to the adapter (the base model's figures are the comparison point). `spec` gives the
    bounds: a PipelineSpec, a mapping adapter -> GateSpec (or dict), or None for those recorded in
    `results`.
    """
    checks: list[GateCheck] = []
    for name, r in results.get("adapters", {}).items():
        gates = _gates_for(name, r, spec)
        metric = r["metric"]
        onnx, torch_, parity = r["adapter"]["onnx"], r["adapter"]["pytorch"], r["adapter"]["parity"]
        who = f"adapter {name!r}"
        if onnx is None:  # nothing of the bundle ran for this adapter: every gate is unmet
            checks += [
                GateCheck(name, g, getattr(gates, g), None, False, f"{who}: no ONNX figures to check (gates.{g})")
                for g in ("min_gain_over_base", "max_drop_vs_pytorch", "max_perplexity_ratio", "min_token_agreement")
            ]
            checks.append(_loss_drop_check(name, who, gates.min_validation_loss_drop, r.get("learning")))
            continue
        base_figures, base_label = r["base"]["onnx"], "the base model's"
        if base_figures is None:  # a merged bundle ships no base model: compare with the PyTorch base
            base_figures, base_label = r["base"]["pytorch"], "the base model's (PyTorch; not in the bundle)"

        bound = gates.min_gain_over_base
        if base_figures is None:
            checks.append(GateCheck(name, "min_gain_over_base", bound, None, None,
                                    f"{who}: min_gain_over_base not checked: no base model figures (gates.min_gain_over_base)"))
        else:
            base = base_figures["metric"]
            gain = onnx["metric"] - base
            ok = gain > bound
            checks.append(GateCheck(
                name, "min_gain_over_base", bound, gain, ok,
                f"{who}: {metric} {fmt(metric, onnx['metric'])} "
                + (f"beats {base_label} {fmt(metric, base)} by {fmt(metric, gain)}, more than {fmt(metric, bound)}"
                   if ok else f"does not beat {base_label} {fmt(metric, base)} by more than {fmt(metric, bound)}")
                + " (gates.min_gain_over_base)" + ("" if ok else LEARNED_TOO_LITTLE.format(gate="min_gain_over_base")),
            ))

        checks.append(_loss_drop_check(name, who, gates.min_validation_loss_drop, r.get("learning")))

        bound = gates.max_drop_vs_pytorch
        if torch_ is None:
            checks.append(_unchecked(name, "max_drop_vs_pytorch", bound, who))
        else:
            drop = torch_["metric"] - onnx["metric"]
            ok = drop <= bound
            onnx_s, torch_s = fmt(metric, onnx["metric"]), fmt(metric, torch_["metric"])
            if drop <= 0:
                text = f"ONNX {metric} {onnx_s} is not below PyTorch+PEFT's {torch_s}"
            else:
                text = (f"ONNX {metric} {onnx_s} trails PyTorch+PEFT's {torch_s} by {fmt(metric, drop)}, "
                        + ("within" if ok else "more than") + f" {fmt(metric, bound)}")
            checks.append(GateCheck(name, "max_drop_vs_pytorch", bound, drop, ok,
                                    f"{who}: {text} (gates.max_drop_vs_pytorch)"))

        bound = gates.max_perplexity_ratio
        ratio = parity["perplexity_ratio"] if parity else None
        if ratio is None:
            checks.append(_unchecked(name, "max_perplexity_ratio", bound, who))
        else:
            ok = ratio <= bound
            checks.append(GateCheck(
                name, "max_perplexity_ratio", bound, ratio, ok,
                f"{who}: ONNX perplexity {onnx['perplexity']:.3f} is {ratio:.3f}x PyTorch's "
                f"{torch_['perplexity']:.3f}, " + ("within" if ok else "above")
                + f" {bound:.3f} (gates.max_perplexity_ratio)",
            ))

        bound = gates.min_token_agreement
        agreement = parity["token_agreement"] if parity else None
        if agreement is None:
            checks.append(_unchecked(name, "min_token_agreement", bound, who))
        else:
            ok = agreement >= bound
            checks.append(GateCheck(
                name, "min_token_agreement", bound, agreement, ok,
                f"{who}: token agreement with PyTorch {agreement:.3f} is "
                + ("at least" if ok else "below") + f" {bound:.3f} (gates.min_token_agreement)",
            ))
    return checks


def _loss_drop_check(name: str, who: str, bound: float, learning: Mapping[str, Any] | None) -> GateCheck:
    gate = "min_validation_loss_drop"
    before, shipped = (learning or {}).get("validation_loss_before"), (learning or {}).get("validation_loss_shipped")
    if before is None or shipped is None or before <= 0:
        return GateCheck(name, gate, bound, None, None, f"{who}: {gate} not checked: no validation loss logged "
                         f"before and after training (no validation split?) (gates.{gate})")
    drop = 1.0 - shipped / before
    ok = drop >= bound
    return GateCheck(
        name, gate, bound, drop, ok,
        f"{who}: validation loss {before:.4f} before training -> {shipped:.4f} shipped, a drop of {drop:.1%}, "
        + ("at least" if ok else "below") + f" {bound:.1%} (gates.{gate})" + ("" if ok else LEARNED_TOO_LITTLE.format(gate=gate)),
    )


def learning_record(history: Sequence[Mapping[str, Any]], load_best: bool) -> dict[str, float | None]:
    """What the learned floor reads besides the metric: the validation loss before training and shipped."""
    before, shipped = validation_losses(history, load_best)
    return {"validation_loss_before": before, "validation_loss_shipped": shipped}


def _unchecked(name: str, gate: str, bound: float, who: str) -> GateCheck:
    return GateCheck(name, gate, bound, None, None, f"{who}: {gate} not checked: no PyTorch reference (gates.{gate})")


def _gates_for(name: str, r: Mapping[str, Any], spec: PipelineSpec | Mapping[str, Any] | None) -> GateSpec:
    if isinstance(spec, PipelineSpec):
        for a in spec.adapters:
            if a.name == name:
                return a.gates
        return spec.gates
    if spec is not None and name in spec:
        g = spec[name]
        return g if isinstance(g, GateSpec) else GateSpec(**g)
    return GateSpec(**r.get("gates", {}))


def check_gates(results: Mapping[str, Any], spec: PipelineSpec | Mapping[str, Any] | None = None) -> list[str]:
    """One message per failed gate, naming the adapter, the metric, the figure and the bound; [] if all pass."""
    return [c.message for c in gate_checks(results, spec) if c.passed is False]


def record_gates(results: dict[str, Any], spec: PipelineSpec | Mapping[str, Any] | None, *, enforced: bool) -> list[str]:
    """Check the gates, store every check in results["gates"], and return the failure messages."""
    checks = gate_checks(results, spec)
    failures = [c.message for c in checks if c.passed is False]
    results["gates"] = {
        "enforced": enforced,
        "passed": not failures,
        "failures": failures,
        "checks": [c.__dict__ for c in checks],
    }
    return failures
