"""Olive's own checks of a generated workflow: its run-config schema, then each pass's parameters.

RunConfig refuses a PythonEnvironment system whose interpreter does not exist, so the check runs in
a scratch folder where every target's extra virtual environment is a link to this interpreter
(the configs name them relative to the project root).
"""

from __future__ import annotations

import os
import sys
from copy import deepcopy
from functools import lru_cache
from pathlib import Path
from typing import Any

from phi_pipeline.pipeline_spec.targets import TARGETS


@lru_cache(maxsize=1)
def _package_config():
    from olive.package_config import OlivePackageConfig

    return OlivePackageConfig.parse_file_or_obj(OlivePackageConfig.get_default_config_path())


def fake_environments(root: Path) -> None:
    """Every venv a config may name as an Olive PythonEnvironment, as a link to this interpreter."""
    for venv in {t.venv for t in TARGETS.values()} | {t.pass_venv for t in TARGETS.values() if t.pass_venv}:
        python = root / venv / "bin" / "python"
        if not python.exists():
            python.parent.mkdir(parents=True, exist_ok=True)
            python.symlink_to(sys.executable)


def olive_check(config: dict[str, Any], scratch: Path) -> list[str]:
    """Parse `config` as Olive does and validate every pass for the target's accelerator.

    Returns the pass types whose own validate_config could not run here because it imports a
    package of another environment (e.g. nncf for OpenVINO); raises on any schema or value error.
    """
    from olive.hardware.accelerator import AcceleratorSpec, Device
    from olive.workflows.run.config import RunConfig

    fake_environments(scratch)
    old = Path.cwd()
    os.chdir(scratch)
    try:
        run_config = RunConfig.parse_file_or_obj(deepcopy(config))  # parse mutates its argument
    finally:
        os.chdir(old)
    accelerator = run_config.engine.target.config.accelerators[0]
    spec = AcceleratorSpec(
        accelerator_type=Device(accelerator.device), execution_provider=accelerator.execution_providers[0]
    )
    not_validated = []
    for pass_configs in run_config.passes.values():
        for p in pass_configs:
            cls = _package_config().import_pass_module(p.type)
            pass_config = cls.generate_config(spec, deepcopy(p.config), {}, True)
            try:
                valid = cls.validate_config(pass_config, spec)
            except ImportError:
                not_validated.append(p.type)
                continue
            assert valid, f"Olive's {p.type} refuses {p.config} for {spec}"
    return not_validated
