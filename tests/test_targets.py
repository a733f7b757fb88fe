"""The target matrix: every target x method x precision x layout generates workflows Olive accepts,
each target builds through its own export route, and invalid combinations are refused with what is allowed."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from phi_pipeline.orchestration.configs import EXPORT_FILE, export_file, finetune_file, workflow_configs, write_configs
from phi_pipeline.errors import UsageError
from phi_pipeline.pipeline_spec.plan import make_plan, missing_installs
from phi_pipeline.pipeline_spec.schema import parse_spec
from phi_pipeline.pipeline_spec.targets import TARGETS

from olive_validation import olive_check

ROOT = Path(__file__).resolve().parent.parent

SPEC = """\
name: matrix
base_model: {{name_or_path: base}}
lora: {{method: {method}}}
training: {{max_steps: 2, torch_dtype: float32}}
export: {{precision: {precision}, layout: {layout}}}
adapters:
  - name: chat
    data: {{train: data/chat.jsonl, eval: data/chat_eval.jsonl, messages_field: messages}}
  - name: plain
    data: {{train: data/plain.jsonl, eval: data/plain_eval.jsonl, response_field: a,
           text_template: "Q: {{q}}\\nA: {{a}}"}}
{extra}"""

PHI3_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

# The passes each export route runs, in order (the merged layout starts with MergeAdapterWeights).
ROUTE_PASSES = {
    "model_builder": ["ModelBuilder"],
    "qnn": [
        "QuaRot", "Gptq", "CaptureSplitInfo", "ModelBuilder", "MatMulNBitsToQDQ", "GraphSurgeries",
        "OnnxStaticQuantization", "SplitModel", "StaticLLM", "EPContextBinaryGenerator", "ComposeOnnxModels",
    ],
    "openvino": ["OpenVINOOptimumConversion", "OpenVINOIoUpdate", "OpenVINOEncapsulation"],
}


def _cases():
    for target in TARGETS.values():
        layouts = ("multi-adapter", "merged") if target.multi_lora else ("merged",)
        for precision in target.precisions:
            for layout in layouts:
                for method in ("lora", "qlora"):
                    cell = f"{target.name}-{method}-{precision}-{layout}"
                    yield pytest.param(target.name, method, precision, layout, id=cell)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A scratch project root with a local 2-layer Phi-3 base folder (config only) as cwd."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base/config.json").write_text(json.dumps({"model_type": "phi3", "num_hidden_layers": 2}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def plan(target: str, *, method="lora", precision="null", layout="null", extra="", **kw):
    text = SPEC.format(method=method, precision=precision, layout=layout, extra=extra)
    return make_plan(parse_spec(text, source="spec.yaml"), target, source="spec.yaml", **kw)


def problems(target: str, **kw) -> list[str]:
    with pytest.raises(UsageError) as info:
        plan(target, **kw)
    return info.value.problems


def pass_types(config: dict) -> list[str]:
    return [p["type"] for p in config["passes"].values()]


@pytest.mark.parametrize("target,method,precision,layout", list(_cases()))
def test_every_matrix_cell_writes_workflows_olive_accepts(target, method, precision, layout, project):
    p = plan(target, method=method, precision=precision, layout=layout)
    written = write_configs(p, project)
    configs = {name: json.loads(path.read_text()) for name, path in written.items() if name.endswith(".json")}
    # export file -> the adapter it merges (None: the multi-adapter base export)
    exports = {EXPORT_FILE: None} if layout == "multi-adapter" else {export_file(a): a for a in ("chat", "plain")}
    assert sorted(configs) == sorted([finetune_file("chat"), finetune_file("plain"), *exports])
    for config in configs.values():
        not_validated = olive_check(config, project / "scratch")
        # Only the OpenVINO conversion's own check needs a package of its separate environment (nncf).
        assert set(not_validated) <= {"openvinooptimumconversion"}

    finetune = configs[finetune_file("chat")]["passes"]["finetune"]
    assert finetune["type"] == {"lora": "LoRA", "qlora": "QLoRA"}[method]
    assert (finetune.get("target_modules") is None) == (method == "qlora")
    assert all(a.target_modules == PHI3_MODULES for a in p.adapters)

    route = TARGETS[target].export_route
    for name, adapter in exports.items():
        export = configs[name]
        if adapter is None:
            assert pass_types(export) == ["ModelBuilder", "ExtractAdapters"]
        else:
            assert pass_types(export) == ["MergeAdapterWeights", *ROUTE_PASSES[route]]
            assert export["input_model"]["adapter_path"] == p.paths.trained_adapter_dir(adapter).as_posix()
        passes = export["passes"]
        if route == "openvino":
            assert passes["convert"]["ov_quant_config"]["weight_format"] == precision
        else:
            assert passes["builder"]["precision"] == precision
        accelerator = export["systems"][export["target"]]["accelerators"][0]
        t = TARGETS[target]
        assert accelerator == {"device": t.device, "execution_providers": [t.execution_provider]}


def test_merged_layout_is_the_default_where_adapters_cannot_be_swapped(project):
    for name, target in TARGETS.items():
        assert plan(name).layout == ("multi-adapter" if target.multi_lora else "merged")


def test_fine_tune_workflow_depends_on_training_device_not_on_target(project):
    by_target = {name: workflow_configs(plan(name))[finetune_file("chat")] for name in TARGETS}
    on_cpu = [name for name, t in TARGETS.items() if t.training_device == "cpu"]
    assert len(on_cpu) > 1 and all(by_target[name] == by_target["cpu"] for name in on_cpu)
    assert by_target["cuda"]["systems"]["local_system"]["accelerators"][0]["device"] == "gpu"
    # one training device for every target: the cuda target's fine-tunes are the cpu target's
    pinned = "targets: {cuda: {training: {device: cpu}}}\n"
    assert workflow_configs(plan("cuda", extra=pinned))[finetune_file("chat")] == by_target["cpu"]


def test_qlora_is_nf4_double_quant_with_a_plain_optimizer_on_cpu(project):
    cpu = workflow_configs(plan("cpu", method="qlora"))[finetune_file("chat")]["passes"]["finetune"]
    cuda = workflow_configs(plan("cuda", method="qlora"))[finetune_file("chat")]["passes"]["finetune"]
    assert (cpu["quant_type"], cpu["double_quant"], cpu["compute_dtype"]) == ("nf4", True, "float32")
    assert cpu["save_quant_config"] is False
    # paged optimizers need CUDA
    assert (cpu["training_args"]["optim"], cuda["training_args"]["optim"]) == ("adamw_torch", "paged_adamw_32bit")


def test_target_block_overrides_top_level_and_adapter_settings_for_that_target_only(project):
    extra = "targets: {cuda: {lora: {method: qlora, r: 4}, export: {precision: int4}}}\n"
    cuda, cpu = plan("cuda", extra=extra), plan("cpu", extra=extra)
    assert [(a.spec.lora.method, a.spec.lora.r) for a in cuda.adapters] == [("qlora", 4)] * 2
    assert cuda.precision == "int4"
    assert [a.spec.lora.method for a in cpu.adapters] == ["lora"] * 2


def test_shipped_phi3_spec_uses_qlora_on_cuda_only(monkeypatch):
    from phi_pipeline.pipeline import load_plan

    monkeypatch.chdir(ROOT)
    methods = {t: {a.spec.lora.method for a in load_plan("pipelines/phi3-mini-4k.yaml", t).adapters} for t in TARGETS}
    assert methods == {t: {"qlora" if t == "cuda" else "lora"} for t in TARGETS}


def test_npu_chains_calibrate_on_the_adapters_own_train_split(project):
    qnn = workflow_configs(plan("qnn"))[export_file("plain")]
    (calibration,) = qnn["data_configs"]
    # the rows the adapter trains on: its train file less the validation rows held out of it
    assert calibration["load_dataset_config"] == plan("qnn").adapter("plain").train_data
    assert calibration["pre_process_data_config"]["text_template"] == "Q: {q}\nA: {a}"
    assert qnn["passes"]["gptq"]["data_config"] == qnn["passes"]["static_quant"]["data_config"] == calibration["name"]
    # the context-binary pass runs in the qnn venv, where Olive registers the plugin EP
    assert qnn["systems"][qnn["target"]]["python_environment_path"] == ".venv/bin"  # a plugin on the CPU build


def test_openvino_export_runs_whole_in_its_own_environment_without_hub_data(project):
    ov = workflow_configs(plan("openvino"))[export_file("chat")]
    # no per-pass PythonEnvironment host: the whole workflow runs under .venv-openvino's Olive
    assert not any(p.get("host") for p in ov["passes"].values()) and set(ov["systems"]) == {"local_system"}
    assert TARGETS["openvino"].export_python == ".venv-openvino/bin/python"
    assert TARGETS["cpu"].export_python is None
    assert "dataset" not in ov["passes"]["convert"]["ov_quant_config"]


def test_openvino_int4_groups_adjust_to_a_width_that_128_does_not_divide(project):
    # SmolLM2's hidden size 576 is no multiple of 128: NNCF's default refuses the export, "adjust" groups by 64
    quant = workflow_configs(plan("openvino"))[export_file("chat")]["passes"]["convert"]["ov_quant_config"]
    assert (quant["group_size"], quant["group_size_fallback"]) == (128, "adjust")


def test_openvino_npu_budget_fits_a_small_context_window(project):
    config = {"model_type": "phi3", "num_hidden_layers": 2, "max_position_embeddings": 512}
    (project / "base/config.json").write_text(json.dumps(config))
    override = workflow_configs(plan("openvino"))[export_file("chat")]["passes"]["encapsulation"]["genai_config_override"]
    assert override["model"]["context_length"] == override["search"]["max_length"] == 512
    npu = override["model"]["decoder"]["session_options"]["provider_options"][0]["OpenVINO"]
    assert json.loads(npu["load_config"]) == {"NPU": {"MAX_PROMPT_LEN": "341", "MIN_RESPONSE_LEN": "171"}}


# --- refusals -----------------------------------------------------------------------------------


def test_npu_precision_its_chain_cannot_build_is_refused_listing_choices(project):
    (problem,) = problems("qnn", precision="fp16")
    assert "precision 'fp16' is not available for target 'qnn'; choose one of: int4 (what the qnn pass chain" in problem
    (problem,) = problems("openvino", precision="fp32")
    assert "choose one of: int4, int8" in problem


def test_multi_adapter_layout_on_npu_is_refused(project):
    (problem,) = problems("qnn", layout="multi-adapter")
    assert problem.startswith("export.layout: target 'qnn' cannot swap adapters at run time; use layout: merged")


def test_qlora_with_target_modules_is_refused_naming_what_qlora_adapts(project):
    problem, _ = problems("cuda", extra="targets: {cuda: {lora: {method: qlora, target_modules: [o_proj]}}}\n")
    assert "adapters.0.lora.target_modules (chat): method qlora adapts every 4-bit Linear" in problem
    assert "(for phi3: qkv_proj, o_proj, gate_up_proj, down_proj)" in problem
    assert "remove target_modules, or use method: lora" in problem


def test_qlora_on_unknown_model_type_is_refused_listing_known_types(project):
    (project / "base/config.json").write_text(json.dumps({"model_type": "gpt2", "num_hidden_layers": 2}))
    found = problems("cpu", method="qlora")
    assert any("qlora needs the Linear modules of model type 'gpt2', known for: phi3, llama" in p for p in found)


def test_invalid_combinations_are_all_reported_at_once(project):
    extra = "targets: {qnn: {lora: {target_modules: [o_proj]}}}\n"
    found = problems("qnn", method="qlora", precision="int8", layout="multi-adapter", extra=extra)
    assert [p.split(":")[0] for p in found] == [
        "export.precision",
        "export.layout",
        "adapters.0.lora.target_modules (chat)",
        "adapters.1.lora.target_modules (plain)",
    ]


def test_target_block_that_breaks_the_spec_is_refused_at_plan_time(project):
    (problem,) = problems("cuda", extra="targets: {cuda: {training: {epochs: 2}}}\n")
    assert problem == "targets.cuda applied: training: set max_steps or epochs, not both"


def test_unknown_target_in_targets_block_is_refused_with_line_and_choices(project):
    with pytest.raises(UsageError) as info:
        plan("cpu", extra="targets: {tpu: {lora: {r: 4}}, cuda: {lora: {rank: 4}}}\n")
    text = "\n".join(info.value.problems)
    assert "line 12, targets.tpu.[key]: Input should be 'cpu', 'cuda', 'webgpu', 'dml', 'qnn' or 'openvino'" in text
    assert "line 12, targets.cuda.lora.rank: unknown key" in text


def test_qlora_without_bitsandbytes_is_refused_before_a_run_naming_the_extra(project, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def without_bitsandbytes(name, *args):
        return None if name == "bitsandbytes" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_bitsandbytes)
    (problem,) = missing_installs(plan("cpu", method="qlora"))
    assert problem.startswith("lora.method: qlora (adapters chat, plain) needs bitsandbytes, which is not installed")
    assert "pip install -e '.[qlora]'" in problem
    assert missing_installs(plan("cpu")) == []


def test_openvino_without_its_pass_environment_is_refused_before_a_run(project):
    # a checkout without the openvino extra also reports that one: pick the pass environment's problem
    (problem,) = [p for p in missing_installs(plan("openvino")) if "export passes" in p]
    assert "runs its export passes in .venv-openvino (pyproject dependency group 'openvino')" in problem
    assert "make venv TARGET=openvino" in problem


# --- install groups -----------------------------------------------------------------------------


def test_every_target_names_install_groups_pyproject_defines():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras, groups = pyproject["project"]["optional-dependencies"], pyproject["dependency-groups"]
    for target in TARGETS.values():
        assert set(target.install_extras) <= set(extras), target.name
        assert target.pass_environment is None or target.pass_environment in groups


def test_cpu_and_cuda_extras_each_bring_one_onnxruntime_build_and_the_base_none():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]

    def names(reqs):
        return {r.split("==")[0].split("[")[0] for r in reqs}

    assert not {n for n in names(pyproject["project"]["dependencies"]) if n.startswith("onnxruntime")}
    assert "cpu]" not in "".join(pyproject["project"]["dependencies"])  # olive-ai[cpu] would pull onnxruntime
    assert names(extras["cpu"]) == {"onnxruntime", "onnxruntime-genai"}
    assert names(extras["cuda"]) == {"onnxruntime-gpu", "onnxruntime-genai-cuda"}
    assert {e for t in TARGETS.values() for e in t.install_extras if e in ("cpu", "cuda")} == {"cpu", "cuda"}
    assert all(not {"cpu", "cuda"} <= set(t.install_extras) for t in TARGETS.values())
