"""A built-in base on disk where a spec names it: built when missing or built by other builder code.

Each folder has a ``<folder>.built-by`` stamp beside it: the fingerprint of the code that built it
and the sha256 of each file it wrote, checked on every run, so an edited or damaged base is rebuilt,
never trained on. A derived base (tiny-llama, tiny-mistral, tiny-qwen2) first ensures tiny-phi3 in
the folder beside it named ``tiny-phi3`` (where the tiny-phi3 spec keeps it), then splits that in
seconds. smollm2-135m-instruct keeps its pinned wheel in ``.downloads`` beside its folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from phi_pipeline.digests import file_digests
from phi_pipeline.tiny import BUILTINS, REAL_BUILTIN, SOURCE_BUILTIN

# (built-in name, folder) -> a context that reports the build (the pipeline's stage)
Announce = Callable[[str, Path], AbstractContextManager]
_REAL_BUILDER = "smollm2.py"


def builder_fingerprint(name: str) -> str:
    """sha256 of the code that builds ``name`` (for the tiny bases also their corpus): a change means a rebuild."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        if (f.name == _REAL_BUILDER) == (name == REAL_BUILTIN) or f.name == "builtin.py":
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _current(folder: Path, stamp: Path, fingerprint: str) -> bool:
    """The folder holds what this builder wrote there, byte for byte."""
    try:
        record = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("builder") == fingerprint
            and record.get("files") == file_digests(folder))


def ensure_builtin(name: str, folder: Path, announce: Announce) -> None:
    """Build the built-in base ``name`` into ``folder`` unless a current, intact build is there.

    Built beside its destination and renamed into place, so a killed build leaves nothing
    that looks like a model."""
    folder = Path(folder)
    stamp = folder.with_name(folder.name + ".built-by")
    fingerprint = builder_fingerprint(name)
    if (folder / "config.json").is_file() and _current(folder, stamp, fingerprint):
        return
    source = None if name in (SOURCE_BUILTIN, REAL_BUILTIN) else folder.with_name(SOURCE_BUILTIN)
    if source == folder:
        raise ValueError(f"{folder}: {name} is derived from {SOURCE_BUILTIN}, kept in a folder of that name; "
                         "give this base another folder name")
    if source is not None:
        ensure_builtin(SOURCE_BUILTIN, source, announce)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    with announce(name, folder):
        shutil.rmtree(tmp, ignore_errors=True)
        if name == REAL_BUILTIN:
            from phi_pipeline.tiny.smollm2 import build_smollm2

            build_smollm2(tmp, downloads=folder.parent / ".downloads")
        elif source is None:
            from phi_pipeline.tiny.base_model import build_tiny_base

            build_tiny_base(tmp)
        else:
            from phi_pipeline.tiny.families import derive_base

            derive_base(source, BUILTINS[name][0], tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
        stamp.write_text(json.dumps({"builder": fingerprint, "files": file_digests(folder)}, indent=1) + "\n")
