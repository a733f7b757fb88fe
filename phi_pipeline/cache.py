"""Content-addressed cache: results keyed on the bytes and settings that made them, never on paths.

Olive's own cache keys on a data file's path, so a dataset edited in place silently reuses a stale
adapter. Here a key is the sha256 of a canonical JSON document of everything that determines a
result (file digests, settings, package versions); an entry becomes visible only once complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

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


def tree_sha256(folder: Path, memo: "DigestMemo | None" = None) -> str:
    """Digest of a folder's files (relative names and contents)."""
    h = hashlib.sha256()
    for p in tree_files(folder):
        digest = memo.file(p) if memo else file_sha256(p)
        h.update(f"{p.relative_to(folder).as_posix()}\0{digest}\n".encode())
    return h.hexdigest()


def content_key(document: dict[str, Any]) -> str:
    """sha256 of a canonical JSON rendering of a key document."""
    blob = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class DigestMemo:
    """Remembers file digests by (path, size, mtime) so multi-GB base models are hashed once."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._memo: dict[str, list] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._memo = {}
        self._dirty = False

    def file(self, p: Path) -> str:
        st = p.stat()
        k = str(p.resolve())
        entry = self._memo.get(k)
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        digest = file_sha256(p)
        self._memo[k] = [st.st_size, st.st_mtime_ns, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        if self._dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self._memo))
            os.replace(tmp, self.path)
            self._dirty = False


class Cache:
    """Entries are folders `<root>/<kind>/<key>/`; a folder exists only once its content is complete."""

    def __init__(self, root: Path):
        self.root = root

    def get(self, kind: str, key: str) -> Path | None:
        entry = self.root / kind / key
        return entry if entry.is_dir() else None

    def put(self, kind: str, key: str, source: Path, meta: dict[str, Any]) -> Path:
        """Copy `source` into the cache under `key`, atomically (copy to a temp name, then rename)."""
        entry = self.root / kind / key
        if entry.is_dir():
            return entry
        tmp = self.root / kind / f".{key}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        (tmp / "cache-entry.json").write_text(json.dumps({"key": key, **meta}, indent=2, default=str))
        try:
            os.rename(tmp, entry)
        except OSError:
            # another run completed the same entry first; theirs is equivalent by construction
            shutil.rmtree(tmp, ignore_errors=True)
        return entry
