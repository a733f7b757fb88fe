"""Atomic replacement of a published folder: the old bundle stays whole until the new one is.

On Linux the staged folder and the published one are exchanged in one `renameat2(RENAME_EXCHANGE)`
call, so at every instant `dist/<pipeline>/<target>` is either the complete old bundle or the
complete new one; the old one is then deleted from the staging side. Elsewhere two renames are
used, and `recover()` puts a bundle back if a crash fell between them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import sys
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the platform cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: file system or kernel cannot exchange
            return False
        raise OSError(err, os.strerror(err), str(a))
    return True


def _previous(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.previous")


def recover(dest: Path) -> None:
    """Undo an interrupted two-rename publish: restore the previous bundle if the new one is missing."""
    prev = _previous(dest)
    if prev.exists():
        if dest.exists():
            shutil.rmtree(prev)
        else:
            os.rename(prev, dest)


def publish_dir(staged: Path, dest: Path) -> None:
    """Make `staged` the folder at `dest`, replacing any previous one atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    if not dest.exists():
        os.rename(staged, dest)
        return
    if _exchange(staged, dest):
        shutil.rmtree(staged)  # now holds the previous bundle
        return
    prev = _previous(dest)
    os.rename(dest, prev)
    os.rename(staged, dest)
    shutil.rmtree(prev)
