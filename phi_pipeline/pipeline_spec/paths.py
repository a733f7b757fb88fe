"""Where everything lives: the one place for the pipeline's folder layout.

Olive configs only ever name the stable run folders below (never cache keys), so the generated
JSON is the same on every machine and can be golden-tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

OLIVE_CONFIGS = Path("olive_configs")


def locks_dir(work_dir: Path) -> Path:
    """The run locks of every pipeline in a work dir (runlock.py); `cache prune` waits for none of them."""
    return work_dir / "locks"


@dataclass(frozen=True)
class PipelinePaths:
    work_dir: Path
    output_dir: Path
    pipeline: str
    target: str

    @property
    def run_dir(self) -> Path:
        """Olive's working outputs for this pipeline and target (rewritten by every run)."""
        return self.work_dir / "runs" / self.pipeline / self.target

    def finetune_dir(self, adapter: str) -> Path:
        """Olive's fine-tune output of one adapter. Not per target: the fine-tune workflow depends only on
        the spec and the training device, so every target of a pipeline shares it (and its cache entry)."""
        return self.work_dir / "runs" / self.pipeline / "finetune" / adapter

    def progress_file(self, adapter: str) -> Path:
        """JSON lines the fine-tune's trainer writes as it logs (step, losses), which the run tails."""
        return self.finetune_dir(adapter) / "progress.jsonl"

    def split_file(self, adapter: str, split: str) -> Path:
        """A training or validation split cut from an adapter's training file (data.validation_fraction)."""
        return self.work_dir / "runs" / self.pipeline / "data" / adapter / f"{split}.jsonl"

    def search_study(self, key: str) -> Path:
        """An adapter's hyperparameter search (Optuna's SQLite storage), named by what defines the search."""
        return self.work_dir / "search" / f"{key}.sqlite3"

    def trained_adapter_dir(self, adapter: str) -> Path:
        """The trained PEFT adapter a merged export reads; the run copies it here from its cache first
        (a cache hit leaves finetune_dir empty, or holding another target's adapter)."""
        return self.run_dir / "adapters" / adapter

    @property
    def lora_layout_dir(self) -> Path:
        """A zero-initialised PEFT adapter with the pipeline's LoRA layout, exported once with the base."""
        return self.run_dir / "lora-layout"

    @property
    def export_dir(self) -> Path:
        """The multi-adapter export: one base model for every adapter."""
        return self.run_dir / "export"

    def merged_export_dir(self, adapter: str) -> Path:
        """The merged export of one adapter: a full model with that adapter's weights merged in."""
        return self.run_dir / "exports" / adapter

    @property
    def olive_cache_dir(self) -> Path:
        return self.work_dir / "olive-cache"

    @property
    def hf_cache_dir(self) -> Path:
        """Model Builder's scratch space for local base models (it defaults to the user's HF cache)."""
        return self.work_dir / "hf-cache"

    @property
    def cache_dir(self) -> Path:
        """phi-pipeline's own content-addressed cache (adapters, exports)."""
        return self.work_dir / "cache"

    @property
    def run_lock(self) -> Path:
        """Held by the one run of this pipeline and target at a time (runlock.py)."""
        return locks_dir(self.work_dir) / f"{self.pipeline}.{self.target}.lock"

    @property
    def finetune_lock(self) -> Path:
        """Held while fine-tuning: every target of a pipeline shares finetune_dir and its cache entries."""
        return locks_dir(self.work_dir) / f"{self.pipeline}.finetune.lock"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def configs_dir(self) -> Path:
        return OLIVE_CONFIGS / self.pipeline / self.target

    @property
    def bundle_dir(self) -> Path:
        """Where the published bundle lives."""
        return self.output_dir / self.pipeline / self.target

    @property
    def staging_root(self) -> Path:
        """Bundles are assembled here, on the same file system as bundle_dir, then swapped in."""
        return self.output_dir / ".staging"
