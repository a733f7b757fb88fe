"""The embedded default: shipped datasets match their generator, and the tiny base builds deterministically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from phi_pipeline.orchestration.cache import file_sha256
from phi_pipeline.tiny import builtin_config
from phi_pipeline.tiny.corpus import corpus_documents
from phi_pipeline.tiny.datasets import (
    CITIES,
    DATA_DIR,
    EXTRACT_EVAL_FROM,
    EXTRACT_PROMPT,
    OPPOSITE,
    TONE_PROMPT,
    TONE_WORDS,
    all_datasets,
    to_jsonl,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TASKS = sorted(all_datasets())


def _input(row: dict) -> str:
    return row["input"] if "input" in row else row["messages"][0]["content"]


def _words(rows: list[dict]) -> set[str]:
    return {w for r in rows for w in _input(r).removeprefix(TONE_PROMPT).split()}


@pytest.mark.parametrize("task", TASKS)
def test_shipped_dataset_equals_generator_output(task):
    train, evaluation = all_datasets()[task]
    assert (DATA_DIR / task / "train.jsonl").read_text(encoding="utf-8") == to_jsonl(train)
    assert (DATA_DIR / task / "eval.jsonl").read_text(encoding="utf-8") == to_jsonl(evaluation)


@pytest.mark.parametrize("task", TASKS)
def test_train_and_eval_inputs_are_disjoint_and_unique(task):
    train, evaluation = all_datasets()[task]
    train_inputs, eval_inputs = [_input(r) for r in train], [_input(r) for r in evaluation]
    assert (len(train), len(evaluation)) == (320, 64)
    assert len(set(train_inputs)) == len(train_inputs) and len(set(eval_inputs)) == len(eval_inputs)
    assert not set(train_inputs) & set(eval_inputs)


@pytest.mark.parametrize("task", ["tone", "antonyms"])
def test_eval_words_all_appear_in_training(task):
    train, evaluation = all_datasets()[task]
    assert _words(evaluation) <= _words(train)


def test_tone_rows_are_user_then_assistant_label_balanced():
    for rows in all_datasets()["tone"]:
        for r in rows:
            user, assistant = r["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert user["content"].startswith(TONE_PROMPT)
            assert user["content"].split()[-1] in TONE_WORDS[assistant["content"]]
        counts = [sum(r["messages"][1]["content"] == label for r in rows) for label in TONE_WORDS]
        assert max(counts) - min(counts) <= 1


def test_antonym_rows_swap_only_the_adjective():
    for rows in all_datasets()["antonyms"]:
        for r in rows:
            assert set(r) == {"input", "output"}
            (det, adj, noun), out = r["input"].split(), r["output"].split()
            assert out == [det, OPPOSITE[adj], noun]


def test_extract_answers_are_the_sentences_fields_as_json_and_eval_people_and_cities_are_unseen():
    train, evaluation = all_datasets()["extract"]
    seen: dict[str, set] = {"name": set(), "city": set()}
    for rows, held_out in ((train, False), (evaluation, True)):
        for r in rows:
            user, assistant = r["messages"]
            fields = json.loads(assistant["content"])
            assert list(fields) == ["name", "age", "city"] and user["content"].startswith(EXTRACT_PROMPT)
            assert all(str(v) in user["content"] for v in fields.values())
            assert (fields["city"] in CITIES[EXTRACT_EVAL_FROM["city"]:]) == held_out
            if held_out:
                assert fields["name"] not in seen["name"] and fields["city"] not in seen["city"]
            else:
                seen["name"].add(fields["name"])
                seen["city"].add(fields["city"])


def test_tiny_tokenizer_learns_from_the_tiny_tasks_only():
    from phi_pipeline.tiny.base_model import _tokenizer_texts

    texts = set(_tokenizer_texts())
    assert "my short room" in texts and not any(t.startswith(EXTRACT_PROMPT) for t in texts)  # tiny-phi3's bytes stay put


def test_antonym_eval_pairs_are_unseen_in_training():
    train, evaluation = all_datasets()["antonyms"]
    pair = lambda r: tuple(r["input"].split()[1:])  # noqa: E731
    assert not {pair(r) for r in train} & {pair(r) for r in evaluation}


def test_corpus_is_deterministic_and_never_asks_the_tasks():
    docs = corpus_documents(n_docs=2000)
    assert docs == corpus_documents(n_docs=2000)
    assert docs != corpus_documents(seed=1, n_docs=2000)
    text = "\n".join(docs)
    assert "tone:" not in text and "Opposite" not in text
    assert "<|user|>\n" in text and "<|assistant|>\n" in text and "Question: " in text


@pytest.fixture(scope="module")
def tiny_builds(tmp_path_factory) -> tuple[Path, Path]:
    """Two 3-step builds with the same settings (about 10 s each: tokenizer, corpus, save)."""
    from phi_pipeline.tiny.base_model import build_tiny_base

    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_base(root / "a", steps=3), build_tiny_base(root / "b", steps=3)


@pytest.mark.slow
def test_tiny_base_is_byte_identical_when_built_twice(tiny_builds):
    a, b = tiny_builds
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json", "tiny_base.json"):
        assert file_sha256(a / name) == file_sha256(b / name), name


@pytest.mark.slow
def test_tiny_base_loads_with_phi3_config_matching_builtin_config(tiny_builds):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tiny_builds[0]
    assert not list(folder.glob("*.bin")) and (folder / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(folder)
    for key, value in builtin_config("tiny-phi3").items():
        assert getattr(config, key) == value, key
    assert not config.tie_word_embeddings
    assert config.hidden_size % 32 == 0 and config.intermediate_size % 32 == 0
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert set(model.generation_config.eos_token_id) == {config.eos_token_id, 4}
    settings = json.loads((folder / "tiny_base.json").read_text())["settings"]
    assert settings["steps"] == 3 and settings["seed"] == 0


@pytest.mark.slow
def test_tiny_tokenizer_has_phi3_chat_template_and_special_tokens(tiny_builds):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_builds[0])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\nhello<|end|>\n"
    )
    assert tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nhi<|end|>\n<|assistant|>\n"
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")}
    assert list(ids.values()) == [0, 1, 2, 3, 4]
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    # Special tokens are single ids, and text round-trips exactly (byte-level BPE, no bos added).
    text = "<|user|>\nthe hot drink<|end|>\n"
    assert tok(text)["input_ids"][0] == ids["<|user|>"] and tok.decode(tok(text)["input_ids"]) == text
    assert all(len(tok(" " + w)["input_ids"]) == 1 for w in _words(all_datasets()["antonyms"][0]))


@pytest.mark.slow
def test_short_finetune_adapter_is_byte_identical_when_rerun(fast_project, tmp_path, monkeypatch):
    """The fast spec's first adapter (a few seeded steps), trained again from scratch: the same weight bytes."""
    import shutil

    from phi_pipeline.orchestration.configs import finetune_file
    from phi_pipeline.orchestration.training import ADAPTER_FILES
    from phi_pipeline.pipeline import load_plan
    from phi_pipeline.orchestration.runner import run_olive

    project = tmp_path / "project"
    # the project's files, not its environments: tests/test_npu_*.py link the venvs in, and a copy of them is
    # gigabytes (it filled CI's disk)
    shutil.copytree(fast_project, project, ignore=shutil.ignore_patterns("dist", ".venv*"))
    monkeypatch.chdir(project)
    plan = load_plan("pipelines/fast.yaml", "cpu")
    adapter = plan.adapters[0]
    manifest = json.loads((fast_project / plan.paths.bundle_dir / "manifest.json").read_text())
    cached = plan.paths.cache_dir / "adapters" / manifest["adapters"][0]["cache_key"] / "adapter"
    out = plan.paths.finetune_dir(adapter.name) / "adapter"
    shutil.rmtree(out.parent, ignore_errors=True)
    run_olive(
        plan.paths.configs_dir / finetune_file(adapter.name), tmp_path / "finetune.log",
        [out / name for name in ADAPTER_FILES],
        offline=True, hf_cache=plan.paths.hf_cache_dir, seed=adapter.spec.training.seed,
    )
    assert file_sha256(out / "adapter_model.safetensors") == file_sha256(cached / "adapter_model.safetensors")
    # PEFT's config names the base by absolute path and lists target_modules from a set (any order).
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in (out, cached)]
    for config in configs:
        config.pop("base_model_name_or_path")
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]


@pytest.mark.slow
def test_default_adapters_answer_most_eval_rows_and_the_base_does_not(tiny_bundle):
    """The embedded default's bar (int4 ONNX, greedy): tone >= 0.90 and antonyms >= 0.70 exact match."""
    summary = json.loads((tiny_bundle / "manifest.json").read_text())["evaluation"]["adapters"]
    bar = {"tone": 0.90, "antonyms": 0.70}
    for name, minimum in bar.items():
        figures = summary[name]
        assert figures["metric"] == "exact_match", name
        assert figures["adapter_onnx"] >= minimum and figures["base_onnx"] <= 0.10, (name, figures)
