"""The merged layout: one full model per adapter, its trained weights merged into the base.

For targets whose runtime cannot swap adapters (DirectML, NPUs), or a spec that asks for
`export.layout: merged`. Each workflow reads one trained PEFT adapter, runs Olive's
MergeAdapterWeights, then the target's export route: Model Builder at the plan's precision, or an
NPU pass chain (workflows/npu.py). Nothing here depends on another adapter, so adding one adds a
workflow and leaves the others' configs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from typing import Any

from phi_pipeline.pipeline_spec.plan import AdapterPlan, Plan
from phi_pipeline.orchestration.workflows.common import engine, hf_model, target_system
from phi_pipeline.orchestration.workflows.export import model_builder_pass
from phi_pipeline.orchestration.workflows.npu import openvino_route, qnn_route

TEMPLATE: dict[str, Any] = {
    "input_model": None,
    "systems": {},
    "data_configs": [],
    "passes": {"merge": {"type": "MergeAdapterWeights"}},
    "host": "local_system",
    "target": "local_system",
}


def model_builder_route(plan: Plan, adapter: AdapterPlan) -> dict[str, Any]:
    # No nodes_to_exclude: after merging there are no LoRA MatMuls to keep out of int4.
    return {"systems": {"local_system": target_system(plan.target)}, "passes": {"builder": model_builder_pass(plan)}}


ROUTES: dict[str, Callable[[Plan, AdapterPlan], dict[str, Any]]] = {
    "model_builder": model_builder_route,
    "qnn": qnn_route,
    "openvino": openvino_route,
}


def merged_export_config(plan: Plan, adapter: AdapterPlan) -> dict[str, Any]:
    config = deepcopy(TEMPLATE)
    config["input_model"] = hf_model(
        plan.base_model,
        trust_remote_code=plan.spec.base_model.trust_remote_code,
        adapter_path=plan.paths.trained_adapter_dir(adapter.name),
    )
    route = ROUTES[plan.target.export_route](plan, adapter)
    config["passes"].update(route.pop("passes"))
    config.update(route)  # systems, host, target and, for the NPU chains, calibration data
    config.update(engine(plan.paths.merged_export_dir(adapter.name), plan.paths.olive_cache_dir))
    return config
