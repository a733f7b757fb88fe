"""Content-addressed cache: results keyed on the bytes and settings that made them, never on paths.

Olive's own cache keys on a data file's path, so a dataset edited in place silently reuses a stale
adapter. Here a key is the sha256 of a canonical JSON document of everything that determines a
result (file digests, settings, package versions); an entry becomes visible only once complete.

Like git's or Nix's stores, an entry is checked when it is read, not only when it is written: its
record (cache-entry.json) holds the sha256 of each file as written, and `get` re-hashes them. A
damaged entry is reported, discarded and rebuilt, never used. Large files are re-hashed only when
their size or mtime changed since they were last hashed (DigestMemo), so a no-op run stays fast;
`phi-pipeline cache verify` re-hashes everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import contextlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from phi_pipeline.digests import file_digests, file_sha256, tree_files
from phi_pipeline.orchestration.diskspace import human, space_for, tree_size
from phi_pipeline.pipeline_spec.paths import locks_dir
from phi_pipeline.orchestration.runlock import RunLock, pid_alive

ENTRY_RECORD = "cache-entry.json"
ROOTS = "roots"
"""<root>/roots/<pipeline>.<target>.json: the entries a pipeline's runs used, which prune keeps."""
MEMO_MIN_BYTES = 16 << 20
"""Files at least this large are re-hashed on read only when their size or mtime changed."""


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

    def record(self, p: Path, digest: str) -> None:
        """Remember a digest just computed for p (as it is on disk now)."""
        st = p.stat()
        self._memo[str(p.resolve())] = [st.st_size, st.st_mtime_ns, digest]
        self._dirty = True

    def save(self) -> None:
        if self._dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            try:
                with space_for(self.path.parent, len(json.dumps(self._memo)), "the digest memo"):
                    tmp.write_text(json.dumps(self._memo))
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
            self._dirty = False


def check_entry(entry: Path, memo: DigestMemo | None = None) -> list[str]:
    """How an entry's files differ from its record ([] if intact). With a memo, files of at least
    MEMO_MIN_BYTES are re-hashed only when their size or mtime changed."""
    try:
        recorded: dict[str, str] = json.loads((entry / ENTRY_RECORD).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{ENTRY_RECORD}: missing, unreadable or without file digests (written by an older phi-pipeline?)"]
    present = {p.relative_to(entry).as_posix(): p for p in tree_files(entry)}
    present.pop(ENTRY_RECORD, None)
    problems = [f"{rel}: recorded but missing" for rel in sorted(set(recorded) - set(present))]
    problems += [f"{rel}: present but not recorded" for rel in sorted(set(present) - set(recorded))]
    for rel in sorted(set(recorded) & set(present)):
        p = present[rel]
        digest = memo.file(p) if memo is not None and p.stat().st_size >= MEMO_MIN_BYTES else file_sha256(p)
        if digest != recorded[rel]:
            problems.append(f"{rel}: sha256 differs from the one recorded when the entry was written")
    return problems


@dataclass(frozen=True)
class Entry:
    kind: str
    key: str
    path: Path

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.key}"

    def record(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / ENTRY_RECORD).read_text())
        except (OSError, ValueError):
            return {}


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def _left_by_dead_run(name: str) -> bool:
    """A `.<key>.tmp<pid>` or `.<key>.discarded<pid>` folder whose writer is no longer running."""
    digits = name[len(name.rstrip("0123456789")):]
    return not digits or (int(digits) != os.getpid() and not pid_alive(int(digits)))


