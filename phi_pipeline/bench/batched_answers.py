"""The batched engine's greedy answers against each request alone, on every eval row of a bundle.

Each shipped adapter on its eval split and the base model on all of them, in mixed batches (rows of different
adapters side by side), against onnxruntime-genai's greedy answer for the same row alone. onnxruntime's CPU
kernels take other paths for one row than for several (MLAS's M == 1 fast paths; a grouped LoRA product's
GEMM has the batch's rows and the step's adapters' ranks), so a batched row may differ from the same row alone
in the last bits of its logits, and int4 kernels with int8 activations can carry that into later tokens. A row
counts as a near-tie when its first differing token had its top two batched logits within `tie`.

`python -m phi_pipeline.bench.batched_answers BUNDLE [--batch-size 8] [--new-tokens 16] [--tie 0.1]` prints the
counts and writes them with every differing row to --out (run it from the project the manifest's eval files are
relative to). tests/test_batched_eval.py runs the same comparison on the tiny default bundle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from phi_pipeline.bench.machine import machine


def eval_rows(bm: Any) -> list[tuple[list[int], str | None]]:
    """(prompt ids, adapter) of every eval row of the bundle, with its adapter and with the base model."""
    from phi_pipeline.evaluate.tasks import tasks_from_manifest

    rows = []
    for task in tasks_from_manifest(bm.manifest):
        for ex in task.examples():
            for adapter in (task.adapter, None):
                rows.append((bm.encode(bm.prompt_for(ex.prompt, adapter)), adapter))
    return rows


def mixed_order(rows: Sequence[tuple[list[int], str | None]]) -> list[int]:
    """Row indices taken from each adapter's rows and the base model's in turn, so every batch mixes them."""
    groups: dict[str | None, list[int]] = {}
    for i, (_, adapter) in enumerate(rows):
        groups.setdefault(adapter, []).append(i)
    turns = max(len(g) for g in groups.values())
    return [g[k] for k in range(turns) for g in groups.values() if k < len(g)]


def batched_greedy(decoder: Any, batch: Sequence[tuple[list[int], str | None]], new_tokens: int
                   ) -> tuple[list[list[int]], list[list[np.ndarray]]]:
    """Greedy tokens of each (prompt, adapter) of `batch`, decoded together in rows 0..len-1; and the logits
    each token was chosen from."""
    tokens, lengths, seen = [], [], []
    for row, (prompt, adapter) in enumerate(batch):
        logits = decoder.prefill(prompt, 0, adapter, row)
        tokens.append([int(np.argmax(logits))])
        lengths.append(len(prompt))
        seen.append([logits])
    for _ in range(new_tokens - 1):
        logits = decoder.decode([t[-1] for t in tokens], lengths, [a for _, a in batch])
        for i in range(len(batch)):
            lengths[i] += 1
            tokens[i].append(int(np.argmax(logits[i])))
            seen[i].append(logits[i])
    return tokens, seen


def until_eos(ids: Sequence[int], eos: frozenset[int]) -> list[int]:
    out = []
    for t in ids:
        out.append(t)
        if t in eos:
            break
    return out


def compare(bundle: Path, batch_size: int, new_tokens: int, tie: float) -> dict[str, Any]:
    """Every eval row in mixed batches of `batch_size` against the row alone: counts, and each differing row
    as (adapter, first differing position, the batched top-two gap there)."""
    from phi_pipeline.runtime.batched import BatchedDecoder
    from phi_pipeline.runtime.genai import GREEDY, BundleModel

    bm = BundleModel(bundle, threads=1)
    rows = eval_rows(bm)
    adapters = {a["name"]: bundle / a["file"] for a in bm.manifest["adapters"]}
    decoder = BatchedDecoder(bundle, adapters, max_batch=batch_size)
    eos = bm.eos_token_ids
    order = mixed_order(rows)
    identical, ties, wrong = 0, [], []
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start : start + batch_size]]
        got, logits = batched_greedy(decoder, batch, new_tokens)
        for (prompt, adapter), tokens, steps in zip(batch, got, logits):
            alone = until_eos(bm.generate_ids(prompt, adapter, new_tokens, GREEDY), eos)
            tokens = until_eos(tokens, eos)
            if tokens == alone:
                identical += 1
                continue
            k = next(k for k, (a, b) in enumerate(zip(tokens, alone)) if a != b)
            top = np.sort(steps[k])[-2:]
            (ties if top[1] - top[0] < tie else wrong).append((adapter, k, round(float(top[1] - top[0]), 5)))
    return {"bundle": str(bundle), "rows": len(rows), "batch_size": batch_size, "new_tokens": new_tokens, "tie": tie,
            "identical": identical, "near_ties": ties, "beyond_a_tie": wrong}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m phi_pipeline.bench.batched_answers", description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--tie", type=float, default=0.1, help="top-two logit gap below which a difference is a near-tie")
    p.add_argument("--out", type=Path, default=Path("bench/batched-answers.json"))
    args = p.parse_args(argv)
    result = compare(args.bundle, args.batch_size, args.new_tokens, args.tie) | {"machine": machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.bundle}: {result['identical']} of {result['rows']} rows identical to the row alone over "
          f"{args.new_tokens} tokens in mixed batches of {args.batch_size}; {len(result['near_ties'])} differ at a "
          f"near-tie (top-two gap < {args.tie}), {len(result['beyond_a_tie'])} beyond: {result['beyond_a_tie']}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
