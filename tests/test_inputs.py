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
            (data / f"{name}{split}.jsonl").write_text(json.dumps(row) + "\n")
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
    assert code == 2 and "data/plain.jsonl:2: invalid JSON" in err


def test_missing_template_field_names_field_and_lines(workspace, capsys):
    rows = [json.dumps({"q": "x"})] * 7 + [json.dumps(PLAIN_ROW)]
    write_lines(workspace / "data/plain.jsonl", *rows)
    code, err = run_cli(capsys)
    assert code == 2
    assert "field 'a' used by text_template is missing on lines 1, 2, 3, 4, 5 and 2 more" in err


def test_chat_row_with_bad_role_is_refused(workspace, capsys):
    bad = {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    write_lines(workspace / "data/chat.jsonl", json.dumps(CHAT_ROW), json.dumps(bad))
    code, err = run_cli(capsys)
    assert code == 2 and "roles must be one of system, user, assistant on line 2" in err


def test_chat_row_not_ending_with_answer_is_refused(workspace, capsys):
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    write_lines(workspace / "data/chat.jsonl", json.dumps(bad))
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
