"""Generated Olive workflow configs: the committed goldens are current and Olive accepts each one."""

from __future__ import annotations

from pathlib import Path

import pytest

from phi_pipeline.configs import EXPORT_FILE, finetune_file, readme, render, workflow_configs
from phi_pipeline.errors import UsageError
from phi_pipeline.pipeline import load_plan
from phi_pipeline.targets import TARGETS

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
    committed = {p.name: p.read_text() for p in folder.iterdir()} if folder.is_dir() else {}
    assert committed == expected, f"{folder} is stale: run `make configs` and commit the result"


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
