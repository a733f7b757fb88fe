"""What a benchmark ran on: every bench's JSON records it, so figures from different machines are not compared."""

from __future__ import annotations

import os
import platform
from typing import Any

from phi_pipeline.evaluate.speed import cpu
from phi_pipeline.evaluate.stats import load_average
from phi_pipeline.versions import package_versions


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "load_average_start": load_average(),
    }


def describe(m: dict[str, Any]) -> str:
    """The CPU model and the instruction-set extensions the int4 kernels dispatch on (older results: the arch)."""
    cpu = m.get("cpu")
    if not cpu:
        return m["processor"]
    return f"{cpu['model']}, {m['processor']}, ISA {' '.join(cpu['isa']) or 'unknown'}"
