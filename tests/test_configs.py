"""Generated Olive workflow configs: the committed goldens are current and Olive accepts each one."""

from __future__ import annotations

from pathlib import Path

import pytest

from phi_pipeline.orchestration.configs import EXPORT_FILE, finetune_file, readme, render, workflow_configs
from phi_pipeline.errors import UsageError
from phi_pipeline.pipeline import load_plan
from phi_pipeline.pipeline_spec.targets import TARGETS

from olive_validation import olive_check

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "pipelines").glob("*.yaml"))
CASES = [(spec, target) for spec in SPECS for target in TARGETS]


def plan_for(spec: Path, target: str, monkeypatch, **kw):
    monkeypatch.chdir(ROOT)  # spec paths are relative to the project root
    return load_plan(spec.relative_to(ROOT), target, **kw)


@pytest.mark.parametrize("spec,target", CASES, ids=lambda v: getattr(v, "stem", v))
def test_committed_configs_match_regenerated(spec, target, monkeypatch):
    plan = plan_for(spec, target, monkeypatch)
    folder = ROOT / plan.paths.configs_dir
    configs = workflow_configs(plan)
    expected = {name: render(c) for name, c in configs.items()} | {"README.md": readme(plan, list(configs))}
    # search/ holds the trials' workflows, written by a search run (checked below)
    committed = {p.name: p.read_text() for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}
    assert committed == expected, f"{folder} is stale: run `make configs` and commit the result"


TRIAL_CONFIGS = sorted(ROOT.glob("olive_configs/*/*/search/*/trial-*.json"))


@pytest.mark.parametrize("path", TRIAL_CONFIGS, ids=lambda p: "/".join(p.parts[-5:]))
def test_committed_search_trial_configs_pass_olive_validation(path, tmp_path):
    import json

    olive_check(json.loads(path.read_text()), tmp_path)


@pytest.mark.parametrize("spec,target", CASES, ids=lambda v: getattr(v, "stem", v))
def test_generated_configs_pass_olive_validation(spec, target, monkeypatch, tmp_path):
    for name, config in workflow_configs(plan_for(spec, target, monkeypatch)).items():
        olive_check(config, tmp_path)  # raises on any schema error or pass parameter Olive refuses


def test_int4_export_keeps_every_lora_matmul_unquantized(monkeypatch):
    plan = plan_for(ROOT / "pipelines/phi3-mini-4k.yaml", "cpu", monkeypatch, precision="int4")
    builder = workflow_configs(plan)[EXPORT_FILE]["passes"]["builder"]
    excluded = builder["extra_options"]["nodes_to_exclude"]
    # 32 layers x (q,k,v,o,gate,up,down) x (A,B): Phi-3's fused modules are split by Model Builder
    assert len(excluded) == 32 * 7 * 2
    assert "/model/layers.31/attn/k_proj/lora_B/MatMul" in excluded
    assert builder["precision"] == "int4"


