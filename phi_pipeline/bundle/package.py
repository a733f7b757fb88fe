"""One model package for several targets: `--target cpu,cuda --package`.

Each target's bundle is published as usual (adapters are trained once where targets share a
training device: the fine-tune workflow does not depend on the export target). Olive's
`generate-model-package` then assembles the published bundles into an ORT model package, one
variant per target, and `package.json` beside it indexes the bundles it was made from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from phi_pipeline.bundle.layout import MANIFEST
from phi_pipeline.orchestration.cache import file_sha256
from phi_pipeline.bundle.publish import publish_dir
from phi_pipeline.orchestration.runner import run_olive_command

PACKAGE_SUFFIX = ".ortpackage"  # Olive appends it to the output name


def packable(bundles: list[Path]) -> tuple[list[Path], list[Path]]:
    """The bundles an ORT model package can hold (one GenAI model folder each), and the merged ones it cannot:
    a merged bundle is one model per adapter (variants/<adapter>/), not one variant of the package."""
    merged = [b for b in bundles if json.loads((b / MANIFEST).read_text()).get("layout") == "merged"]
    return [b for b in bundles if b not in merged], merged


def build_package(bundles: list[Path], log_dir: Path) -> Path:
    """Package published bundles (dist/<pipeline>/<target>) into dist/<pipeline>/<pipeline>.ortpackage."""
    pipeline_dir = bundles[0].parent
    name = pipeline_dir.name
    out = pipeline_dir / f"{name}{PACKAGE_SUFFIX}"
    built = pipeline_dir / f".{name}.package-tmp{PACKAGE_SUFFIX}"
    shutil.rmtree(built, ignore_errors=True)  # Olive wants an empty or missing output folder
    args = ["generate-model-package", "--model_name", name, "-o", str(built)]
    for bundle in bundles:
        args += ["-s", str(bundle)]
    run_olive_command(args, log_dir / "generate-model-package.log", [built / "manifest.json"])
    index = {
        "package": out.name,
        "targets": {
            b.name: {"bundle": b.as_posix(), "manifest_sha256": file_sha256(b / MANIFEST)} for b in bundles
        },
    }
    (built / "package.json").write_text(json.dumps(index, indent=2) + "\n")
    publish_dir(built, out)
    return out
