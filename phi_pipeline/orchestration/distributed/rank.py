"""One torchrun rank of a data-parallel fine-tune: ``python -m phi_pipeline.orchestration.distributed.rank run --config X``.

Reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE, pins the rank's device, rewrites the workflow for this rank
(phi_pipeline.orchestration.distributed.rank_workflow) into its own work folder and runs it through olive_compat, like a
single-process fine-tune.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from phi_pipeline.orchestration import olive_compat
from phi_pipeline.orchestration.distributed import DEVICE_ENV, backend, rank_dir, rank_hooks, rank_workflow


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    config = Path(args[args.index("--config") + 1])
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = os.environ.get(DEVICE_ENV, "cpu")
    if device == "cuda":
        import torch

        torch.cuda.set_device(local_rank)
    workflow = json.loads(config.read_text())
    finetune_dir = Path(workflow["output_dir"])
    mine = rank_workflow(workflow, rank, device)
    folder = rank_dir(finetune_dir, rank)
    folder.mkdir(parents=True, exist_ok=True)
    rank_config = folder / f"rank-{rank}.{config.name}"
    rank_config.write_text(json.dumps(mine, indent=2))
    hooks = olive_compat.trainer_hooks_from_env()
    if hooks:
        os.environ[olive_compat.HOOKS_ENV] = json.dumps(rank_hooks(hooks, rank, finetune_dir))
    print(f"phi-pipeline: rank {rank} of world size {world} (local rank {local_rank}) on {device}, "
          f"backend {backend(device)}", flush=True)
    args[args.index("--config") + 1] = str(rank_config)
    return olive_compat.main(args)


if __name__ == "__main__":
    sys.exit(main())
