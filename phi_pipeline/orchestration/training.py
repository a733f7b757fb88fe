"""A fine-tune's inputs, cache key and work folder: the split files it reads, the content its key is made of,
the checkpoints an interrupted run resumes from, and what it leaves for later stages."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from phi_pipeline.orchestration.cache import content_key, file_digests, file_sha256
from phi_pipeline.orchestration.distributed import DISTRIBUTED_FILE
from phi_pipeline.orchestration.olive_compat import SEAL_FILE
from phi_pipeline.orchestration.trained import TRAINER_STATE
from phi_pipeline.pipeline_spec.data import read_file_rows, validation_indices
from phi_pipeline.pipeline_spec.plan import Plan
from phi_pipeline.versions import training_versions

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAINING_KEY_FILE = "training-key"
"""In a fine-tune's work folder: the cache key its checkpoints belong to (a resumed run must have the same)."""


def collect_finetune_result(out: Path, distributed: dict[str, Any]) -> Path:
    """What a fine-tune leaves for later stages: the adapter (the best checkpoint's, with a validation split),
    the trainer's log history (written by olive_compat's progress hook) and its TensorBoard logs (Olive's
    output also holds a full copy of the base, and the trainer folder its checkpoints: neither is kept)."""
    result = out / "result"
    shutil.rmtree(result, ignore_errors=True)
    shutil.copytree(out / "adapter", result / "adapter")
    if (out / TRAINER_STATE).is_file():
        shutil.copy2(out / TRAINER_STATE, result / TRAINER_STATE)
    if (out / "trainer" / "runs").is_dir():
        shutil.copytree(out / "trainer" / "runs", result / "tensorboard")
    (result / DISTRIBUTED_FILE).write_text(json.dumps(distributed, indent=2) + "\n")
    return result


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare_splits(plan: Plan) -> dict[str, tuple[dict[str, str], dict[str, Any] | None]]:
    """Per adapter: the sha256 of each local split file (hub splits: their name) and which rows the trainer
    validates on. Cuts the seeded validation rows out of a local training file into the run's data folder."""
    out = {}
    for adapter in plan.adapters:
        data = adapter.spec.data
        if data.hub is not None:
            train, validation = data.hub_training_splits()
            source = f"hub:{data.hub}" + (f"/{data.subset}" if data.subset else "")
            shas = {"train": f"{source}:{train}", "eval": f"{source}:{data.eval_split}"}
            if validation:
                shas["validation"] = f"{source}:{validation}"
            out[adapter.name] = (shas, {"hub_split": validation} if validation else None)
            continue
        shas = {split: file_sha256(Path(getattr(data, split))) for split in ("train", "validation", "eval") if getattr(data, split)}
        validation = {"file": data.validation} if data.validation else None
        if adapter.cuts_validation:
            problems: list[str] = []
            rows = read_file_rows(Path(data.train), problems, data.field)
            seed = adapter.spec.training.seed
            held = validation_indices(len(rows.items), data.held_out_fraction, seed)
            held_set = set(held)
            parts: dict[str, list[str]] = {"train": [], "validation": []}
            for i, (_, row) in enumerate(rows.items):
                parts["validation" if i in held_set else "train"].append(json.dumps(row, ensure_ascii=False) + "\n")
            for split, lines in parts.items():
                _write_if_changed(plan.paths.split_file(adapter.name, split), "".join(lines))
            validation = {
                "held_out_from": data.train,
                "fraction": data.held_out_fraction,
                "seed": seed,
                rows.unit + "s": [rows.items[i][0] for i in held],
            }
        out[adapter.name] = (shas, validation)
    return out


