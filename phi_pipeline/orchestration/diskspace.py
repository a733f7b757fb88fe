"""Out of disk space: one clear error naming the folder and the space needed, wherever a write fails.

A full disk surfaces as OSError(ENOSPC) from a single write, or inside shutil.copytree's
aggregated shutil.Error (which carries the messages, not the errno); both become a DiskFullError.
Callers write to temporary names and rename, so the error leaves nothing half-written behind.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from phi_pipeline.errors import PipelineError

_ENOSPC_TEXT = os.strerror(errno.ENOSPC)  # "No space left on device"


class DiskFullError(PipelineError):
    """A write failed for lack of space (exit code 1)."""


def tree_size(path: Path, exclude: tuple[str, ...] = ()) -> int:
    """Bytes of a file, or of every regular file below a folder but those under a subfolder named in `exclude`."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*")
               if p.is_file() and not any(x in p.relative_to(path).parts for x in exclude))


def human(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            break
    return f"{n:.1f} {unit}"


def free_bytes(folder: Path) -> int:
    """Free space on the file system that holds folder (or its nearest existing parent)."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def is_enospc_text(text: str) -> bool:
    """A log line reporting a full disk (Python's OSError, or a C library's message)."""
    return _ENOSPC_TEXT in text


def is_enospc(exc: BaseException) -> bool:
    if isinstance(exc, shutil.Error):  # copytree: a list of (src, dst, message)
        return any(_ENOSPC_TEXT in str(item) for item in (exc.args[0] if exc.args else []))
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def disk_full(folder: Path, needed: int | None, what: str) -> DiskFullError:
    need = f"it needs about {human(needed)}" if needed else "it needs more space"
    return DiskFullError(
        f"out of disk space while writing {what} in {folder}: {need}, {human(free_bytes(folder))} is free there. "
        "Nothing was half-written; free some space (phi-pipeline cache prune removes cache entries no spec "
        "uses) and run again."
    )


@contextmanager
def space_for(folder: Path, needed: int | None, what: str) -> Iterator[None]:
    """Turn a failed write below `folder` into a DiskFullError naming it and the space `needed`."""
    try:
        yield
    except OSError as exc:  # shutil.Error is an OSError
        if is_enospc(exc):
            raise disk_full(folder, needed, what) from exc
        raise