class Cache:
    """Entries are folders `<root>/<kind>/<key>/`; a folder exists only once its content is complete."""

    def __init__(self, root: Path, memo: DigestMemo | None = None, warn: Callable[[str], None] = _warn):
        self.root = root
        self.memo = memo
        self.warn = warn
        self.used: set[str] = set()
        """`kind/key` of every entry this object returned: what a run used, for prune."""

    def get(self, kind: str, key: str) -> Path | None:
        """The entry, if present and intact; a damaged one is reported and discarded (None: rebuild it)."""
        entry = self.root / kind / key
        if not entry.is_dir():
            return None
        problems = check_entry(entry, self.memo)
        if self.memo is not None:
            self.memo.save()
        if problems:
            self.warn(
                f"warning: cache entry {kind}/{key} ({entry}) is damaged; discarding it and rebuilding:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
            self.discard(kind, key)
            return None
        self.used.add(f"{kind}/{key}")
        return entry

    def discard(self, kind: str, key: str) -> None:
        """Remove an entry; renamed away first, so no reader ever sees it half-deleted."""
        entry = self.root / kind / key
        gone = self.root / kind / f".{key}.discarded{os.getpid()}"
        try:
            os.rename(entry, gone)
        except FileNotFoundError:
            return
        shutil.rmtree(gone, ignore_errors=True)

    def put(self, kind: str, key: str, source: Path, meta: dict[str, Any]) -> Path:
        """Copy `source` into the cache under `key`, atomically (copy to a temp name, then rename),
        with the sha256 of each file as written."""
        entry = self.root / kind / key
        if entry.is_dir():
            self.used.add(f"{kind}/{key}")
            return entry
        tmp = self.root / kind / f".{key}.tmp{os.getpid()}"
        try:
            with space_for(self.root / kind, tree_size(source), f"cache entry {kind}/{key}"):
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(source, tmp)
                files = file_digests(tmp)
                record = {"key": key, **meta, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
                (tmp / ENTRY_RECORD).write_text(json.dumps(record, indent=2, default=str))
        except BaseException:  # a full disk or an interrupt leaves no partial entry
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.rename(tmp, entry)
        except OSError:
            # another run completed the same entry first; theirs is equivalent by construction
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            if self.memo is not None:  # hashed just now: the next read need not re-hash the large files
                for rel, digest in files.items():
                    self.memo.record(entry / rel, digest)
                self.memo.save()
        self.used.add(f"{kind}/{key}")
        return entry

    def _kinds(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name != ROOTS)

    def entries(self) -> list[Entry]:
        """Every complete entry, by kind and key (dot-names are temporary or being discarded)."""
        return [
            Entry(kind.name, e.name, e)
            for kind in self._kinds()
            for e in sorted(kind.iterdir())
            if e.is_dir() and not e.name.startswith(".")
        ]

    def record_use(self, pipeline: str, target: str, published: bool) -> None:
        """Remember the entries this run used (and, once published, those the bundle was built from)."""
        path = self.root / ROOTS / f"{pipeline}.{target}.json"
        try:
            roots = json.loads(path.read_text())
        except (OSError, ValueError):
            roots = {}
        roots.update({"pipeline": pipeline, "target": target, "last_run": sorted(self.used)})
        if published:
            roots["published"] = sorted(self.used)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(roots, indent=2) + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def prune(self, pipelines: set[str]) -> list[tuple[str, int]]:
        """Remove what `pipelines` do not need: entries none of their runs used (latest run or published
        bundle), damaged entries and leftovers of killed runs. Returns (name, bytes) of what went."""
        keep: set[str] = set()
        removed = []
        for path in sorted((self.root / ROOTS).glob("*.json")):
            try:
                roots = json.loads(path.read_text())
            except (OSError, ValueError):
                roots = {}
            if roots.get("pipeline") in pipelines:
                keep.update(roots.get("last_run", []), roots.get("published", []))
            else:
                path.unlink()
        for e in self.entries():
            if e.name not in keep or check_entry(e.path):
                size = tree_size(e.path)
                self.discard(e.kind, e.key)
                removed.append((e.name, size))
        for kind in self._kinds():
            for leftover in kind.glob(".*"):
                if leftover.is_dir() and _left_by_dead_run(leftover.name):
                    size = tree_size(leftover)
                    shutil.rmtree(leftover, ignore_errors=True)
                    removed.append((f"{kind.name}/{leftover.name}", size))
        return removed


def _made_for(record: dict[str, Any]) -> str:
    return ", ".join(f"{k} {record[k]}" for k in ("pipeline", "target", "adapter") if k in record)


def info_cli(root: Path) -> int:
    """`phi-pipeline cache info`: every entry, its size and what it was made for."""
    entries = Cache(root).entries()
    sizes = {e.name: tree_size(e.path) for e in entries}
    print(f"{root}: {len(entries)} entries, {human(sum(sizes.values()))}")
    for e in entries:
        record = e.record()
        print(f"  {e.kind}/{e.key[:12]}  {human(sizes[e.name]):>10}  {record.get('created', '?')}  {_made_for(record)}")
    return 0


def verify_cli(root: Path) -> int:
    """`phi-pipeline cache verify`: re-hash every file of every entry (no memo); exit 1 if any is damaged."""
    entries = Cache(root).entries()
    damaged = 0
    for e in entries:
        problems = check_entry(e.path)
        if problems:
            damaged += 1
            print(f"{e.name}: damaged", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
    if damaged:
        print(
            f"{damaged} of {len(entries)} entries damaged in {root}; the next run rebuilds them "
            "(phi-pipeline cache prune removes them now)",
            file=sys.stderr,
        )
        return 1
    print(f"{root}: all {len(entries)} entries match the digests recorded when they were written")
    return 0


def prune_cli(root: Path, specs: list[Path]) -> int:
    """`phi-pipeline cache prune`: keep what the specs' pipelines use; refuse while any run holds its lock."""
    from phi_pipeline.pipeline_spec.schema import load_spec

    pipelines = {load_spec(s).name for s in specs}
    with contextlib.ExitStack() as held:  # a running run may have written entries it has not recorded yet
        for lock in sorted(locks_dir(root.parent).glob("*.lock")):  # root is <work_dir>/cache
            held.enter_context(RunLock(lock, lock.stem, wait=False))
        removed = Cache(root).prune(pipelines)
    for name, size in removed:
        print(f"removed {name} ({human(size)})")
    freed = human(sum(size for _, size in removed))
    print(f"{root}: removed {len(removed)} entries, {freed}; kept those used by {', '.join(sorted(pipelines)) or 'no pipeline'}")
    return 0
