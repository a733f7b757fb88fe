"""Integrity, fast: base weights checked before work, cache entries checked on read, signed bundles,
the run lock, SIGTERM and a full disk, each on small files made here."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from phi_pipeline.orchestration import cache as cache_mod
from phi_pipeline.orchestration.cache import Cache, DigestMemo, check_entry, file_sha256
from phi_pipeline.cli import main
from phi_pipeline.orchestration.diskspace import DiskFullError, tree_size
from phi_pipeline.errors import Terminated
from phi_pipeline.orchestration.runlock import LockHeld, RunLock

ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
SPEC = """\
name: check
base_model:
  name_or_path: base
adapters:
  - name: chat
    data: {train: data/chat.jsonl, eval: data/chat.jsonl, messages_field: messages}
"""


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# --- base weights -------------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    (tmp_path / "base/config.json").write_text(json.dumps({"model_type": "phi3", "num_hidden_layers": 2}))
    save_file({"w": np.ones((64, 64), np.float32)}, str(tmp_path / "base/model.safetensors"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data/chat.jsonl").write_text(json.dumps(ROW) + "\n")
    (tmp_path / "spec.yaml").write_text(SPEC)
    return tmp_path


def test_truncated_base_safetensors_is_refused_with_exit_2_naming_the_file(workspace, capsys, monkeypatch):
    weights = workspace / "base/model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    monkeypatch.setattr("phi_pipeline.pipeline.train_adapters", lambda *a, **k: pytest.fail("training started"))
    assert main(["run", "spec.yaml"]) == 2
    err = capsys.readouterr().err
    assert "base/model.safetensors: not a complete safetensors file" in err
    assert "file not fully covered" in err


def test_shard_index_naming_a_missing_shard_is_refused(workspace, capsys):
    index = {"weight_map": {"w": "model.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (workspace / "base/model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["run", "spec.yaml"]) == 2
    assert "names model-00002-of-00002.safetensors, which is missing" in capsys.readouterr().err


# --- cache --------------------------------------------------------------------------------------


def make_entry(tmp_path: Path, memo: DigestMemo | None = None, warnings: list[str] | None = None) -> tuple[Cache, Path]:
    source = tmp_path / "result"
    (source / "adapter").mkdir(parents=True)
    (source / "adapter/adapter_model.safetensors").write_bytes(os.urandom(4096))
    (source / "adapter/adapter_config.json").write_text("{}")
    cache = Cache(tmp_path / "cache", memo, warn=(warnings.append if warnings is not None else print))
    return cache, cache.put("adapters", "k1", source, {"adapter": "tone"})


def test_cache_entry_records_the_sha256_of_each_file(tmp_path):
    _, entry = make_entry(tmp_path)
    record = json.loads((entry / "cache-entry.json").read_text())
    assert record["files"] == {
        "adapter/adapter_config.json": file_sha256(entry / "adapter/adapter_config.json"),
        "adapter/adapter_model.safetensors": file_sha256(entry / "adapter/adapter_model.safetensors"),
    }


def test_damaged_cache_entry_is_reported_discarded_and_never_used(tmp_path):
    warnings: list[str] = []
    cache, entry = make_entry(tmp_path, warnings=warnings)
    assert cache.get("adapters", "k1") == entry
    flip_byte(entry / "adapter/adapter_model.safetensors")
    assert cache.get("adapters", "k1") is None
    assert "cache entry adapters/k1" in warnings[0] and "adapter/adapter_model.safetensors: sha256 differs" in warnings[0]
    assert not entry.exists() and not list((tmp_path / "cache/adapters").iterdir())


def test_cache_entry_without_a_record_is_rebuilt(tmp_path):
    warnings: list[str] = []
    cache, entry = make_entry(tmp_path, warnings=warnings)
    (entry / "cache-entry.json").unlink()
    assert cache.get("adapters", "k1") is None and "cache-entry.json: missing" in warnings[0]


def test_large_files_are_rehashed_on_read_only_when_changed_but_cache_verify_rehashes_all(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "MEMO_MIN_BYTES", 1024)
    memo = DigestMemo(tmp_path / "cache/digests.json")
    cache, entry = make_entry(tmp_path, memo)
    weights = entry / "adapter/adapter_model.safetensors"
    st = weights.stat()
    flip_byte(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # silent corruption: same size, same mtime
    assert cache.get("adapters", "k1") == entry  # the documented trade-off of the memo
    assert check_entry(entry) == ["adapter/adapter_model.safetensors: sha256 differs from the one recorded when the entry was written"]
    os.utime(weights)  # any write moves the mtime: the memo re-hashes
    assert Cache(tmp_path / "cache", DigestMemo(tmp_path / "cache/digests.json"), warn=lambda m: None).get("adapters", "k1") is None


def test_cache_verify_names_damaged_entries_and_info_lists_them(tmp_path, capsys):
    _, entry = make_entry(tmp_path)
    root = str(tmp_path / "cache")
    assert main(["cache", "verify", "--cache-dir", root]) == 0
    assert main(["cache", "info", "--cache-dir", root]) == 0
    assert "1 entries" in capsys.readouterr().out
    flip_byte(entry / "adapter/adapter_config.json")
    assert main(["cache", "verify", "--cache-dir", root]) == 1
    err = capsys.readouterr().err
    assert "adapters/k1: damaged" in err and "adapter/adapter_config.json: sha256 differs" in err


def test_prune_keeps_what_the_named_pipelines_used(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache, _ = make_entry(tmp_path)
    source = tmp_path / "result"
    kept = Cache(cache.root)
    kept.put("exports", "e1", source, {"pipeline": "check"})
    kept.record_use("check", "cpu", published=True)
    Cache(cache.root).put("exports", "e2", source, {"pipeline": "gone"})
    (cache.root / "exports/.e3.tmp999999999").mkdir()  # left by a killed run
    (tmp_path / "spec.yaml").write_text(SPEC)
    assert main(["cache", "prune", "--cache-dir", str(cache.root), "--spec", "spec.yaml"]) == 0
    assert sorted(e.name for e in Cache(cache.root).entries()) == ["exports/e1"]
    out = capsys.readouterr().out
    assert "removed adapters/k1" in out and "removed exports/e2" in out and "removed exports/.e3.tmp999999999" in out


def test_full_disk_while_writing_a_cache_entry_leaves_no_entry(tmp_path, monkeypatch):
    cache, entry = make_entry(tmp_path)
    before = {p: p.read_bytes() for p in entry.rglob("*") if p.is_file()}

    def full(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(DiskFullError, match=r"cache entry adapters/k2 in .*cache/adapters: it needs about 4\.\d KiB"):
        cache.put("adapters", "k2", tmp_path / "result", {})
    assert sorted(p.name for p in (tmp_path / "cache/adapters").iterdir()) == ["k1"]
    assert {p: p.read_bytes() for p in entry.rglob("*") if p.is_file()} == before


def fake_olive(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return script


def test_tree_size_leaves_out_excluded_subfolders_but_not_an_ancestor_of_the_same_name(tmp_path):
    bundle = tmp_path / "adapters" / "bundle"  # an ancestor named like the excluded subfolder counts no part
    (bundle / "adapters").mkdir(parents=True)
    (bundle / "model.onnx").write_bytes(b"x" * 10)
    (bundle / "adapters" / "tone.onnx_adapter").write_bytes(b"x" * 3)
    assert tree_size(bundle) == 13 and tree_size(bundle, exclude=("adapters",)) == 10
    assert tree_size(bundle / "model.onnx", exclude=("adapters",)) == 10


def test_full_disk_inside_olive_names_the_folder_and_space(tmp_path, monkeypatch):
    from phi_pipeline.orchestration.runner import run_olive

    body = "echo \"OSError: [Errno 28] No space left on device: '$PWD/x'\"; exit 1"
    monkeypatch.setattr(sys, "executable", str(fake_olive(tmp_path, body)))
    out = tmp_path / "runs/export"
    with pytest.raises(DiskFullError, match=r"in .*runs/export: it needs about 2\.0 GiB"):
        run_olive(tmp_path / "c.json", tmp_path / "log", [out / "model.onnx", out / "genai_config.json"], space_needed=2 << 30)


def _terminate(signum, frame):
    raise Terminated()


def test_sigterm_stops_the_olive_process(tmp_path, monkeypatch):
    from phi_pipeline.orchestration.runner import run_olive

    pid_file = tmp_path / "child.pid"
    monkeypatch.setattr(sys, "executable", str(fake_olive(tmp_path, f"echo $$ > {pid_file}; echo started; exec sleep 60")))
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        with pytest.raises(Terminated):
            run_olive(tmp_path / "c.json", tmp_path / "log", [])
    finally:
        signal.signal(signal.SIGTERM, previous)
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


# --- signed bundles -----------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path) -> dict[str, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = {}
    for name in ("mine", "other"):
        key = ec.generate_private_key(ec.SECP256R1())
        out[f"{name}.pem"] = tmp_path / f"{name}.pem"
        out[f"{name}.pem"].write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        out[f"{name}.pub"] = tmp_path / f"{name}.pub"
        out[f"{name}.pub"].write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    return out


def write_manifest(bundle: Path) -> None:
    files = {
        p.relative_to(bundle).as_posix(): file_sha256(p)
        for p in sorted(bundle.rglob("*"))
        if p.is_file() and p.name not in ("manifest.json", "model.sig")
    }
    (bundle / "manifest.json").write_text(json.dumps({"format": "phi-pipeline-bundle/1", "files": files}, indent=2))


@pytest.fixture
def signed(tmp_path, keys, capsys) -> Path:
    bundle = tmp_path / "dist/check/cpu"
    (bundle / "adapters").mkdir(parents=True)
    (bundle / "genai_config.json").write_text('{"model": {}}')
    (bundle / "model.onnx.data").write_bytes(os.urandom(10000))
    (bundle / "adapters/chat.onnx_adapter").write_bytes(os.urandom(2000))
    write_manifest(bundle)
    assert main(["sign", str(bundle), "--key", str(keys["mine.pem"])]) == 0
    assert (bundle / "model.sig").is_file()
    capsys.readouterr()
    return bundle


def verify_signed(bundle: Path, public_key: Path, capsys) -> tuple[int, str]:
    code = main(["verify", str(bundle), "--public-key", str(public_key)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_signed_bundle_verifies_with_its_public_key(signed, keys, capsys):
    code, out = verify_signed(signed, keys["mine.pub"], capsys)
    assert code == 0 and "model.sig proves every file was signed" in out
    assert main(["verify", str(signed)]) == 0  # the manifest check leaves the signature out
    assert "model.sig not checked: give --public-key" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["genai_config.json", "model.onnx.data", "adapters/chat.onnx_adapter", "manifest.json", "model.sig"])
def test_a_flipped_byte_in_any_file_of_a_signed_bundle_fails_naming_it(signed, keys, capsys, name):
    flip_byte(signed / name)
    code, out = verify_signed(signed, keys["mine.pub"], capsys)
    assert code == 1 and f"  - {name}: " in out


def test_a_rewritten_manifest_fails_the_signature_naming_the_files(signed, keys, capsys):
    flip_byte(signed / "adapters/chat.onnx_adapter")
    write_manifest(signed)  # whoever changed the file also rewrote the manifest
    assert main(["verify", str(signed)]) == 0
    code, out = verify_signed(signed, keys["mine.pub"], capsys)
    assert code == 1
    assert "adapters/chat.onnx_adapter: differs from the signed file" in out
    assert "manifest.json: differs from the signed file" in out


def test_an_added_file_fails_the_signature(signed, keys, capsys):
    (signed / "extra.txt").write_text("x")
    code, out = verify_signed(signed, keys["mine.pub"], capsys)
    assert code == 1 and "extra.txt: present but not signed" in out


def test_a_wrong_public_key_fails(signed, keys, capsys):
    code, out = verify_signed(signed, keys["other.pub"], capsys)
    assert code == 1 and f"model.sig: signed with another key than {keys['other.pub']}" in out


def test_an_unsigned_bundle_fails_verify_with_a_public_key(signed, keys, capsys):
    (signed / "model.sig").unlink()
    code, out = verify_signed(signed, keys["mine.pub"], capsys)
    assert code == 1 and "model.sig: missing; not signed" in out


def test_the_signature_is_the_one_model_signings_own_cli_checks(signed, keys):
    proc = subprocess.run(
        [sys.executable, "-m", "model_signing", "verify", "key", str(signed), "--signature", str(signed / "model.sig"),
         "--public_key", str(keys["mine.pub"])],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_bad_sign_key_is_refused_before_any_work(workspace, tmp_path, capsys, monkeypatch):
    (tmp_path / "rsa.pem").write_text("not a key")
    monkeypatch.setattr("phi_pipeline.pipeline.train_adapters", lambda *a, **k: pytest.fail("training started"))
    assert main(["run", "spec.yaml", "--sign-key", str(tmp_path / "rsa.pem")]) == 2
    assert "--sign-key: " in capsys.readouterr().err


# --- the run lock -------------------------------------------------------------------------------

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from phi_pipeline.orchestration.runlock import RunLock
    with RunLock(Path(sys.argv[1]), "the test run"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_second_run_with_no_wait_exits_1_naming_the_holder(project, capsys):
    holder = hold_lock(project / ".phi-pipeline/locks/tiny-phi3.cpu.lock", 30)
    try:
        assert main(["run", "pipelines/tiny-phi3.yaml", "--no-wait"]) == 1
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"pipeline 'tiny-phi3' for target cpu is already running (pid {holder.pid}, started 20" in err


def test_a_waiting_run_says_who_it_waits_for_and_then_runs(tmp_path):
    lock = tmp_path / "locks/x.lock"
    holder = hold_lock(lock, 1.5)
    said: list[str] = []
    start = time.monotonic()
    with RunLock(lock, "the test run", say=said.append):
        waited = time.monotonic() - start
    holder.wait()
    assert waited > 0.5 and f"(pid {holder.pid}, started " in said[0] and said[0].startswith("waiting for the run")


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    lock = tmp_path / "locks/x.lock"
    holder = hold_lock(lock, 30)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    said: list[str] = []
    with RunLock(lock, "the test run", wait=False, say=said.append):
        with pytest.raises(LockHeld):
            with RunLock(lock, "the test run", wait=False):
                pass
    assert len(said) == 1 and said[0].startswith("took over the lock of the test run left by a run that is no longer running")
    assert f"(pid {holder.pid}, started " in said[0]


def test_prune_refuses_while_a_run_holds_its_lock(tmp_path, capsys):
    cache, _ = make_entry(tmp_path)
    holder = hold_lock(tmp_path / "locks/check.cpu.lock", 30)  # <work_dir>/locks beside <work_dir>/cache
    try:
        spec = str(Path(__file__).parents[1] / "pipelines/tiny-phi3.yaml")
        assert main(["cache", "prune", "--cache-dir", str(cache.root), "--spec", spec]) == 1
    finally:
        holder.kill()
        holder.wait()
    assert f"check.cpu is already running (pid {holder.pid}" in capsys.readouterr().err
    assert [e.name for e in cache.entries()] == ["adapters/k1"]
