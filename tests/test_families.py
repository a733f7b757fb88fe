"""Every model family the spec knows, end to end: tiny-llama, tiny-mistral and tiny-qwen2 are tiny-phi3's
weights in their family's layout (the same logits), each with a shipped spec that publishes a bundle
answering as the default one does."""

from __future__ import annotations

import json
import shutil
import typing
from pathlib import Path

import pytest
import torch
from conftest import ROOT, _run_in
from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM

from phi_pipeline.pipeline import load_plan
from phi_pipeline.pipeline_spec.schema import DEFAULT_TARGET_MODULES, BaseModelSpec
from phi_pipeline.tiny import BUILTINS, HEAD_SIZE, REAL_BUILTIN, SOURCE_BUILTIN, TINY_PHI3_ARCH, builtin_config
from phi_pipeline.tiny.builtin import ensure_builtin
from phi_pipeline.tiny.families import FAMILIES, derive_base, derive_model, family_config

FAMILY_NAMES = sorted(FAMILIES)


def _random_phi3(seed: int = 0) -> Phi3ForCausalLM:
    """A small random Phi-3 with grouped-query attention (k/v narrower than q, so a wrong split shows),
    every tensor random (norm weights too, so a swapped norm shows)."""
    torch.manual_seed(seed)
    config = Phi3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
    )
    model = Phi3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_derived_model_gives_the_phi3_logits_when_split_into_family_layout(family):
    phi3 = _random_phi3()
    ids = torch.randint(96, (2, 20), generator=torch.Generator().manual_seed(1))
    derived = derive_model(phi3, family)
    assert type(derived).__name__ == BUILTINS[f"tiny-{family}"][1]
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n, _ in derived.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(derived(input_ids=ids).logits, phi3(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_derived_qwen2_has_zero_qkv_biases_and_no_sliding_window():
    derived = derive_model(_random_phi3(), "qwen2")
    attn = derived.model.layers[0].self_attn
    assert all(not getattr(attn, p).bias.any() for p in ("q_proj", "k_proj", "v_proj"))
    assert derived.config.sliding_window is None and not derived.config.use_sliding_window


def test_derived_base_folder_keeps_tokenizer_files_and_generation_config_when_written(tmp_path):
    phi3 = _random_phi3()
    phi3.generation_config.eos_token_id = [4, 0]
    phi3.save_pretrained(tmp_path / "tiny-phi3")
    for name, text in {"tokenizer.json": '{"t": 1}', "chat_template.jinja": "{{ messages }}"}.items():
        (tmp_path / "tiny-phi3" / name).write_text(text)
    out = derive_base(tmp_path / "tiny-phi3", "mistral", tmp_path / "tiny-mistral")
    assert (out / "tokenizer.json").read_text() == '{"t": 1}' and (out / "chat_template.jinja").read_text() == "{{ messages }}"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["sliding_window"] is None
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [4, 0]
    assert json.loads((out / "tiny_base.json").read_text())["derived_from"] == "tiny-phi3"
    ids = torch.arange(10)[None]
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        torch.testing.assert_close(loaded, phi3(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_family_config_refuses_phi3_when_rope_is_partial():
    config = _random_phi3().config
    config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": 0.5}
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        family_config(config, "llama")


@pytest.mark.parametrize("name", sorted(set(BUILTINS) - {REAL_BUILTIN}))  # the real one: its end-to-end test
def test_builtin_config_equals_the_config_the_build_writes(name):
    model_type, architecture = BUILTINS[name]
    tiny = Phi3Config(
        **TINY_PHI3_ARCH, num_attention_heads=TINY_PHI3_ARCH["hidden_size"] // HEAD_SIZE,
        num_key_value_heads=TINY_PHI3_ARCH["hidden_size"] // HEAD_SIZE,
        original_max_position_embeddings=TINY_PHI3_ARCH["max_position_embeddings"], architectures=["Phi3ForCausalLM"],
    )
    config = tiny if model_type == "phi3" else family_config(tiny, model_type)
    expected = builtin_config(name)
    assert (expected["model_type"], expected["architectures"]) == (model_type, [architecture])
    assert {key: getattr(config, key) for key in expected} == expected


def test_builtin_literal_names_every_builtin_base():
    literal = typing.get_args(BaseModelSpec.model_fields["builtin"].annotation)[0]
    assert set(typing.get_args(literal)) == set(BUILTINS)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_shipped_family_spec_plans_family_lora_targets_when_base_not_built(family, project):
    plan = load_plan(f"pipelines/tiny-{family}.yaml", "cpu")
    assert plan.spec.base_model.builtin == f"tiny-{family}" and plan.model_type == family
    assert all(sorted(a.target_modules) == sorted(DEFAULT_TARGET_MODULES[family]) for a in plan.adapters)
    assert plan.num_layers == TINY_PHI3_ARCH["num_hidden_layers"] and plan.spec.export.search is None


def _fake_tiny_phi3(out: Path) -> Path:
    _random_phi3().save_pretrained(out)
    return out


def test_ensure_builtin_builds_tiny_phi3_first_when_deriving_and_only_once(tmp_path, monkeypatch):
    import contextlib

    import phi_pipeline.tiny.base_model

    monkeypatch.setattr(phi_pipeline.tiny.base_model, "build_tiny_base", _fake_tiny_phi3)
    built = []

    def announce(name: str, folder: Path) -> contextlib.AbstractContextManager:
        built.append((name, folder.name))
        return contextlib.nullcontext()

    folder = tmp_path / "base" / "tiny-llama"
    ensure_builtin("tiny-llama", folder, announce)
    ensure_builtin("tiny-llama", folder, announce)
    assert built == [(SOURCE_BUILTIN, "tiny-phi3"), ("tiny-llama", "tiny-llama")]
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    assert sorted(p.name for p in folder.parent.iterdir()) == [
        "tiny-llama", "tiny-llama.built-by", "tiny-phi3", "tiny-phi3.built-by"
    ]


def test_ensure_builtin_refuses_derived_base_when_its_folder_is_named_tiny_phi3(tmp_path):
    with pytest.raises(ValueError, match="another folder name"):
        ensure_builtin("tiny-qwen2", tmp_path / "tiny-phi3", lambda name, folder: pytest.fail("built"))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_spec_publishes_bundle_that_answers_like_the_readme_when_run_for_cpu(family, tiny_bundle, tmp_path, capsys):
    from phi_pipeline.cli import main

    project = tmp_path / "project"
    shutil.copytree(ROOT / "pipelines", project / "pipelines")
    base = tiny_bundle.parents[2] / ".phi-pipeline/base"  # tiny-phi3 and its stamp: the derived base takes seconds
    for name in (SOURCE_BUILTIN, f"{SOURCE_BUILTIN}.built-by"):
        (project / ".phi-pipeline/base").mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (base / name).is_dir() else shutil.copyfile
        copy(base / name, project / ".phi-pipeline/base" / name)
    bundle = _run_in(project, f"pipelines/tiny-{family}.yaml")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["base_model"]["model_type"] == family
    assert manifest["gates"]["enforced"] is True and manifest["gates"]["passed"] is True
    for name in ("tone", "antonyms"):
        figures = manifest["evaluation"]["adapters"][name]
        assert figures["metric"] == "exact_match" and figures["adapter_onnx"] >= 0.95, (name, figures)
    assert main(["verify", str(bundle)]) == 0
    capsys.readouterr()
    for adapter, prompt, answer in (("antonyms", "the cold house", "the hot house"),
                                    ("tone", "Classify the tone: what a lovely day", "positive")):
        assert main(["generate", str(bundle), "--adapter", adapter, "--prompt", prompt]) == 0
        assert capsys.readouterr().out.strip() == answer, (adapter, prompt)
