"""`phi-pipeline bench` end to end on a tiny random Phi-3, in seconds: the benchmark's own code
(model build, export through the pipeline's workflow, decode and adapter measurements, derived
ratios, report) with one repetition, and the schema of the results.json it writes.

Kept fast by running Olive and each measurement in this process instead of a subprocess apiece
(the subprocess wrappers only add process start-up); the pipeline-cost section, which runs the
whole tiny pipeline, is left to `make bench`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from phi_pipeline.bench import decode, options, run, worker
from phi_pipeline.bench import report as report_module
from phi_pipeline.bench.models import SIZES, build_bench_base, export_bundle, make_random_adapter
from phi_pipeline.bench.pipeline_costs import olive_log_times

PROMPTS = (8, 16)
PHI3_MODULES = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _tokenizer(folder: Path) -> Path:
    """A word-level tokenizer with Phi-3's end-of-text token: enough for Model Builder to copy."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|end|>": 1} | {w: i + 2 for i, w in enumerate("a b c d e f g h".split())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    ).save_pretrained(folder)
    return folder


def _olive_in_process(config_path: Path, log_path: Path, expected_outputs, **_kwargs) -> float:
    from olive.workflows import run as olive_run

    from phi_pipeline.orchestration.olive_compat import apply

    apply()
    olive_run(json.loads(Path(config_path).read_text()))
    assert all(Path(p).exists() for p in expected_outputs)
    return 0.0


def _measure_in_process(config: decode.DecodeConfig, scratch: Path) -> dict:
    return {"label": config.label, **worker.measure(config)}


