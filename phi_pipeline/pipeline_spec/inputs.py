"""Checks of what a run reads before it starts: the base model's weights and whether a hub id is cached."""

from __future__ import annotations

import json
from pathlib import Path


def check_safetensors(folder: Path) -> list[str]:
    """Truncated or corrupt weights (an interrupted download), found from each file's header and
    size alone: safetensors' safe_open parses the header and checks that the tensors exactly cover
    the file, without reading the weights."""
    from safetensors import SafetensorError, safe_open

    problems = []
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="numpy"):
                pass
        except (SafetensorError, OSError) as exc:
            problems.append(f"{f}: not a complete safetensors file ({exc}); download or save it again")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            return [*problems, f"{index}: unreadable shard index ({exc})"]
        problems += [f"{index}: names {s}, which is missing" for s in sorted(shards) if not (folder / s).is_file()]
    return problems


def in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)

