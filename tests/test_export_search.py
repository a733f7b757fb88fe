"""The export search (spec `export.search`): its choice rule, its cache, its configs and its report."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from phi_pipeline.errors import PipelineError, UsageError
from phi_pipeline.search import export as xs
from phi_pipeline.pipeline_spec.schema import ExportSearchSpec, parse_spec

SEARCH = ExportSearchSpec(rounds=10, prompt_tokens=[64, 512])


def _variant(name: str, metric: float = 1.0, ppl: float = 1.02, passed: bool = True) -> xs.Variant:
    return xs.Variant(name, {} if name == "spec" else {"int4_block_size": 128}, passed,
                      [] if passed else [f"{name}: exact_match drop 0.2 > 0.1"], metric, ppl, 1.0, 1000)


def _rounds(decode: float, ttft: float, jitter: list[float] | None = None) -> list[dict]:
    """Ten rounds at both prompt lengths; `jitter` multiplies decode and divides ttft per round."""
    jitter = jitter or [1.0] * 10
    return [{n: {"decode_tok_s": decode * j, "ttft_s": ttft / j} for n in ("64", "512")} for j in jitter]


def test_export_search_ships_the_fastest_variant_that_passes_every_gate():
    variants = [_variant("spec"), _variant("block-64", metric=0.99), _variant("block-128", metric=0.98),
                _variant("lm-head-int8", passed=False)]
    rounds = {"spec": _rounds(100, 0.1), "block-64": _rounds(112, 0.095), "block-128": _rounds(130, 0.09)}
    record = xs.choose(variants, rounds, SEARCH)
    assert record["winner"] == "block-128" and record["reference"] == "spec"
    rows = record["variants"]
    assert rows["block-128"]["outcome"] == "won" and "fastest passing" in rows["block-128"]["why"]
    assert rows["block-128"]["vs_reference"]["decode"]["64"]["median"] == 1.3
    assert rows["block-64"]["vs_reference"]["decode_verdict"] == "faster"  # faster, but not the fastest
    assert "'block-128' was faster" in rows["block-64"]["why"]
    assert rows["lm-head-int8"]["why"].startswith("failed a publish gate: lm-head-int8: exact_match drop")
    assert "measurably faster" in rows["spec"]["why"]


def test_export_search_keeps_the_most_accurate_variant_when_none_is_measurably_faster():
    variants = [_variant("spec", ppl=1.03), _variant("block-128", ppl=1.01)]  # same metric: perplexity decides
    rounds = {"spec": _rounds(100, 0.1), "block-128": _rounds(101.5, 0.0995)}  # 1.5 %: inside the noise
    record = xs.choose(variants, rounds, SEARCH)
    assert record["winner"] == "block-128" == record["reference"]
    assert record["variants"]["block-128"]["why"] == "most accurate passing variant; no other was measurably faster"
    assert record["variants"]["spec"]["vs_reference"]["decode_verdict"] == "no measurable change"


def test_export_search_falls_back_to_the_most_accurate_variant_when_the_machine_is_too_noisy_to_time():
    # faster by a median of 20 %, but slower in 4 rounds of 10: the verdict rule sees no consistent sign
    jitter = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.8, 0.8, 0.8]
    variants = [_variant("spec"), _variant("block-128", metric=0.98)]
    rounds = {"spec": _rounds(100, 0.1), "block-128": _rounds(120, 0.1 / 1.2, [j if j == 1.0 else 0.7 for j in jitter])}
    record = xs.choose(variants, rounds, SEARCH)
    assert record["winner"] == "spec"
    assert record["variants"]["block-128"]["vs_reference"]["decode_verdict"] == "no measurable change"
    assert "not measurably faster than the more accurate 'spec'" in record["variants"]["block-128"]["why"]


def test_export_search_keeps_the_most_accurate_variant_when_the_control_differs_from_itself():
    variants = [_variant("spec"), _variant("block-128", metric=0.98)]
    rounds = {"spec": _rounds(100, 0.1), "block-128": _rounds(130, 0.09), "control": _rounds(115, 0.1)}
    record = xs.choose(variants, rounds, SEARCH)  # the same bundle measured 15 % faster than itself
    assert record["winner"] == "spec" and record["control"]["decode_verdict"] == "faster"
    assert record["variants"]["spec"]["why"].endswith("too busy to time (the control differed from itself)")
    quiet = xs.choose(variants, rounds | {"control": _rounds(100.5, 0.1)}, SEARCH)
    assert quiet["winner"] == "block-128" and quiet["control"]["decode_verdict"] == "no measurable change"


def test_export_search_needs_a_combined_speedup_beyond_the_noise():
    # decode 4 % faster in every round, first token 3 % slower (within the noise): x1.005 combined
    variants = [_variant("spec"), _variant("lm-head-int8", metric=0.98)]
    record = xs.choose(variants, {"spec": _rounds(100, 0.1), "lm-head-int8": [
        {n: {"decode_tok_s": 104.0, "ttft_s": 0.1 / 0.97} for n in ("64", "512")}] * 10}, SEARCH)
    row = record["variants"]["lm-head-int8"]
    assert row["vs_reference"]["decode_verdict"] == "faster" and record["winner"] == "spec"
    assert row["why"].startswith("not measurably faster than the more accurate 'spec' (against 'spec': decode faster")


def test_export_search_trades_no_more_accuracy_for_speed_than_max_metric_drop():
    variants = [_variant("spec"), _variant("block-64", metric=0.99), _variant("block-128", metric=0.95)]
    rounds = {"spec": _rounds(100, 0.1), "block-64": _rounds(110, 0.095), "block-128": _rounds(130, 0.09)}
    record = xs.choose(variants, rounds, SEARCH.model_copy(update={"max_metric_drop": 0.02}))
    assert record["winner"] == "block-64"
    assert record["variants"]["block-128"]["why"].endswith("but its metric trails 'spec''s by 0.050 > max_metric_drop 0.02")
    assert xs.choose(variants, rounds, SEARCH)["winner"] == "block-128"  # no bound: the fastest passing one


def test_export_search_breaks_a_speed_tie_by_accuracy():
    variants = [_variant("spec"), _variant("block-64", metric=0.97), _variant("block-128", metric=0.99)]
    rounds = {"spec": _rounds(100, 0.1), "block-64": _rounds(120, 0.09), "block-128": _rounds(120, 0.09)}
    assert xs.choose(variants, rounds, SEARCH)["winner"] == "block-128"


def test_export_search_has_no_winner_when_no_variant_passes():
    record = xs.choose([_variant("spec", passed=False), _variant("block-128", passed=False)], {}, SEARCH)
    assert record["winner"] is None and record["reference"] is None
    assert all(v["outcome"] == "lost" and v["why"].startswith("failed") for v in record["variants"].values())


def _spec(**search) -> str:
    spec = yaml.safe_load(Path("pipelines/tiny-phi3.yaml").read_text())
    spec["export"]["search"] = search
    return yaml.safe_dump(spec, sort_keys=False)


def test_export_search_candidates_are_checked_all_at_once_with_their_lines(project):
    with pytest.raises(UsageError) as err:
        parse_spec(_spec(candidates=[{"name": "spec", "int4_block_size": 64}, {"name": "same"},
                                     {"name": "x", "int4_block_size": 48}], rounds=0))
    text = err.value.render()
    assert "'spec' names the spec's own export settings or the search's control row" in text
    assert "candidate 'same' sets no export key" in text
    assert "export.search.candidates.2.int4_block_size" in text and "export.search.rounds" in text


def test_export_search_runs_on_cpu_only_and_says_why_elsewhere(project):
    from phi_pipeline.orchestration.configs import workflow_configs
    from phi_pipeline.pipeline import load_plan
    from phi_pipeline.pipeline_spec.plan import export_search

    cpu = load_plan("pipelines/tiny-phi3.yaml", "cpu")
    search, why = export_search(cpu)
    assert [c.name for c in search.candidates] == ["block-64", "block-128", "lm-head-int8"] and why is None
    configs = workflow_configs(cpu)
    variant = configs["export-variant-block-128.json"]["passes"]["builder"]
    assert variant["int4_block_size"] == 128 and configs["export.json"]["passes"]["builder"]["int4_block_size"] == 32
    assert configs["export-variant-lm-head-int8.json"]["passes"]["builder"]["extra_options"]["matmul_mixed_precision"] == {
        "last_matmul": "int8"}
    for target in ("cuda", "qnn"):
        plan = load_plan("pipelines/tiny-phi3.yaml", target)
        search, why = export_search(plan)
        assert search is None and "does not run on this machine's CPU" in why
        assert not any(name.startswith("export-variant-") for name in workflow_configs(plan))


def test_export_search_settings_reach_the_model_builder_pass(project):
    from phi_pipeline.orchestration.configs import workflow_configs
    from phi_pipeline.pipeline import load_plan

    Path("pipelines/k.yaml").write_text(_spec(candidates=[{"name": "kq", "int4_algorithm": "k_quant"}]))
    builder = workflow_configs(load_plan("pipelines/k.yaml", "cpu"))["export-variant-kq.json"]["passes"]["builder"]
    assert builder["extra_options"]["algo_config"] == "k_quant"


def _results(metric: float, passed: bool = True) -> dict:
    return {"adapters": {"tone": {"adapter": {"onnx": {"metric": metric},
                                              "parity": {"perplexity_ratio": 1.01, "token_agreement": 1.0}}}},
            "gates": {"passed": passed, "failures": [] if passed else ["tone: exact_match drop"]}}


@pytest.fixture
def fake_build(project, monkeypatch):
    """run_search with exports, staging, gates and timing replaced by counters (what is cached is the point)."""
    import phi_pipeline.bundle.staging as staging
    import phi_pipeline.evaluate as evaluate
    from phi_pipeline.orchestration.cache import Cache
    from phi_pipeline.orchestration.progress import Stages
    from phi_pipeline.pipeline import load_plan

    calls = {"gated": [], "timed": []}
    plan = load_plan("pipelines/tiny-phi3.yaml", "cpu")

    def stage(p, folder, trained, stages, variant=None):
        out = project / "staging" / variant
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.onnx").write_bytes(b"x" * (100 + p.spec.export.int4_block_size))
        return out

    def gated(p, folder, trained, enforced):
        calls["gated"].append(folder.name)
        return _results(0.9 if p.spec.export.int4_block_size == 128 else 1.0)

    def timed(bundles, adapter, search, say):
        calls["timed"].append(sorted(bundles))
        return {n: _rounds(150 if n == "block-64" else 100, 0.1) for n in bundles}

    monkeypatch.setattr(staging, "stage", stage)
    monkeypatch.setattr(staging, "verify", lambda folder: [])
    monkeypatch.setattr(evaluate, "gated_results", gated)
    monkeypatch.setattr(xs, "time_variants", timed)
    trained = [SimpleNamespace(plan=a, key=f"key-{a.name}") for a in plan.adapters]

    def run(adapters=trained, **kwargs):
        stages = Stages(io.StringIO())
        exports = lambda variant, config_file: (project / "exports" / variant, f"export-{variant}")  # noqa: E731
        return xs.run_search(plan, plan.spec.export.search, adapters, stages, Cache(project / "cache"), exports,
                             base="base-digest", enforced=True, **kwargs), stages

    return SimpleNamespace(run=run, calls=calls, project=project, trained=trained)


def test_export_search_figures_are_cached_and_a_rerun_measures_nothing_unless_asked(fake_build):
    outcome, _ = fake_build.run()
    assert outcome.winner == "block-64" and outcome.staged.name == "block-64"
    assert sorted(fake_build.calls["gated"]) == ["block-128", "block-64", "lm-head-int8", "spec"]
    assert fake_build.calls["timed"] == [["block-128", "block-64", "control", "lm-head-int8", "spec"]]
    assert sorted(p.name for p in (fake_build.project / "staging").iterdir()) == ["block-64"]  # the others removed
    assert outcome.record["variants"]["block-64"]["size_bytes"] == 164 and not outcome.record["cached"]

    again, stages = fake_build.run()
    assert again.record["winner"] == "block-64" and again.record["cached"] and "time-variants" in stages.cached
    assert len(fake_build.calls["gated"]) == 4 and len(fake_build.calls["timed"]) == 1  # nothing measured again
    fake_build.run(remeasure=True)
    assert len(fake_build.calls["gated"]) == 8 and len(fake_build.calls["timed"]) == 2


def test_export_choice_is_kept_when_an_adapter_is_added_and_made_again_only_on_remeasure(fake_build, monkeypatch):
    # case 4 of issue 29: a third adapter re-ran the search, whose noisy timings then shipped another graph
    first, _ = fake_build.run()
    assert first.winner == "block-64"
    monkeypatch.setattr(xs, "time_variants", lambda bundles, adapter, search, say: {
        n: _rounds(150 if n == "block-128" else 100, 0.1) for n in bundles})  # now block-128 would time faster
    import phi_pipeline.evaluate as evaluate

    monkeypatch.setattr(evaluate, "gated_results", lambda p, folder, trained, enforced: _results(1.0))
    third = SimpleNamespace(plan=SimpleNamespace(name="tone2", spec=fake_build.trained[0].plan.spec), key="key-tone2")
    added, stages = fake_build.run(adapters=[*fake_build.trained, third])
    assert added.winner == "block-64" and added.record["reused_choice"]["adapters"] == ["antonyms", "tone"]
    assert "chosen for this base model, target and machine" in stages.stream.getvalue()
    assert "time-variants" in stages.cached and fake_build.calls["timed"] == [fake_build.calls["timed"][0]]
    again, _ = fake_build.run(adapters=[*fake_build.trained, third], remeasure=True)
    assert again.winner == "block-128"  # --remeasure chooses again, for this adapter set


def test_export_choice_refuses_an_adapter_that_fails_the_chosen_variant_instead_of_switching(fake_build, monkeypatch):
    import phi_pipeline.evaluate as evaluate

    assert fake_build.run()[0].winner == "block-64"
    monkeypatch.setattr(evaluate, "gated_results", lambda p, folder, trained, enforced: _results(
        0.5 if len(trained) > 2 else 1.0, passed=len(trained) <= 2))
    third = SimpleNamespace(plan=SimpleNamespace(name="tone2", spec=fake_build.trained[0].plan.spec), key="key-tone2")
    with pytest.raises(PipelineError) as err:
        fake_build.run(adapters=[*fake_build.trained, third])
    message = str(err.value)
    assert message.startswith("export variant 'block-64', which the export search chose for this base model, target "
                              "and machine on ")
    assert "(adapters then: antonyms, tone), fails a publish gate with this run's adapters; the graph is kept" in message
    assert "  - tone: exact_match drop" in message and "--remeasure" in message


def test_a_candidate_that_fails_to_load_is_a_failed_variant_with_its_reason_not_the_end_of_the_run(fake_build, monkeypatch):
    import phi_pipeline.evaluate as evaluate

    gated = evaluate.gated_results

    def fails_for_int8_head(p, folder, trained, enforced):
        if p.spec.export.int4_lm_head == "int8":  # as on a tied-embedding model (issue 33)
            raise RuntimeError("Load model from model.onnx failed: Invalid model. Node input "
                               "'lm_head.MatMul.weight_Q8G32' is not a graph input\nmore detail")
        return gated(p, folder, trained, enforced)

    monkeypatch.setattr(evaluate, "gated_results", fails_for_int8_head)
    outcome, stages = fake_build.run()
    assert outcome.winner == "block-64"
    row = outcome.record["variants"]["lm-head-int8"]
    assert row["passed"] is False and row["outcome"] == "lost"
    assert row["why"] == ("failed: could not be built or loaded: Load model from model.onnx failed: Invalid model. "
                          "Node input 'lm_head.MatMul.weight_Q8G32' is not a graph input")
    assert "export variant 'lm-head-int8': could not be built or loaded" in stages.stream.getvalue()
    from phi_pipeline.evaluate.report import export_search_markdown

    assert "| `lm-head-int8` | int4_lm_head=int8 | **FAIL** |" in "\n".join(export_search_markdown(outcome.record))
    assert sorted(p.name for p in (fake_build.project / "staging").iterdir()) == ["block-64"]


def test_export_search_with_no_passing_variant_refuses_naming_each_variants_failures(fake_build, monkeypatch):
    import phi_pipeline.evaluate as evaluate

    monkeypatch.setattr(evaluate, "gated_results", lambda p, folder, trained, enforced: _results(0.5, passed=False))
    with pytest.raises(PipelineError) as err:
        fake_build.run()
    assert "no export variant passed every publish gate" in str(err.value)
    assert "  - block-128: tone: exact_match drop" in str(err.value)
    assert not (fake_build.project / "staging").exists() or not any((fake_build.project / "staging").iterdir())


def test_export_search_section_and_model_card_name_the_choice_and_why():
    from phi_pipeline.bundle.staging import _quantization_text
    from phi_pipeline.evaluate.report import export_search_markdown

    variants = [_variant("spec"), _variant("block-128", metric=0.98)]
    record = xs.choose(variants, {"spec": _rounds(100, 0.1), "block-128": _rounds(130, 0.09)}, SEARCH)
    record["machine"] = {"model": "Test CPU", "cores": 2, "isa": ["avx2", "fma"], "load_average": [0.5, 0.4, 0.3]}
    text = "\n".join(export_search_markdown(record))
    assert "Shipped: variant `block-128`" in text and "Test CPU (2 cores, avx2 fma; load average" in text
    assert "| `block-128` | int4_block_size=128 | pass | 0.980 |" in text
    assert "1.300 [1.300-1.300]" in text  # paired decode ratio at each prompt length, median [min-max]
    export = {"int4_block_size": 128, "int4_symmetric": True, "int4_algorithm": "default", "int4_lm_head": "int4",
              "int4_sensitive_layers": "int8", "int4_quantize_embeddings": True, "int4_accuracy_level": 4}
    card = _quantization_text({"precision": "int4", "export": export, "export_search": record})
    assert "int4 in blocks of 128" in card and "sensitive layers int8" in card and "Variant `block-128`, chosen by the export search among 2" in card


@pytest.mark.slow
def test_tiny_default_export_search_ships_a_variant_with_todays_exact_match(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    search = manifest["export_search"]
    assert list(search["variants"]) == ["spec", "block-64", "block-128", "lm-head-int8"]
    winner = search["variants"][search["winner"]]
    assert winner["outcome"] == "won" and winner["passed"]
    assert manifest["export"]["int4_block_size"] == winner["changes"].get("int4_block_size", 32)
    assert all(a["adapter_onnx"] == 1.0 for a in manifest["evaluation"]["adapters"].values())
    assert "## Export search" in (tiny_bundle / "report.md").read_text()
    assert f"Variant `{search['winner']}`, chosen by the export search" in (tiny_bundle / "README.md").read_text()


@pytest.mark.slow
def test_adding_an_adapter_keeps_model_onnx_byte_identical_with_the_export_search_on(tiny_bundle, monkeypatch, capfd):
    import yaml

    from phi_pipeline.cli import main

    project = tiny_bundle.parents[2]
    monkeypatch.chdir(project)
    spec = yaml.safe_load(Path("pipelines/tiny-phi3.yaml").read_text())
    spec["name"] = "tiny-phi3-more"  # a copy under another name: the same base, target and machine
    extra = json.loads(json.dumps(spec["adapters"][0]))
    extra["name"] = "tone2"
    extra["lora"] = {"r": 4, "alpha": 8}
    spec["adapters"].append(extra)
    Path("pipelines/tiny-phi3-more.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    capfd.readouterr()
    assert main(["run", "pipelines/tiny-phi3-more.yaml"]) == 0
    assert "chosen for this base model, target and machine" in capfd.readouterr().err
    before = json.loads((tiny_bundle / "manifest.json").read_text())
    after = json.loads(Path("dist/tiny-phi3-more/cpu/manifest.json").read_text())
    assert [a["name"] for a in after["adapters"]] == ["tone", "antonyms", "tone2"]
    assert after["export_search"]["winner"] == before["export_search"]["winner"]
    assert "time-variants" in after["cached_stages"]  # no timing rounds: the choice was not made again
    for name in ("model.onnx", "model.onnx.data"):
        assert after["files"][name] == before["files"][name]


def test_run_remeasure_flag_reaches_the_pipeline(project, monkeypatch):
    import phi_pipeline.pipeline as pipeline
    from phi_pipeline.cli import main

    seen = []
    monkeypatch.setattr(pipeline, "run", lambda spec, target, **kw: seen.append(kw["remeasure"]) or project / "dist")
    assert main(["run", "pipelines/tiny-phi3.yaml", "--remeasure"]) == 0
    assert main(["run", "pipelines/tiny-phi3.yaml"]) == 0
    assert seen == [True, False]
