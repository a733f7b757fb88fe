"""Data-parallel fine-tuning under torchrun: how a fine-tune is launched and what each rank changes.

Olive 0.13's LoRA pass has no launcher (it trains in-process with ``device_map="auto"``), so a data-parallel
fine-tune starts ``python -m torch.distributed.run`` with :mod:`phi_pipeline.orchestration.distributed.rank` as its
module: every rank runs the same Olive LoRA workflow, rewritten by :func:`rank_workflow` for its own device,
Olive cache and work folder. Rank 0's adapter is the result. Pure: no torch, no I/O.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEVICE_ENV = "PHI_PIPELINE_DDP_DEVICE"
"""Set for the ranks: the training device (cpu or cuda) the launcher chose."""
DISTRIBUTED_FILE = "distributed.json"
"""In a fine-tune's cache entry: world size, backend and effective batch (describe)."""
RANKS_DIR = "ranks"
"""In a fine-tune's work folder: rank-<k>/ for every rank but 0 (rank 0 writes where a single process would)."""


@dataclass(frozen=True)
class Launch:
    """How fine-tunes are launched (from the command line; nproc_per_node None: each adapter's
    training.nproc_per_node)."""

    nproc_per_node: int | None = None
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500

    def problems(self) -> list[str]:
        out = []
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            out.append("--nproc-per-node: give a process count >= 1")
        if self.nnodes < 1:
            out.append("--nnodes: give a node count >= 1")
        elif not 0 <= self.node_rank < self.nnodes:
            out.append(f"--node-rank: give a rank from 0 to {self.nnodes - 1} (--nnodes {self.nnodes})")
        if self.nnodes > 1 and not self.master_addr:
            out.append("--master-addr: several nodes need the address of node 0 (every node gives the same)")
        return out

    def per_node(self, spec_nproc: int) -> int:
        return self.nproc_per_node if self.nproc_per_node is not None else spec_nproc

    def world_size(self, spec_nproc: int) -> int:
        return self.per_node(spec_nproc) * self.nnodes

    def torchrun_command(self, spec_nproc: int, python: str = sys.executable) -> list[str]:
        """The command prefix that starts the ranks; the Olive arguments (run --config ...) follow it."""
        cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(self.per_node(spec_nproc))]
        if self.nnodes == 1:
            cmd.append("--standalone")  # a local rendezvous on a free port
        else:
            cmd += ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank),
                    "--master-addr", str(self.master_addr), "--master-port", str(self.master_port)]
        return [*cmd, "-m", "phi_pipeline.orchestration.distributed.rank"]


def backend(device: str) -> str:
    """The collective backend for a training device: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device == "cuda" else "gloo"


def describe(training: Any, world_size: int = 1, device: str = "cpu") -> dict[str, Any]:
    """What the manifest records of how an adapter was trained (training: the adapter's TrainingSpec)."""
    return {
        "world_size": world_size,
        "backend": backend(device) if world_size > 1 else None,
        "effective_batch_size": training.batch_size * world_size * training.gradient_accumulation_steps,
    }


def rank_dir(finetune_dir: Path, rank: int) -> Path:
    return finetune_dir if rank == 0 else finetune_dir / RANKS_DIR / f"rank-{rank}"


def rank_workflow(workflow: dict[str, Any], rank: int, device: str) -> dict[str, Any]:
    """The fine-tune workflow as one rank runs it.

    - device_map: Olive's own LoRA parameter; "current_device" (the GPU torch.cuda.set_device picked for
      LOCAL_RANK) on CUDA, null (load on the CPU) on CPU: accelerate refuses device_map="auto" under DDP.
    - use_cpu and the backend pass through to TrainingArguments: accelerate runs MULTI_CPU with gloo only
      with use_cpu set.
    - ranks other than 0 get their own Olive work folder and cache (Olive does not lock either) and write
      no progress; the trainer's output_dir stays shared, so every rank resumes from the same checkpoint
      (only the main process writes checkpoints).
    """
    finetune = workflow["passes"]["finetune"]
    if finetune["type"] != "LoRA":
        raise ValueError(f"data-parallel fine-tuning runs Olive's LoRA pass only, not {finetune['type']}")
    args = {**finetune["training_args"], "ddp_backend": backend(device)}
    if device == "cpu":
        args["use_cpu"] = True
    out = {**workflow, "passes": {**workflow["passes"], "finetune": {
        **finetune, "device_map": "current_device" if device == "cuda" else None, "training_args": args}}}
    out["cache_dir"] = (Path(workflow["cache_dir"]) / f"rank-{rank}").as_posix()
    out["output_dir"] = rank_dir(Path(workflow["output_dir"]), rank).as_posix()
    return out


def rank_hooks(hooks: dict[str, Any], rank: int, finetune_dir: Path) -> dict[str, Any]:
    """Rank 0 keeps the progress file the run tails; another rank writes its own in its folder."""
    if rank == 0 or "progress_file" not in hooks:
        return hooks
    return {**hooks, "progress_file": (rank_dir(finetune_dir, rank) / Path(hooks["progress_file"]).name).as_posix()}
