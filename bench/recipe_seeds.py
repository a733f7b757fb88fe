"""A shipped spec's recipe at several training seeds: each adapter's eval exact match (PyTorch+PEFT and the
int4 ONNX bundle), the base model's, and the learned floor's validation losses. Seeds stand in for other CPUs
(training on another instruction set takes another floating-point path, much as another seed does).

    .venv/bin/python bench/recipe_seeds.py pipelines/tiny-phi3.yaml --seeds 42,1,2 --out bench/recipe-seeds.jsonl

Each seed is a full `phi-pipeline run --no-gate` of a copy of the spec named seeds-<name> (export search off;
the spec's own export settings), so its fine-tunes are cached like any run's. Prints one JSON line per
adapter and seed and appends it to --out; docs/recipes.md tabulates them.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--seeds", default="42,1,2", help="training seeds, comma-separated (default 42,1,2)")
    parser.add_argument("--out", default="bench/recipe-seeds.jsonl", help="JSON lines appended here")
    args = parser.parse_args()
    original = yaml.safe_load(Path(args.spec).read_text())
    name = f"seeds-{original['name']}"
    for seed in (int(s) for s in args.seeds.split(",")):
        spec = copy.deepcopy(original)
        spec["name"] = name
        spec["export"].pop("search", None)
        spec["training"]["seed"] = seed
        for adapter in spec["adapters"]:  # an adapter's own seed would win over the top-level one
            adapter.get("training", {}).pop("seed", None)
        # data paths are relative to the project root (the working directory), not to the spec file
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(spec, f, sort_keys=False)
        try:
            run = subprocess.run([sys.executable, "-m", "phi_pipeline.cli", "run", f.name, "--no-gate"],
                                 capture_output=True, text=True)
        finally:
            Path(f.name).unlink()
        if run.returncode:
            print(f"{args.spec} seed {seed}: the run failed:\n{run.stderr[-2000:]}", file=sys.stderr)
            return 1
        manifest = json.loads(Path(spec.get("output_dir", "dist"), name, "cpu", "manifest.json").read_text())
        for adapter in manifest["adapters"]:
            figures = manifest["evaluation"]["adapters"][adapter["name"]]
            losses = [(h["step"], h["eval_loss"]) for h in adapter["training_history"] if "eval_loss" in h]
            row = {"spec": args.spec, "seed": seed, "adapter": adapter["name"], "metric": figures["metric"],
                   "pytorch": figures["adapter_pytorch"], "onnx": figures["adapter_onnx"], "base": figures["base_onnx"],
                   "validation_loss_before": losses[0][1] if losses and losses[0][0] == 0 else None,
                   "validation_loss_best": min((loss for step, loss in losses if step > 0), default=None),
                   "gate_failures": [f for f in manifest["gates"]["failures"] if f"adapter {adapter['name']!r}" in f]}
            print(json.dumps(row))
            with open(args.out, "a", encoding="utf-8") as out:
                out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