def test_phi3_defaults_to_fused_lora_targets(monkeypatch):
    plan = plan_for(ROOT / "pipelines/phi3-mini-4k.yaml", "cpu", monkeypatch)
    finetune = workflow_configs(plan)[finetune_file("support")]["passes"]["finetune"]
    assert finetune["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert finetune["type"] == "LoRA"


def test_phi3_cuda_target_fine_tunes_with_qlora(monkeypatch):
    plan = plan_for(ROOT / "pipelines/phi3-mini-4k.yaml", "cuda", monkeypatch)
    finetune = workflow_configs(plan)[finetune_file("support")]["passes"]["finetune"]
    assert finetune["type"] == "QLoRA" and "target_modules" not in finetune
    assert plan.lora_layout == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def test_hub_id_becomes_hf_model_path(monkeypatch):
    plan = plan_for(ROOT / "pipelines/phi3-mini-4k.yaml", "cuda", monkeypatch)
    configs = workflow_configs(plan)
    assert configs[EXPORT_FILE]["input_model"]["model_path"] == "microsoft/Phi-3-mini-4k-instruct"
    assert configs[EXPORT_FILE]["passes"]["builder"]["precision"] == "fp16"  # cuda's default
    assert configs[EXPORT_FILE]["systems"]["local_system"]["accelerators"][0]["execution_providers"] == [
        "CUDAExecutionProvider"
    ]


def test_chat_data_uses_chat_template_and_template_data_its_template(monkeypatch):
    plan = plan_for(ROOT / "pipelines/tiny-phi3.yaml", "cpu", monkeypatch)
    configs = workflow_configs(plan)
    tone = configs[finetune_file("tone")]["data_configs"][0]["pre_process_data_config"]
    antonyms = configs[finetune_file("antonyms")]["data_configs"][0]["pre_process_data_config"]
    assert tone["chat_template"] is True and tone["message_col"] == "messages"
    assert antonyms["text_template"] == "Opposite: {input}\nAnswer: {output}"
    assert tone["strategy"] == antonyms["strategy"] == "line-by-line"


def test_precision_not_built_for_target_is_refused_listing_choices(monkeypatch):
    with pytest.raises(UsageError) as info:
        plan_for(ROOT / "pipelines/tiny-phi3.yaml", "cpu", monkeypatch, precision="fp16")
    assert "precision 'fp16' is not available for target 'cpu'; choose one of: int4, fp32, int8" in str(info.value)


def test_unknown_target_is_refused_listing_targets(monkeypatch):
    with pytest.raises(UsageError) as info:
        plan_for(ROOT / "pipelines/tiny-phi3.yaml", "tpu", monkeypatch)
    assert "unknown target 'tpu'; known targets: cpu" in str(info.value)


def _tiny_plan_with_export(monkeypatch, **export):
    import yaml

    from phi_pipeline.pipeline_spec.plan import make_plan
    from phi_pipeline.pipeline_spec.schema import parse_spec

    monkeypatch.chdir(ROOT)
    spec = yaml.safe_load((ROOT / "pipelines/tiny-phi3.yaml").read_text())
    spec["export"] |= export
    return make_plan(parse_spec(yaml.safe_dump(spec), "tiny-phi3.yaml"), "cpu")


def test_int4_export_quantizes_the_embedding_table_symmetric_by_default(monkeypatch):
    from phi_pipeline.orchestration.olive_compat import translate_int4_options

    builder = workflow_configs(plan_for(ROOT / "pipelines/tiny-phi3.yaml", "cpu", monkeypatch))[EXPORT_FILE]["passes"]["builder"]
    assert builder["int4_op_types_to_quantize"] == ["MatMul", "Gather"]
    assert builder["int4_is_symmetric"] is True and builder["int4_block_size"] == 32
    assert "matmul_mixed_precision" not in builder["extra_options"]  # the LM head stays int4
    assert "shared_embeddings" not in builder["extra_options"]  # Model Builder shares a tied table by default
    # what genai 0.18's Model Builder reads once olive_compat has renamed Olive's int4_* keys
    options = translate_int4_options({k: v for k, v in builder.items() if k.startswith("int4_")})
    assert options == {"block_size": 32, "is_symmetric": True, "op_types_to_quantize": ["MatMul", "Gather"]}


def test_int4_export_settings_reach_model_builder_when_changed(monkeypatch, tmp_path):
    plan = _tiny_plan_with_export(monkeypatch, int4_symmetric=False, int4_quantize_embeddings=False, int4_lm_head="int8",
                                  int4_block_size=64, int4_accuracy_level=4)
    builder = workflow_configs(plan)[EXPORT_FILE]["passes"]["builder"]
    assert builder["int4_op_types_to_quantize"] == ["MatMul"]
    assert (builder["int4_is_symmetric"], builder["int4_block_size"], builder["int4_accuracy_level"]) == (False, 64, 4)
    assert builder["extra_options"]["matmul_mixed_precision"] == {"last_matmul": "int8"}
    assert builder["extra_options"]["shared_embeddings"] is False  # a tied table is no longer forced into int4
    sensitive = workflow_configs(_tiny_plan_with_export(monkeypatch, int4_sensitive_layers="int8"))[EXPORT_FILE]
    assert sensitive["passes"]["builder"]["extra_options"]["matmul_mixed_precision"] == {"mixed_layers": "int8"}
    assert builder["extra_options"]["nodes_to_exclude"]  # the LoRA MatMuls are still kept out
    olive_check(workflow_configs(plan)[EXPORT_FILE], tmp_path)


def test_fp32_export_has_no_int4_settings(monkeypatch):
    builder = workflow_configs(_tiny_plan_with_export(monkeypatch, precision="fp32"))[EXPORT_FILE]["passes"]["builder"]
    assert not any(k.startswith("int4_") for k in builder) and builder["extra_options"] == {"prune_lm_head": True}


@pytest.mark.parametrize("target", TARGETS)
def test_model_builder_exports_prune_the_lm_head_only_on_model_builder_targets(target, monkeypatch):
    """Model Builder targets compute prefill logits for the last position only; the NPU chains keep every one."""
    configs = workflow_configs(plan_for(ROOT / "pipelines/tiny-phi3.yaml", target, monkeypatch))
    builders = [p for c in configs.values() for p in c["passes"].values() if p["type"] == "ModelBuilder"]
    pruned = {bool(b.get("extra_options", {}).get("prune_lm_head")) for b in builders}
    assert pruned == ({True} if TARGETS[target].export_route == "model_builder" else {False} if builders else set())


def test_unknown_lm_head_precision_is_refused_naming_the_field(monkeypatch):
    with pytest.raises(UsageError, match="int4_lm_head"):
        _tiny_plan_with_export(monkeypatch, int4_lm_head="int2")


def test_qnn_chain_calibrates_on_the_whole_tiny_train_split_and_keeps_the_lm_head_int8(monkeypatch):
    """The qnn chain's quantization settings (docs/npu-quality.md): QuaRot, GPTQ int4 per channel calibrated on
    the adapter's whole (tiny) train split, the embedding table int4 and the LM head int8, on the CPU EP."""
    from phi_pipeline.orchestration.workflows.npu import QNN_LM_HEAD_BITS

    export = workflow_configs(plan_for(ROOT / "pipelines/tiny-phi3.yaml", "qnn", monkeypatch))["export-antonyms.json"]
    passes = export["passes"]
    assert [p["type"] for p in passes.values()][1:3] == ["QuaRot", "Gptq"]
    assert (passes["gptq"]["bits"], passes["gptq"]["sym"], passes["gptq"]["group_size"]) == (4, True, -1)
    (calibration,) = export["data_configs"]
    assert calibration["pre_process_data_config"]["max_samples"] >= 288  # the tiny train split, whole
    builder = passes["builder"]
    assert builder["int4_op_types_to_quantize"] == ["MatMul", "Gather"]
    assert builder["extra_options"]["matmul_mixed_precision"] == {"last_matmul": f"int{QNN_LM_HEAD_BITS}"}
    # Model Builder names the int8 LM head's MatMulNBits .../MatMul_Q8: MatMulNBitsToQDQ must skip that node
    assert passes["to_qdq"]["nodes_to_exclude"] == [f"/lm_head/MatMul_Q{QNN_LM_HEAD_BITS}"] == ["/lm_head/MatMul_Q8"]
