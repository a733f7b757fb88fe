"""Bad input is refused before any training, every problem at once, with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from phi_pipeline.cli import main

SPEC = """\
name: check
base_model:
  name_or_path: {base}
adapters:
  - name: chat
    data: {{train: data/chat.jsonl, eval: data/chat_eval.jsonl, messages_field: messages}}
  - name: plain
    data: {{train: data/plain.jsonl, eval: data/plain_eval.jsonl, text_template: "Q: {{q}}\\nA: {{a}}", response_field: a}}
"""

CHAT_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
PLAIN_ROW = {"q": "two", "a": "2"}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A project with a valid local base folder and valid data; tests break one thing each."""
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "phi3", "num_hidden_layers": 2}))
    save_file({"w": np.zeros(4, np.float32)}, str(base / "model.safetensors"))
    data = tmp_path / "data"
    data.mkdir()
    for name, row in (("chat", CHAT_ROW), ("plain", PLAIN_ROW)):
        for split in ("", "_eval"):
            (data / f"{name}{split}.jsonl").write_text((json.dumps(row) + "\n") * 2)
    (tmp_path / "spec.yaml").write_text(SPEC.format(base="base"))
    return tmp_path


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["run", "spec.yaml", *args])
    return code, capsys.readouterr().err


def write_lines(path: Path, *lines: str) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_missing_data_file_is_named_with_exit_2(workspace, capsys):
    (workspace / "data/plain.jsonl").unlink()
    code, err = run_cli(capsys)
    assert code == 2
    assert "adapters.1.data (plain).train: data/plain.jsonl: file not found" in err


def test_empty_eval_split_is_refused(workspace, capsys):
    (workspace / "data/chat_eval.jsonl").write_text("\n")
    code, err = run_cli(capsys)
    assert code == 2 and "adapters.0.data (chat).eval: data/chat_eval.jsonl: the file has no examples" in err


def test_invalid_json_names_file_and_line(workspace, capsys):
    write_lines(workspace / "data/plain.jsonl", json.dumps(PLAIN_ROW), '{"q": "three", "a": 3', json.dumps(PLAIN_ROW))
    code, err = run_cli(capsys)
    assert code == 2 and "data/plain.jsonl: invalid JSON on line 2 (Expecting ',' delimiter at column 22)" in err


def test_missing_template_field_names_field_and_lines(workspace, capsys):
    rows = [json.dumps({"q": "x"})] * 7 + [json.dumps(PLAIN_ROW)]
    write_lines(workspace / "data/plain.jsonl", *rows)
    code, err = run_cli(capsys)
    assert code == 2
    assert "field 'a' used by text_template is missing on lines 1, 2, 3, 4, 5 ... and 2 more" in err


def test_chat_row_with_bad_role_is_refused(workspace, capsys):
    bad = {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    write_lines(workspace / "data/chat.jsonl", json.dumps(CHAT_ROW), json.dumps(bad))
    code, err = run_cli(capsys)
    assert code == 2 and "roles must be one of system, user, assistant on line 2" in err


def test_chat_row_not_ending_with_answer_is_refused(workspace, capsys):
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    write_lines(workspace / "data/chat.jsonl", json.dumps(bad), json.dumps(CHAT_ROW))
    code, err = run_cli(capsys)
    assert code == 2 and "end with the assistant's answer on line 1" in err


def test_every_data_problem_is_reported_in_one_run(workspace, capsys):
    (workspace / "data/plain.jsonl").unlink()
    (workspace / "data/chat_eval.jsonl").write_text("")
    write_lines(workspace / "data/plain_eval.jsonl", "not json")
    code, err = run_cli(capsys)
    assert code == 2 and "3 problems" in err


def test_missing_local_base_is_refused_without_asking_the_hub(workspace, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: pytest.fail("asked the hub"))
    (workspace / "spec.yaml").write_text(SPEC.format(base="./models/missing"))
    code, err = run_cli(capsys)
    assert code == 2 and "./models/missing is not a model folder (no config.json there)" in err


def test_base_with_only_pickled_weights_is_refused(workspace, capsys):
    (workspace / "base/model.safetensors").unlink()
    (workspace / "base/pytorch_model.bin").write_bytes(b"")
    code, err = run_cli(capsys)
    assert code == 2 and "has no *.safetensors weights" in err


def test_hub_id_while_offline_says_so(workspace, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(workspace / "empty-hf-cache"))
    spec = SPEC.format(base="someorg/some-model") + "  \n"
    (workspace / "spec.yaml").write_text(spec.replace("  name_or_path: someorg/some-model", "  name_or_path: someorg/some-model\n  model_type: phi3\n  num_hidden_layers: 2"))
    code, err = run_cli(capsys)
    assert code == 2 and "'someorg/some-model' is a hub id, but HF_HUB_OFFLINE=1" in err


def test_unknown_target_is_a_usage_error(workspace, capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "spec.yaml", "--target", "tpu"])
    assert info.value.code == 2