@pytest.fixture
def one_torch_thread():
    """PyTorch eager on one thread: its default (one per core) spins badly when the machine is busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def results(tmp_path, monkeypatch, one_torch_thread) -> dict:
    import phi_pipeline.orchestration.runner

    monkeypatch.setenv("CI", "1")
    monkeypatch.setattr(phi_pipeline.orchestration.runner, "run_olive", _olive_in_process)
    monkeypatch.setattr(run, "run_config", _measure_in_process)
    monkeypatch.setattr(run.roofline, "copy_bandwidth", functools.partial(run.roofline.copy_bandwidth, megabytes=16))
    base = build_bench_base(tmp_path / "given-base", SIZES["tiny"], _tokenizer(tmp_path / "tokenizer"))
    adapter = make_random_adapter(base, tmp_path / "given-adapter", r=4, seed=0, target_modules=PHI3_MODULES)
    given = export_bundle(base, {"a": adapter}, {"a": 4}, "int4", tmp_path / "given").bundle
    opts = options.BenchOptions(
        bundle=given, out_dir=tmp_path / "bench", size="tiny", reps=1, prompt_lens=PROMPTS, new_tokens=4,
        work_dir=tmp_path / "work", project_root=tmp_path, pipeline_reps=0, threads=2,
    )
    run.run_bench(opts)
    return json.loads((tmp_path / "bench" / "results.json").read_text())


def _check_summary(s: dict, positive: bool = True) -> None:
    assert set(s) == {"median", "min", "max", "n"} and s["n"] >= 1
    assert s["min"] <= s["median"] <= s["max"]
    if positive:
        assert s["min"] > 0


def _check_rows(rows: list[dict]) -> None:
    for row in rows:
        assert "error" not in row, row.get("error")
        assert row["engine"] in ("pytorch-eager", "onnxruntime-genai")
        assert row["peak_rss_bytes"] > 0 and row["load_s"] > 0
        assert set(row["prompts"]) == {str(n) for n in PROMPTS}
        for p in row["prompts"].values():
            _check_summary(p["ttft_s"])
            _check_summary(p["decode_tok_s"])


def test_results_schema(results, tmp_path):
    assert results["schema"] == options.SCHEMA
    assert {"settings", "machine", "bandwidth", "given_bundle", "benchmark_model", "wall_s"} <= set(results)
    assert len(results["machine"]["load_average_start"]) == 3
    _check_summary(results["bandwidth"]["all_cores"]["gb_per_s"])

    model = results["benchmark_model"]
    _check_rows(model["rows"])
    configs = {(r["engine"], r["precision"], r["adapter"], r["threads"]) for r in model["rows"]}
    assert ("pytorch-eager", "fp32", "r8", "torch default") in configs
    for precision in ("int4", "fp32"):
        for adapter in (None, "r8"):
            assert {("onnxruntime-genai", precision, adapter, t) for t in ("default", 2)} <= configs
    assert {"speedup_vs_pytorch", "adapter_decode_slowdown", "threads_speedup"} == set(model["derived"])
    assert "onnx-int4-r8-t2@8" in model["derived"]["adapter_decode_slowdown"]
    sizes = model["sizes_bytes"]
    assert sizes["onnx_int4_model"] < sizes["onnx_fp32_model"]
    assert sizes["onnx_adapter"]["r8"] < sizes["onnx_adapter"]["r16"]

    costs = model["adapter_costs"]
    onnx = costs["adapters-onnx-int4-t2"]
    assert set(onnx["load"]) == {"r8", "r16"}
    _check_summary(onnx["switch"]["set_active_s"], positive=False)
    assert {"none", "r8", "r16"} == set(onnx["slowdown"]["8"])
    _check_summary(onnx["slowdown"]["8"]["r8"]["decode_slowdown_vs_none"], positive=False)
    assert "slowdown" not in costs["adapters-torch-fp32"]
    profile = costs["profile-onnx-int4-t2"]
    assert any(g.startswith("LoRA") for g in profile["adapter"]["by_op"])
    prefill = profile["none"]["prefill"]  # the first token's model run, apart from the decode steps
    assert prefill["prompt_tokens"] == 8 and "MatMulNBits" in prefill["by_op"]

    assert {r["label"] for r in model["roofline"]} == {
        f"onnx-{p}-none-t{t}" for p in ("int4", "fp32") for t in ("default", 2)
    }
    assert all(0 < r["fraction_of_bound"] for r in model["roofline"])

    acc = model["accuracy"]
    assert "error" not in acc, acc.get("error")
    assert 0 <= acc["token_agreement"]["min"] <= acc["token_agreement"]["max"] <= 1
    assert acc["perplexity_ratio"] > 0 and acc["kl_nats_per_token"]["min"] >= 0

    # project_root has no .venv-openvino: the openvino rows are left out, and the report says why
    assert ".venv-openvino" in model["openvino"]["skipped"]
    _check_rows(results["given_bundle"]["rows"])
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "OpenVINO rows: skipped (no " in report
    assert "teacher-forced positions: token agreement" in report
    assert report.startswith("# phi-pipeline benchmark") and "Adapter cost, int4, threads" in report
    # the peer section's "what limits it" lines (no peer here) name the first token's operators too
    assert "First token of the same request (its prefill of 8 tokens)" in "".join(report_module.limits_lines(results))
    assert (tmp_path / "bench" / "decode.png").stat().st_size > 0


def test_context_too_short_is_skipped(tmp_path):
    """A prompt that does not fit the model's context is reported as skipped, not failed."""
    tok = _tokenizer(tmp_path / "tokenizer")
    base = build_bench_base(tmp_path / "base", SIZES["tiny"], tok)
    config = decode.DecodeConfig("t", "torch", str(base), prompt_lens=(1020,), new_tokens=8, reps=1)
    result = decode.measure_decode(config)
    assert "skipped" in result["prompts"]["1020"]


def test_olive_log_times(tmp_path):
    log = tmp_path / "x.log"
    log.write_text(
        "[2026-11-22 07:04:34,975] [INFO] [run.py:99:run_engine] Running workflow w\n"
        "[2026-11-22 07:04:37,111] [INFO] [engine.py:733:_run_pass] Pass finetune:lora finished in 2.5 seconds\n"
        "noise\n"
        "[2026-11-22 07:04:38,005] [INFO] [engine.py:235:run] Saved output model\n"
    )
    assert olive_log_times(log) == {"passes_s": {"finetune:lora": 2.5}, "logged_span_s": 3.03}


