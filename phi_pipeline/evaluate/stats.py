"""Median / min / max summaries and paired ratios: every speed figure (bench, export search) is reported this way."""

from __future__ import annotations

import os
import statistics
from typing import Any, Sequence


def summary(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """{"median", "min", "max", "n"} of `values` (all None when there are none)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """median(a) / median(b) of two summaries, or None when either is missing."""
    if a.get("median") is None or not b.get("median"):
        return None
    return round(a["median"] / b["median"], 4)


def per_round_ratios(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], length: str, key: str,
                     invert: bool = False) -> list[float]:
    """a/b in each round (b/a with invert: for times, where lower is better); a and b are per-round
    results {prompt length: {key: value}} of two rows taken in the same rounds."""
    return [(y[length][key] / x[length][key]) if invert else (x[length][key] / y[length][key])
            for x, y in zip(a, b) if length in x and length in y and x[length].get(key) and y[length].get(key)]


def paired_ratio(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], length: str, key: str,
                 invert: bool = False) -> dict[str, Any]:
    """Summary of per_round_ratios."""
    return summary(per_round_ratios(a, b, length, key, invert))


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages: how busy the machine was while a figure was taken."""
    return [round(x, 2) for x in os.getloadavg()]
