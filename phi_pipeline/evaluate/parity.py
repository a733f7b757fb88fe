"""Running figures of one variant on one task: perplexity sums and the ONNX-vs-PyTorch parity tallies."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Tally:
    """Running figures of one variant (base or adapter) on one task."""

    onnx_text: list[str] = field(default_factory=list)
    torch_text: list[str] = field(default_factory=list)
    onnx_nll: float = 0.0
    torch_nll: float = 0.0
    answer_tokens: int = 0
    agree: int = 0
    positions: int = 0
    identical: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    n_abs: int = 0

    def diff(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.size:
            d = np.abs(a.astype(np.float64) - b.astype(np.float64))
            self.max_abs = max(self.max_abs, float(d.max()))
            self.sum_abs += float(d.sum())
            self.n_abs += d.size


def ppl(nll: float, n: int) -> float | None:
    if not n:
        return None
    try:
        return math.exp(nll / n)
    except OverflowError:
        return math.inf


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b
