"""The batched engine's answers on every eval row of the default bundle equal onnxruntime-genai's for the
same row alone: each shipped adapter on its eval split and the base model on all of them, greedy, in
mixed batches of 4 and 8 (rows of different adapters side by side).

onnxruntime's CPU kernels take other paths for one row than for several (MLAS's M == 1 fast paths), so a
batched row may differ from the same row alone in the last bits of its logits. The rule: a row's tokens
are identical, or the first differing token was a near-tie (the batched logits' top two within 1e-4).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow

NEW_TOKENS = 8
TIE = 1e-4


def _rows(bundle):
    from phi_pipeline.evaluate.tasks import tasks_from_manifest
    from phi_pipeline.runtime.genai import BundleModel

    bm = BundleModel(bundle, threads=1)
    rows = []
    for task in tasks_from_manifest(json.loads((bundle / "manifest.json").read_text())):
        for ex in task.examples():
            for adapter in (task.adapter, None):
                rows.append((bm.encode(bm.prompt_for(ex.prompt, adapter)), adapter))
    return bm, rows


def _batched(decoder, batch, eos):
    """Greedy tokens of each (prompt, adapter) of `batch`, decoded together; and the batched logits."""
    tokens, lengths, seen = [], [], []
    for row, (prompt, adapter) in enumerate(batch):
        logits = decoder.prefill(prompt, 0, adapter)
        decoder.join(row, len(prompt))
        tokens.append([int(np.argmax(logits))])
        lengths.append(len(prompt))
        seen.append([logits])
    for _ in range(NEW_TOKENS - 1):
        logits = decoder.decode([t[-1] for t in tokens], lengths, [a for _, a in batch])
        for i in range(len(batch)):
            lengths[i] += 1
            tokens[i].append(int(np.argmax(logits[i])))
            seen[i].append(logits[i])
    return tokens, seen


def _until_eos(ids, eos):
    out = []
    for t in ids:
        out.append(t)
        if t in eos:
            break
    return out


@pytest.mark.parametrize("batch_size", [4, 8])
def test_batched_greedy_answers_equal_each_row_alone_on_every_eval_row(tiny_bundle, monkeypatch, batch_size):
    from phi_pipeline.runtime.batched import BatchedDecoder
    from phi_pipeline.runtime.genai import GREEDY

    monkeypatch.chdir(tiny_bundle.parents[2])  # the manifest names the eval files relative to the project
    bm, rows = _rows(tiny_bundle)
    adapters = {a["name"]: tiny_bundle / a["file"] for a in bm.manifest["adapters"]}
    decoder = BatchedDecoder(tiny_bundle, adapters, max_batch=batch_size)
    eos = bm.eos_token_ids
    # mixed batches: rows of each adapter and of the base interleaved
    order = sorted(range(len(rows)), key=lambda i: (i % 2, i))
    order = [order[i::2] for i in range(2)]
    mixed = [i for pair in zip(*order) for i in pair] + order[0][len(order[1]):]
    identical, ties, wrong = 0, 0, []
    for start in range(0, len(mixed), batch_size):
        batch = [rows[i] for i in mixed[start : start + batch_size]]
        got, logits = _batched(decoder, batch, eos)
        for (prompt, adapter), tokens, steps in zip(batch, got, logits):
            alone = _until_eos(bm.generate_ids(prompt, adapter, NEW_TOKENS, GREEDY), eos)
            tokens = _until_eos(tokens, eos)
            if tokens == alone:
                identical += 1
                continue
            k = next(k for k, (a, b) in enumerate(zip(tokens, alone)) if a != b)
            top = np.sort(steps[k])[-2:]
            if top[1] - top[0] < TIE:
                ties += 1
            else:
                wrong.append((adapter, k, float(top[1] - top[0])))
    print(f"batch {batch_size}: {identical} of {len(rows)} rows identical, {ties} differ at a near-tie")
    assert not wrong, f"rows whose batched answer differs beyond a near-tie: {wrong}"
    assert identical + ties == len(rows) and identical > 0
