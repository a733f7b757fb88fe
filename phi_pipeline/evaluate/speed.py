"""Speed of a bundle, measured so that two variants can be compared on one busy machine.

One place for what `phi-pipeline bench` and the export search share: how a request is timed (time
to first token, decode tokens/s), the rounds every compared row runs in (a seeded shuffle per round,
so no row always follows the same one and each round's results pair), and the verdict rule that
says whether a paired ratio is a real difference or this machine's noise.

Timings: time to first token (TTFT) runs from the start of a request (generator creation, adapter
activation, prefill, first token) to the first new token; decode tokens/s counts the tokens after
the first over the time after it. Generation is greedy and forced to exactly `new_tokens` tokens.
"""

from __future__ import annotations

import os
import platform
import random
import time
from pathlib import Path
from dataclasses import dataclass
from statistics import median
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from phi_pipeline.runtime.genai import GenaiModel

NOISE = 0.03  # paired medians within 3 % of 1 are "no measurable change" on a shared 2-core machine
CONSISTENT = 0.8  # and a verdict needs the same sign in 8 rounds of 10


# Instruction-set extensions the int4 kernels of onnxruntime and llama.cpp dispatch on: speed ratios
# between them swing with these (llama.cpp gains more from AVX-512 VNNI than MLAS does), so every
# figure is recorded with them.
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_int8", "amx_bf16", "neon", "asimd", "asimddp", "sve")


def cpu() -> dict[str, object]:
    """The CPU the figures were taken on: model name, cores and the ISA_FLAGS it has (Linux /proc/cpuinfo)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "isa": [f for f in ISA_FLAGS if f in flags]}


@dataclass(frozen=True)
class Timing:
    ttft_s: float
    decode_tok_s: float
    decode_cpu_ms: float
    """Process CPU milliseconds per decode token: unlike wall time, hardly moved by other processes
    competing for the cores when the engine runs one thread (with more, idle threads spin)."""


def timing(start: float, first: tuple[float, float], last: tuple[float, float], tokens: int) -> Timing:
    """From (wall, cpu) clock pairs at the first and last new token; `tokens` new tokens in all."""
    steps = tokens - 1
    return Timing(
        first[0] - start,
        steps / (last[0] - first[0]) if steps else 0.0,
        1000 * (last[1] - first[1]) / steps if steps else 0.0,
    )


def random_prompt(length: int, vocab_size: int, seed: int = 0) -> list[int]:
    """Token ids drawn over the whole vocabulary: every compared row sees the same prompt."""
    return np.random.default_rng(seed + length).integers(0, vocab_size, length).tolist()


def time_request(runtime: GenaiModel, ids: list[int], new_tokens: int, adapter: str | None) -> Timing:
    """One greedy request of exactly `new_tokens` tokens on an ONNX Runtime GenAI model, timed."""
    start = time.perf_counter()
    generation = runtime.start(ids, adapter, new_tokens, min_new_tokens=new_tokens)
    generation.feed()
    generation.step()
    first = time.perf_counter(), time.process_time()
    while not generation.done:
        generation.step()
    last = time.perf_counter(), time.process_time()
    produced = len(generation.new_tokens)
    if produced != new_tokens:
        raise RuntimeError(f"generated {produced} tokens, expected {new_tokens}")
    return timing(start, first, last, produced)


def measure_rounds(names: list[str], run_row: Callable[[str, int], dict[str, Any]], rounds: int,
                   say: Callable[[str], None], row_rounds: dict[str, int] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every row once per round, in an order shuffled per round (seeded: no row always follows the same
    one): {row name: [round results]}. A row named in `row_rounds` runs in that many first rounds only, so
    its results still pair with the others' by index."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for i in range(rounds):
        order = list(names)
        random.Random(i).shuffle(order)
        for name in order:
            if i >= (row_rounds or {}).get(name, rounds):
                continue
            say(f"round {i + 1}/{rounds}: {name}")
            out[name].append(run_row(name, i))
    return out


def verdict(ratios: list[list[float]]) -> str:
    """From per-round ratios (a row / the row it is compared with, higher is better) at each prompt
    length: `faster` where at every length the median is above 1 + NOISE and the row was faster in at
    least CONSISTENT of the rounds, `slower` the same way down, else `no measurable change`."""
    if not ratios or not all(ratios):
        return "not measured"
    if all(median(r) > 1 + NOISE and sum(x > 1 for x in r) >= CONSISTENT * len(r) for r in ratios):
        return "faster"
    if all(median(r) < 1 - NOISE and sum(x < 1 for x in r) >= CONSISTENT * len(r) for r in ratios):
        return "slower"
    return "no measurable change"
