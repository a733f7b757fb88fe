"""prune_lm_head: the shipped graph computes prefill logits for the last position only, and gives the
tokens and the teacher-forced logits of Model Builder's full graph."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from phi_pipeline.bench.models import SIZES, build_bench_base, export_bundle, make_random_adapter
from phi_pipeline.runtime.genai import BundleModel
from phi_pipeline.pipeline_spec import targets
from test_bench import PHI3_MODULES, _olive_in_process, _tokenizer

PROMPT = [5, 9, 2, 7, 3, 3, 8, 4, 6]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A tiny random Phi-3 with a random adapter, as int4 bundles exported with and without prune_lm_head."""
    import phi_pipeline.orchestration.runner

    tmp = tmp_path_factory.mktemp("prune")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CI", "1")
        mp.setattr(phi_pipeline.orchestration.runner, "run_olive", _olive_in_process)
        base = build_bench_base(tmp / "base", SIZES["tiny"], _tokenizer(tmp / "tokenizer"))
        adapter = make_random_adapter(base, tmp / "adapter", r=4, seed=0, target_modules=PHI3_MODULES)
        cpu = targets.TARGETS["cpu"]
        for pruned in (True, False):
            options = {k: v for k, v in cpu.model_builder_options.items() if pruned or k != "prune_lm_head"}
            mp.setitem(targets.TARGETS, "cpu", dataclasses.replace(cpu, model_builder_options=options))
            out[pruned] = BundleModel(export_bundle(base, {"a": adapter}, {"a": 4}, "int4", tmp / f"export-{pruned}").bundle)
    return out


def test_shipped_cpu_graph_gives_prefill_logits_for_the_last_position_only(bundles):
    assert bundles[True].prunes_logits and not bundles[False].prunes_logits
    generation = bundles[True].start(PROMPT, None, 1)
    generation.feed()
    assert np.asarray(generation.generator.get_output("logits")).shape == (1, 1, bundles[True].vocab_size)


@pytest.mark.parametrize("adapter", [None, "a"])
def test_pruned_graph_gives_the_greedy_tokens_of_the_full_graph(bundles, adapter):
    tokens = {p: bundles[p].generate_ids(PROMPT, adapter, 8) for p in bundles}
    assert tokens[True] == tokens[False] and len(tokens[True]) == 8


@pytest.mark.parametrize("adapter", [None, "a"])
@pytest.mark.parametrize("first", [0, 4, len(PROMPT) - 1])
def test_pruned_graph_gives_the_teacher_forced_logits_of_the_full_graph(bundles, adapter, first):
    pruned, full = bundles[True].logits(PROMPT, adapter, first), bundles[False].logits(PROMPT, adapter, first)
    assert pruned.shape == full.shape == (len(PROMPT) - first, bundles[True].vocab_size)
    np.testing.assert_allclose(pruned, full, rtol=0, atol=1e-4)


def test_teacher_forced_logits_of_a_dml_graph_with_position_ids_equal_its_own_runs(tmp_path):
    """dml graphs (no GroupQueryAttention) take position_ids: the unpruned run feeds them, and each row equals
    onnxruntime-genai's run that ends at that position."""
    import subprocess
    import sys

    from phi_pipeline.runtime.genai import GenaiModel

    base = build_bench_base(tmp_path / "base", SIZES["tiny"], _tokenizer(tmp_path / "tokenizer"))
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(tmp_path / "dml"),
                    "-p", "int4", "-e", "dml", "-c", str(tmp_path / "cache"), "--extra_options", "prune_lm_head=true"],
                   check=True, capture_output=True)
    model = GenaiModel(tmp_path / "dml", provider="cpu")
    assert model.prunes_logits
    full = model.logits(PROMPT, None, 2)
    for end in (3, len(PROMPT)):
        generation = model.start(PROMPT[:end], None, 1)
        generation.feed()
        own = np.asarray(generation.generator.get_output("logits"))[0, -1].astype(np.float32)
        np.testing.assert_allclose(full[end - 3], own, rtol=0, atol=1e-3)