def test_pipeline_cost_summary(tmp_path, monkeypatch):
    """Orchestration and the pass-time-equalised ratio, from fixed pipeline and by-hand timings."""
    from phi_pipeline.bench import pipeline_costs
    from phi_pipeline.bench.report import pipeline_lines

    pipeline_run = {
        "process_wall_s": 200.0, "stage_seconds": {"base": 30.0, "finetune:a": 120.0, "export": 12.0, "evaluate": 10.0},
        "olive_runs": [{"config": "finetune-a.json", "wall_s": 120.0}, {"config": "export.json", "wall_s": 12.0}],
        "olive_logs": {"finetune-a": {"passes_s": {"finetune:lora": 110.0}}, "export": {"passes_s": {"builder": 3.0}}},
        "olive_process_s": 132.0, "olive_passes_s": 113.0, "outside_olive_s": 68.0,
        "not_olive_stages_s": {"base": 30.0, "evaluate": 10.0}, "orchestration_s": 28.0, "beyond_passes_s": 47.0,
        "layout_adapter_s": 1.0,
    }
    by_hand = {"runs": [{"command": "olive run --config finetune-a.json", "wall_s": 100.0, "passes_s": {"finetune:lora": 90.0}}],
               "total_s": 100.0, "olive_passes_s": 90.0, "beyond_passes_s": 10.0}
    monkeypatch.setattr(pipeline_costs, "scratch_project", lambda root, dest: dest)
    monkeypatch.setattr(pipeline_costs, "run_pipeline", lambda project, target: pipeline_run)
    monkeypatch.setattr(pipeline_costs, "run_by_hand", lambda project: by_hand)
    costs = pipeline_costs.measure_pipeline_costs(tmp_path, tmp_path / "scratch")
    assert costs["orchestration_share"]["median"] == 0.14
    assert costs["pipeline_over_by_hand"]["median"] == 2.0
    assert costs["pipeline_over_by_hand_passes_equalised"]["median"] == 1.37  # (90 + 47) / (90 + 10)
    assert any("pass time equalised" in line for line in pipeline_lines(costs))


def test_bench_export_is_reused_when_built_from_the_same_inputs(tmp_path, monkeypatch):
    """A multi-GB benchmark export is rebuilt only when its base, adapters or packages change."""
    import phi_pipeline.orchestration.runner

    runs = []
    monkeypatch.setenv("CI", "1")
    monkeypatch.setattr(phi_pipeline.orchestration.runner, "run_olive", lambda *a, **k: runs.append(a[0]) or _olive_in_process(*a, **k))
    base = build_bench_base(tmp_path / "base", SIZES["tiny"], _tokenizer(tmp_path / "tokenizer"))

    def export(seed: int):
        adapter = make_random_adapter(base, tmp_path / "adapter", r=4, seed=seed, target_modules=PHI3_MODULES)
        return export_bundle(base, {"a": adapter}, {"a": 4}, "int4", tmp_path / "export")

    first = export(seed=0)
    assert export(seed=0) == first and len(runs) == 1
    assert export(seed=1) == first and len(runs) == 2  # new adapter weights: exported again
    assert build_bench_base(tmp_path / "base", SIZES["tiny"], tmp_path / "tokenizer") == base


@pytest.mark.parametrize("committed", ["bench/results.json", "bench/cuda/results.json"])
def test_committed_bench_results_render_to_a_report(tmp_path, committed):
    """The results shipped in bench/ (CPU, and CUDA from a lent H100) still render with today's report code."""
    from phi_pipeline.bench.report import write_report

    results = json.loads((Path(__file__).parent.parent / committed).read_text())
    assert results["schema"] == options.SCHEMA
    text = write_report(results, tmp_path).read_text()
    assert "## Headlines" in text and (tmp_path / "decode.png").stat().st_size > 0
    if results["settings"]["device"] == "cuda":
        assert "CUDA device-to-device copy bandwidth" in text and "A100 is about 218 tok/s" in text
    else:
        assert "numpy copy bandwidth" in text and "Pipeline: orchestration" in text


def test_bytes_per_token_reads_one_row_of_a_quantized_embedding_table(tmp_path):
    """int4 bundles store the embedding table as weight_Q4 + weight_scales: a decode step reads one row of each."""
    import onnx
    from onnx import TensorProto, helper

    rows, width = 1000, 64
    inits = [helper.make_tensor("model.embed_tokens.weight_Q4", TensorProto.UINT8, [rows, width // 2], bytes(rows * width // 2), raw=True),
             helper.make_tensor("model.embed_tokens.weight_scales", TensorProto.FLOAT, [rows, 2], [0.0] * rows * 2),
             helper.make_tensor("lm_head", TensorProto.UINT8, [width, 8], bytes(width * 8), raw=True)]
    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, [1, 1, None, 4])
    graph = helper.make_graph([], "g", [past], [], initializer=inits)
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    (tmp_path / "genai_config.json").write_text(json.dumps(
        {"model": {"decoder": {"num_hidden_layers": 1, "num_key_value_heads": 1, "head_size": 4}}}))
    read = run.roofline.bytes_per_token(tmp_path, context=10)
    assert read["weights"] == width // 2 + 2 * 4 + width * 8
    assert read["kv_cache"] == 2 * 4 * 4 * 10
