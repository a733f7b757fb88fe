"""The benchmark's options and the names its sections share (below run.py and peer.py, which both read them)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "phi-pipeline-bench/1"
ADAPTER_RANKS = {"r8": 8, "r16": 16}
TABLE_ADAPTER = "r8"  # the adapter of the "with an adapter" rows
PRECISIONS = {"cpu": ("int4", "fp32"), "cuda": ("int4", "fp16")}


@dataclass(frozen=True)
class BenchOptions:
    bundle: Path
    """A published bundle (dist/<pipeline>/<target>); also lends its tokenizer to the benchmark base."""
    out_dir: Path = Path("bench")
    size: str = "150m"
    reps: int = 3
    prompt_lens: tuple[int, ...] = (64, 512)
    new_tokens: int = 128
    device: str = "cpu"
    work_dir: Path = Path(".phi-pipeline/bench")
    project_root: Path = Path(".")
    pipeline_reps: int = 1
    """0 skips the pipeline-cost section (it runs the tiny pipeline twice: minutes)."""
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    peer: str | None = None
    """"llama.cpp": also build llama.cpp and run it against the bundle (peer.py)."""
    peer_rounds: int = 5
    """Interleaved rounds of the peer comparison (each runs every row once)."""
    peer_sizes: tuple[str, ...] = ()
    """More bench bases the peer comparison also runs on, each its own section (e.g. the Llama-shaped one)."""
