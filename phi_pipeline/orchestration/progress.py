"""Per-stage status lines with elapsed time, the wall time of each stage for the manifest, and a live
progress line per fine-tune."""

from __future__ import annotations

import json
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class Stages:
    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr  # the stderr of now, not of import time
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


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def progress_line(adapter: str, record: dict[str, Any], begin: dict[str, Any] | None, losses: dict[str, float]) -> str:
    """One fine-tune's state: step / total, the latest training and validation loss, elapsed and remaining."""
    step, total = record["step"], record.get("max_steps") or 0
    parts = [f"{adapter}: step {step}/{total}" + (f" ({100 * step // total}%)" if total else "")]
    if "loss" in losses:
        parts.append(f"loss {losses['loss']:.4f}")
    if "eval_loss" in losses:
        parts.append(f"val loss {losses['eval_loss']:.4f}")
    if begin is not None:
        elapsed = record["time"] - begin["time"]
        done = step - begin["step"]
        remaining = f", ~{_clock(elapsed / done * (total - step))} left" if done > 0 and total > step else ""
        parts.append(f"{_clock(elapsed)} elapsed{remaining}")
    return " | ".join(parts)


class TrainingProgress:
    """Tails the JSON lines a fine-tune's trainer writes (olive_compat's progress hook) in a thread and shows
    a progress line per trainer log: rewritten in place on a terminal, one line each otherwise."""

    def __init__(self, stages: Stages, adapter: str, path: Path, interval: float = 1.0):
        self.stages, self.adapter, self.path, self.interval = stages, adapter, path, interval
        self._stop = threading.Event()
        self._offset = 0
        self._begin: dict[str, Any] | None = None
        self._losses: dict[str, float] = {}
        self._live = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TrainingProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._read()
        if self._live:
            self.stages.stream.write("\n")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    def _read(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind("\n") + 1]  # a line being written is read next time
        self._offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self._show(record)

    def _show(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "begin":
            self._begin = record
            if record["step"]:
                self._say(f"{self.adapter}: training resumed at step {record['step']}/{record['max_steps']}", keep=True)
            return
        self._losses.update({k: record[k] for k in ("loss", "eval_loss") if k in record})
        line = progress_line(self.adapter, record, self._begin, self._losses)
        if event == "end":
            if record["step"] < record["max_steps"]:
                line += " | stopped early"
            if record.get("best_checkpoint"):
                line += f" | best val loss {record['best_eval_loss']:.4f} ({Path(record['best_checkpoint']).name})"
        self._say(line, keep=event == "end")

    def _say(self, message: str, keep: bool) -> None:
        stream = self.stages.stream
        if getattr(stream, "isatty", lambda: False)():
            stream.write(f"\r\x1b[K  {message}" + ("\n" if keep else ""))
            stream.flush()
            self._live = not keep
        else:
            self.stages.say(f"  {message}")
