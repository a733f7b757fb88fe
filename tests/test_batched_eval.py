"""The batched engine's answers on every eval row of the default bundle equal onnxruntime-genai's for the
same row alone (phi_pipeline/bench/batched_answers.py): each shipped adapter on its eval split and the base
model on all of them, greedy, in mixed batches of 4 and 8. A row's tokens are identical, or the first differing
token was a near-tie (the batched logits' top two within 1e-4).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

NEW_TOKENS = 8
TIE = 1e-4


@pytest.mark.parametrize("batch_size", [4, 8])
def test_batched_greedy_answers_equal_each_row_alone_on_every_eval_row(tiny_bundle, monkeypatch, batch_size):
    from phi_pipeline.bench.batched_answers import compare

    monkeypatch.chdir(tiny_bundle.parents[2])  # the manifest names the eval files relative to the project
    result = compare(tiny_bundle, batch_size, NEW_TOKENS, TIE)
    print(f"batch {batch_size}: {result['identical']} of {result['rows']} rows identical, "
          f"{len(result['near_ties'])} differ at a near-tie")
    assert not result["beyond_a_tie"], f"rows whose batched answer differs beyond a near-tie: {result['beyond_a_tie']}"
    assert result["identical"] > 0


def test_mixed_order_takes_each_adapters_rows_and_the_bases_in_turn():
    from phi_pipeline.bench.batched_answers import mixed_order

    rows = [([1], "a"), ([2], None), ([3], "a"), ([4], None), ([5], "b"), ([6], None), ([7], "b"), ([8], "a")]
    assert mixed_order(rows) == [0, 1, 4, 2, 3, 6, 7, 5]
