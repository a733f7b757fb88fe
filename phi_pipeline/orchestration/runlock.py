"""One run per pipeline and target at a time: a lock file in the work dir.

The lock is a kernel flock on the file: the kernel drops it when its process dies, however it
dies, so a killed run's lock is free at once and the next run takes it over (and says so). The
file holds the holder's pid and start time, for the message of a run that waits. Written on
fcntl rather than with the filelock package: filelock truncates the file each time it tries to
lock it, so a waiting run could not read who holds it. fcntl is imported where a lock is taken:
runs are POSIX-only, but bundle.py and cache.py (pid_alive) are also imported where bundles are used.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from phi_pipeline.errors import PipelineError


class LockHeld(PipelineError):
    """Another run holds the lock and the caller asked not to wait (exit code 1)."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _holder(fd: int) -> dict:
    for _ in range(20):  # the holder writes its record right after locking
        try:
            record = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            record = None
        if isinstance(record, dict):
            return record
        time.sleep(0.05)
    return {}


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


class RunLock:
    """`with RunLock(path, what, wait=..., say=...)`: held for the block; `what` names the work it guards."""

    def __init__(self, path: Path, what: str, *, wait: bool = True, say: Callable[[str], None] = print):
        self.path = path
        self.what = what
        self.wait = wait
        self.say = say
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_holder(fd))
                if not self.wait:
                    raise LockHeld(f"{self.what} is already running ({holder}; lock {self.path}); let it finish first") from None
                self.say(f"waiting for the run holding {self.what} to finish ({holder}; lock {self.path}) ...")
                fcntl.flock(fd, fcntl.LOCK_EX)  # an interrupt (Ctrl-C, SIGTERM) ends the wait
            else:
                left = _holder(fd) if os.fstat(fd).st_size else {}
                if left.get("pid") not in (None, os.getpid()):
                    self.say(f"took over the lock of {self.what} left by a run that is no longer running ({_describe(left)})")
            record = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        assert self._fd is not None
        os.ftruncate(self._fd, 0)  # released in order: nothing for the next run to take over
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
