"""sha256 of files and folders: what the cache, checkpoint seals and the built-in bases' stamps record."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_files(folder: Path) -> list[Path]:
    """Every regular file below folder, sorted by relative path."""
    return sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())


def file_digests(folder: Path, exclude: str | None = None) -> dict[str, str]:
    """sha256 of every file below folder by relative path (a record of what it held), but `exclude`."""
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in tree_files(folder) if p.name != exclude}