def test_spec_error_exits_2_and_writes_nothing(workspace, capsys):
    (workspace / "spec.yaml").write_text(SPEC.format(base="base").replace("name: chat", "name: a/b"))
    code, err = run_cli(capsys)
    assert code == 2 and "adapters.0.name" in err
    assert not (workspace / "olive_configs").exists() and not (workspace / ".phi-pipeline").exists()


# ------------------------------------------------------------------------------------------ data sources


def _spec_with_plain_data(workspace: Path, data: str) -> None:
    """The workspace spec with the plain adapter's data sources replaced by `data` (YAML flow keys)."""
    spec = SPEC.format(base="base").split("  - name: plain")[0]
    template = ' text_template: "Q: {q}\\nA: {a}", response_field: a}\n'
    (workspace / "spec.yaml").write_text(spec + "  - name: plain\n    data: {" + data + "," + template)


def test_json_array_file_is_read_and_a_bad_element_is_named_by_index(workspace, capsys):
    rows = [PLAIN_ROW, {"q": "x"}, PLAIN_ROW]
    (workspace / "data/plain.json").write_text(json.dumps(rows, indent=2))
    _spec_with_plain_data(workspace, "train: data/plain.json, eval: data/plain_eval.jsonl")
    code, err = run_cli(capsys)
    assert code == 2
    assert "1 problem" in err and "data/plain.json: field 'a' used by text_template is missing on index 1" in err


def test_nested_json_array_is_read_from_field(workspace, capsys):
    from phi_pipeline.pipeline_spec.data import load_examples
    from phi_pipeline.pipeline_spec.schema import DataSpec

    (workspace / "data/nested.json").write_text(json.dumps({"version": 2, "data": [PLAIN_ROW, {"q": "one", "a": "1"}]}))
    data = DataSpec(train="data/nested.json", eval="data/nested.json", field="data", text_template="Q: {q}\nA: {a}", response_field="a")
    assert [(e.line, e.prompt, e.reference) for e in load_examples(data)] == [(0, "Q: two\nA:", "2"), (1, "Q: one\nA:", "1")]
    wrong = data.model_copy(update={"field": "rows"})
    with pytest.raises(ValueError, match="data.field 'rows' names no key of the top-level JSON object \\(its keys: version, data\\)"):
        load_examples(wrong)


def test_json_array_of_484_bad_rows_is_reported_once_capped(workspace, capsys):
    (workspace / "data/plain.jsonl").write_text(json.dumps([{"q": "x"}] * 484))
    code, err = run_cli(capsys)
    assert code == 2 and "1 problem" in err
    assert "data/plain.jsonl: field 'a' used by text_template is missing on indices 0, 1, 2, 3, 4 ... and 479 more" in err


def test_invalid_json_lines_are_one_capped_problem(workspace, capsys):
    write_lines(workspace / "data/plain.jsonl", *(["{bad"] * 30))
    code, err = run_cli(capsys)
    assert code == 2 and "1 problem" in err
    assert "invalid JSON on lines 1, 2, 3, 4, 5 ... and 25 more (line 1: Expecting property name" in err


def test_invalid_utf8_names_the_line_not_the_byte_position(workspace, capsys):
    (workspace / "data/plain.jsonl").write_bytes(
        (json.dumps(PLAIN_ROW) + "\n").encode() * 2 + b'{"q": "caf\xe9", "a": "1"}\n'
    )
    code, err = run_cli(capsys)
    assert code == 2
    assert "data/plain.jsonl: line 3 is not valid UTF-8 (byte 0xe9 at column 11); save the file as UTF-8" in err
    assert "position" not in err


def test_validation_fraction_needs_two_training_rows(workspace, capsys):
    write_lines(workspace / "data/plain.jsonl", json.dumps(PLAIN_ROW))
    code, err = run_cli(capsys)
    assert code == 2 and "1 training row(s) cannot give up 0.1 of them for validation" in err


def test_hub_dataset_not_in_offline_cache_is_refused_naming_the_split(workspace, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(workspace / "empty-datasets-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(workspace / "empty-hf-cache"))
    _spec_with_plain_data(workspace, "hub: someorg/qa, train_split: 'train[:64]', eval_split: test")
    code, err = run_cli(capsys)
    assert code == 2
    assert "adapters.1.data (plain).train: hub dataset 'someorg/qa' split 'train[:64]': cannot load it" in err
    assert "not in the local Hugging Face datasets cache" in err