def content_form(document: Any, plan: Plan) -> Any:
    """A workflow with the run's own paths replaced by what they hold or stand for: data files by their
    sha256, the base by a placeholder (its digest is keyed separately), the pipeline's run folders and the
    work dir by placeholders, the workflow's id (the pipeline's name) left out. A cache key of this form depends on content only, not on the pipeline's name,
    output or work dir, so a copy of a spec under another name reuses every unchanged result."""
    files: dict[str, str] = {}
    for adapter in plan.adapters:
        data = adapter.spec.data
        candidates = [getattr(data, s) for s in ("train", "validation", "eval") if data.hub is None and getattr(data, s)]
        candidates += [plan.paths.split_file(adapter.name, s).as_posix() for s in ("train", "validation")]
        for path in candidates:
            if Path(path).is_file():
                files[Path(path).as_posix()] = f"<file sha256:{file_sha256(Path(path))}>"
    prefixes = [(Path(plan.base_model).as_posix(), "<base>")] if plan.base_is_local else []
    prefixes += [
        ((plan.paths.work_dir / "runs" / plan.spec.name).as_posix(), "<runs>"),
        (plan.paths.work_dir.as_posix(), "<work>"),
    ]

    def norm(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: norm(v) for k, v in value.items()}
        if isinstance(value, list):
            return [norm(v) for v in value]
        if isinstance(value, str):
            if value in files:
                return files[value]
            for prefix, placeholder in prefixes:
                if value == prefix or value.startswith(prefix + "/"):
                    return placeholder + value[len(prefix) :]
        return value

    # workflow_id names Olive's run after the pipeline; it does not shape the result
    return norm({k: v for k, v in document.items() if k != "workflow_id"})


def training_key(plan: Plan, workflow: dict[str, Any], hooks: dict[str, Any], base: str, world_size: int = 1) -> str:
    """A fine-tune's cache key: its inputs' content, its settings and the training packages' versions; the
    world size of a data-parallel fine-tune (it multiplies the effective batch)."""
    document = {
        "stage": "finetune",
        "base": base,
        "workflow": content_form(workflow, plan),
        "trainer_hooks": content_form(hooks, plan),
        "packages": training_versions(),
    }
    if world_size > 1:  # single-process keys stay as they were
        document["world_size"] = world_size
    return content_key(document)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a trainer checkpoint cannot be resumed from (None: its files are exactly those it was sealed
    with when saved: olive_compat's CheckpointSeal)."""
    try:
        sealed: dict[str, str] = json.loads((checkpoint / SEAL_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no seal (written before it was complete, or by an older phi-pipeline)"
    present = file_digests(checkpoint, exclude=SEAL_FILE)
    if set(present) != set(sealed):
        return "its files differ from those sealed"
    damaged = [rel for rel, digest in present.items() if digest != sealed[rel]]
    return f"{', '.join(sorted(damaged))}: content differs from the seal" if damaged else None


def prepare_finetune_dir(out: Path, key: str, say: Callable[[str], None] = lambda _: None) -> str | None:
    """Keep the verified checkpoints of an interrupted fine-tune with this key (returned: the last one's
    name), else start from an empty folder. The trainer resumes from the newest checkpoint it finds, so one
    that fails its seal is removed with every later one (`say` tells which and why)."""
    trainer = out / "trainer"
    stamp = out / TRAINING_KEY_FILE
    checkpoints = sorted(trainer.glob("checkpoint-*"), key=lambda c: int(c.name.rsplit("-", 1)[1]))
    done: list[Path] = []
    if stamp.is_file() and stamp.read_text() == key:
        for checkpoint in checkpoints:
            problem = checkpoint_problem(checkpoint)
            if problem is not None:
                say(f"not resuming from {checkpoint.name}: {problem}")
                break
            done.append(checkpoint)
    if done:
        keep = {trainer / "runs", *done}
        for child in [*out.iterdir(), *trainer.iterdir()]:
            if child in (trainer, stamp) or child in keep:
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        return done[-1].name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stamp.write_text(key)
    return None


def discard_finetune_dir(out: Path) -> None:
    """Once a fine-tune's result is cached its work folder holds nothing to resume from: its checkpoints
    (and Olive's full copy of the base) go, so a rebuild of a damaged cache entry retrains from the start
    and reproduces a clean build's bytes."""
    shutil.rmtree(out, ignore_errors=True)
