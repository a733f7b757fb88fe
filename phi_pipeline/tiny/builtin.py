"""A built-in base on disk where a spec names it: built when missing or built by other builder code.

Each folder has a ``<folder>.built-by`` stamp beside it, the fingerprint of this package's code. A
derived base (tiny-llama, tiny-mistral, tiny-qwen2) first ensures tiny-phi3 in the folder beside
it named ``tiny-phi3`` (where the tiny-phi3 spec keeps it), then splits that in seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from phi_pipeline.tiny import BUILTINS, SOURCE_BUILTIN

# (built-in name, folder) -> a context that reports the build (the pipeline's stage)
Announce = Callable[[str, Path], AbstractContextManager]


def builder_fingerprint() -> str:
    """sha256 of the built-in bases' builder code and corpus: a change means a rebuild."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def ensure_builtin(name: str, folder: Path, announce: Announce) -> None:
    """Build the built-in base ``name`` into ``folder`` unless a current build is there.

    Built beside its destination and renamed into place, so a killed build leaves nothing
    that looks like a model."""
    folder = Path(folder)
    stamp = folder.with_name(folder.name + ".built-by")
    fingerprint = builder_fingerprint()
    if (folder / "config.json").is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
        return
    source = None if name == SOURCE_BUILTIN else folder.with_name(SOURCE_BUILTIN)
    if source == folder:
        raise ValueError(f"{folder}: {name} is derived from {SOURCE_BUILTIN}, kept in a folder of that name; "
                         "give this base another folder name")
    if source is not None:
        ensure_builtin(SOURCE_BUILTIN, source, announce)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    with announce(name, folder):
        shutil.rmtree(tmp, ignore_errors=True)
        if source is None:
            from phi_pipeline.tiny.base_model import build_tiny_base

            build_tiny_base(tmp)
        else:
            from phi_pipeline.tiny.families import derive_base

            derive_base(source, BUILTINS[name][0], tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
        stamp.write_text(fingerprint)
