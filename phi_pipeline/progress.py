"""Per-stage status lines with elapsed time, and the wall time of each stage for the manifest."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class Stages:
    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.seconds: dict[str, float] = {}
        self.cached: set[str] = set()
        self._start = time.perf_counter()

    def say(self, message: str) -> None:
        elapsed = time.perf_counter() - self._start
        self.stream.write(f"[{elapsed:7.1f}s] {message}\n")
        self.stream.flush()

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator["Stages"]:
        self.say(f"{what} ...")
        start = time.perf_counter()
        try:
            yield self
        except BaseException:
            self.say(f"{what}: failed after {time.perf_counter() - start:.1f}s")
            raise
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.say(f"{what}: {'cached' if name in self.cached else 'done'} in {self.seconds[name]:.1f}s")

    def mark_cached(self, name: str) -> None:
        self.cached.add(name)
