"""`phi-pipeline bench --peer llama.cpp` (bench/peer.py): parsing llama.cpp's output, the paired ratios,
the SentencePiece tokenizer its converter needs, and the whole peer section on the tiny model where
llama.cpp has been built (`make bench-peer` builds it into .phi-pipeline/bench/llama.cpp)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phi_pipeline.bench import peer
from phi_pipeline.evaluate import speed

ROOT = Path(__file__).resolve().parent.parent

# llama-completion --perf, as llama.cpp 0.3.36's vendored copy prints it (log prefix: time, level)
COMPLETION_OUTPUT = """\
0.00.086.624 I common_perf_print:    sampling time =       0.28 ms
0.00.086.642 I common_perf_print:    samplers time =       0.10 ms /   191 tokens
0.00.086.660 I common_perf_print:        load time =     210.33 ms
0.00.086.675 I common_perf_print: prompt eval time =      50.00 ms /    64 tokens (    0.78 ms per token,  1280.00 tokens per second)
0.00.086.689 I common_perf_print:        eval time =     500.00 ms /   127 runs   (    3.94 ms per token,   254.00 tokens per second)
0.00.086.703 I common_perf_print:       total time =     560.00 ms /   191 tokens
"""


def test_completion_timings_are_read_from_llama_cpp_perf_print():
    t = peer.parse_completion_timings(COMPLETION_OUTPUT)
    assert t == {"ttft_s": 0.05, "prompt_tokens": 64, "decode_tok_s": 254.0}


def test_completion_without_timings_is_an_error_naming_the_output():
    with pytest.raises(peer.PeerError, match="no llama.cpp timings"):
        peer.parse_completion_timings("error: unknown argument --foo")


def _round(decode: float, ttft: float) -> dict:
    return {"64": {"decode_tok_s": decode, "ttft_s": ttft}, "peak_rss_bytes": 100}


def test_ratios_pair_rows_of_the_same_round():
    rounds = {name: [] for name, *_ in peer.ROWS}
    # round 1: the bundle 2x llama.cpp's decode, round 2: 1x; adapters cost 10% (bundle) and 20% (llama.cpp)
    for bundle, llama in ((200.0, 100.0), (150.0, 150.0)):
        rounds["bundle int4"].append(_round(bundle, 0.1))
        rounds["bundle int4 + r8"].append(_round(0.9 * bundle, 0.1))
        rounds["llama.cpp Q4_0"].append(_round(llama, 0.05))
        rounds["llama.cpp Q4_K_M"].append(_round(llama, 0.05))
        rounds["llama.cpp Q4_0 (llama-completion)"].append(_round(llama, 0.05))
        rounds["llama.cpp Q4_0 + r8 (llama-completion)"].append(_round(0.8 * llama, 0.05))
    sizes = {"bundle_int4": 90, "gguf_Q4_0": 100, "gguf_Q4_K_M": 120}
    out = peer.summarize(rounds, sizes, (64,))
    r = out["ratios"]
    assert (r["decode_vs_llama_q4_0@64"]["min"], r["decode_vs_llama_q4_0@64"]["max"]) == (1.0, 2.0)
    assert r["first_token_speed_vs_llama_q4_0@64"]["median"] == 0.5  # the bundle takes twice as long
    assert r["adapter_decode_cost_bundle@64"]["median"] == pytest.approx(0.1)
    assert r["adapter_decode_cost_llama_cpp@64"]["median"] == pytest.approx(0.2)
    assert (r["size_vs_llama_q4_0"], r["size_vs_llama_q4_k_m"]) == (0.9, 0.75)
    bundle_row = next(row for row in out["rows"] if row["name"] == "bundle int4")
    assert bundle_row["prompts"]["64"]["decode_tok_s"]["median"] == 175.0


def test_llama_cpp_version_is_pinned_in_pyproject():
    assert peer.pinned_version(ROOT).count(".") == 2


def test_sentencepiece_model_keeps_the_special_token_ids(tmp_path):
    pytest.importorskip("sentencepiece", reason="the peer extra (sentencepiece) is not installed")
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from phi_pipeline.tiny.base_model import train_tokenizer

    hf = tmp_path / "base"
    train_tokenizer(1024).save_pretrained(hf)
    (hf / "config.json").write_text(json.dumps({"vocab_size": 1024}))
    sp = spm.SentencePieceProcessor(model_file=str(peer.sentencepiece_model(hf, tmp_path / "tokenizer.model")))
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    specials = sorted(tokenizer.added_tokens_decoder.items())
    assert [sp.id_to_piece(i) for i, _ in specials] == [t.content for _, t in specials]
    assert len(specials) < sp.get_piece_size() <= 1024


def _built_llama_cpp() -> Path:
    home = peer.llama_cpp_home(ROOT / ".phi-pipeline" / "bench", peer.pinned_version(ROOT))
    if not home.built:
        pytest.skip(f"llama.cpp is not built in {home.home} (`make bench-peer` builds it; CI never does)")
    pytest.importorskip("sentencepiece", reason="the peer extra (sentencepiece) is not installed")
    return home.home.parent


@pytest.mark.slow
@pytest.mark.parametrize("size", ["tiny", "llama-tiny"])
def test_peer_section_compares_the_tiny_bundle_with_llama_cpp(tmp_path, monkeypatch, size):
    """The whole peer path on the tiny model with the llama.cpp build of this checkout: GGUF and
    LoRA conversion, llama-bench, llama-completion with and without the adapter, the bundle rows."""
    from test_bench import _olive_in_process, _tokenizer

    import phi_pipeline.orchestration.runner
    from phi_pipeline.bench import options, report, tuning

    built = _built_llama_cpp()
    monkeypatch.setattr(phi_pipeline.orchestration.runner, "run_olive", _olive_in_process)
    work = tmp_path / "work"
    work.mkdir()
    (work / "llama.cpp").symlink_to(built)
    opts = options.BenchOptions(bundle=_tokenizer(tmp_path / "tokenizer"), size=size, peer_rounds=1, prompt_lens=(16, 32),
                            new_tokens=8, work_dir=work, project_root=ROOT, threads=2, peer="llama.cpp")
    result = peer.bench_peer(opts, lambda message: None)
    assert result["bundle_session_options"]["intra_op_num_threads"] == 0  # the bundle as shipped
    for row in result["rows"]:
        for p in row["prompts"].values():
            assert p["decode_tok_s"]["median"] > 0 and p["ttft_s"]["median"] > 0, row
    assert {"gguf_Q4_0", "gguf_Q4_K_M", "gguf_lora_r8", "bundle_int4", "onnx_adapter_r8"} <= set(result["sizes_bytes"])
    assert result["ratios"]["decode_vs_llama_q4_0@16"]["n"] == 1
    assert [t["name"] for t in result["tried"]] == [v.name for v in tuning.VARIANTS]
    assert all(t["decode_vs_shipped"]["16"]["n"] == 1 for t in result["tried"])
    search = result["export_search"]
    assert list(search["variants"]) == ["spec", "block-64", "block-128", "lm-head-int8"] and search["winner"]
    assert result["base"]["family"] == ("llama" if size == "llama-tiny" else "phi3")
    lines = report.peer_lines(result)
    assert any(line.startswith("| bundle int4 |") for line in lines)
    assert any(line.startswith("| no LoRA inputs |") for line in lines)


def test_rounds_shuffle_the_rows_and_a_capped_row_runs_in_the_first_rounds_only():
    calls = []
    names = [f"row{i}" for i in range(6)]
    out = speed.measure_rounds(names, lambda name, i: calls.append((i, name)) or {"round": i}, 3, lambda m: None, {"row5": 1})
    orders = [[n for i, n in calls if i == r] for r in range(3)]
    assert sorted(orders[0]) == names and sorted(orders[1]) == names[:5]
    assert len({tuple(o[:5]) for o in orders}) > 1  # not the same order every round
    assert [r["round"] for r in out["row5"]] == [0] and [r["round"] for r in out["row0"]] == [0, 1, 2]
    again = []  # seeded per round: the same orders again
    speed.measure_rounds(names, lambda name, i: again.append((i, name)) or {}, 3, lambda m: None, {"row5": 1})
    assert again == calls


def test_source_patch_flushes_the_log_once_and_refuses_an_unexpected_source(tmp_path):
    source = tmp_path / "source"
    path = source / peer.FLUSH_PATCH["file"]
    path.parent.mkdir(parents=True)
    path.write_text("int main() {\n    LOG(\"\\n\\n\");\n    common_perf_print(ctx, smpl);\n\n    llama_backend_free();\n}\n")
    peer.patch_source(source)
    peer.patch_source(source)
    assert path.read_text().count("common_log_flush(common_log_main());") == 1
    path.write_text("int main() {}\n")
    with pytest.raises(peer.PeerError, match="a different llama.cpp source"):
        peer.patch_source(source)


def test_a_build_stamped_with_another_record_is_not_built(tmp_path):
    home = peer.llama_cpp_home(tmp_path, "0.0.1")
    for tool in peer.TOOLS:
        home.tool(tool).parent.mkdir(parents=True, exist_ok=True)
        home.tool(tool).write_text("")
    (home.home / peer.BUILD_STAMP).write_text(json.dumps(home.build_record() | {"patches": []}))
    assert not home.built
    (home.home / peer.BUILD_STAMP).write_text(json.dumps(home.build_record()))
    assert home.built


@pytest.mark.slow
def test_serving_bench_runs_llama_server_with_an_adapter_per_request(random_bundle, tmp_path):
    """The serving bench's peer rows on the tiny random bundle: llama-server on the same base and adapters,
    each request naming its adapter; every request generates exactly new_tokens."""
    from phi_pipeline.bench.serving import PeerServer, bench_serving
    from serve_support import CHAT_ADAPTER, TEMPLATE_ADAPTER

    home = peer.LlamaCpp(_built_llama_cpp() / peer.pinned_version(ROOT))
    work = random_bundle.parents[3]  # build_random_bundle's folder: base/, one folder per adapter
    gguf = tmp_path / "gguf"
    models = peer.convert(home, work / "base", work / CHAT_ADAPTER / "adapter", gguf, lambda m: None)
    loras = {CHAT_ADAPTER: models.lora,
             TEMPLATE_ADAPTER: peer.convert_lora(home, gguf / "hf", work / TEMPLATE_ADAPTER / "adapter", gguf / "t.gguf")}
    server = PeerServer(home.tool("llama-server"), models.gguf[peer.LORA_QUANT], loras, "bench-int4", 2, 128)
    result = bench_serving(random_bundle, tmp_path / "run", threads=None, prompt_len=8, new_tokens=4,
                           concurrency=(1, 2), engines=(), rounds=1, peer=server)
    rows = result["engines"]["llama-server"]
    assert result["models"] == ["bench-int4", CHAT_ADAPTER, TEMPLATE_ADAPTER]
    for level in [*rows["mixed"].values(), *rows["one_model"].values()]:
        assert level["failed"] == 0 and level["output_tokens"] == 4 * level["requests"], level


def _proxies(ppl: float, kl: float) -> dict:
    return {"perplexity_ratio": ppl, "kl_nats_per_token": {"median": kl}, "token_agreement": {"median": 0.5}}


def test_bench_export_search_gates_on_the_accuracy_proxies_and_ships_the_fastest_passing_variant():
    from phi_pipeline.bench import options, report

    opts = options.BenchOptions(bundle=Path("unused"), prompt_lens=(64,), peer_rounds=2)
    rows = {"bundle int4": 100.0, "export search: block-64": 110.0, "export search: block-128": 125.0,
            "export search: lm-head-int8": 140.0}
    rounds = {name: [_round(decode, 10 / decode)] * 2 for name, decode in rows.items()}
    proxies = {"spec": _proxies(1.20, 0.03), "block-64": _proxies(1.22, 0.035), "block-128": _proxies(1.25, 0.045),
               "lm-head-int8": _proxies(1.40, 0.03)}  # faster still, but over the perplexity bound
    record = peer.export_search(proxies, rounds, {n: 100 for n in proxies}, opts)
    assert record["winner"] == "block-128" and record["reference"] == "spec"
    assert record["variants"]["lm-head-int8"]["why"] == (
        f"failed a publish gate: lm-head-int8: perplexity_ratio 1.4 > {peer.BENCH_GATES['perplexity_ratio']}")
    assert record["variants"]["block-128"]["changes"] == {"int4_block_size": 128}
    assert peer.search_row(record["winner"]) == "export search: block-128" and peer.search_row("spec") == "bundle int4"
    # the ratios against llama.cpp are the winner's
    rounds |= {name: [_round(100.0, 0.05)] * 2 for name, *_ in peer.ROWS if name not in rounds}
    out = peer.summarize(rounds, {"bundle_int4": 90, "gguf_Q4_0": 100, "gguf_Q4_K_M": 120}, (64,), shipped=peer.search_row("block-128"))
    assert out["ratios"]["decode_vs_llama_q4_0@64"]["median"] == 1.25
    section = {**out, "export_search": record, "llama_cpp": {"llama-cpp-python sdist": "0", "cmake_options": [], "threads": 2},
               "bundle_session_options": {}, "rounds": 2, "sizes_bytes": {"bundle_int4": 90, "gguf_Q4_0": 100,
                                                                         "gguf_Q4_K_M": 120, "onnx_adapter_r8": 5,
                                                                         "gguf_lora_r8": 5}}
    text = "\n".join(report.peer_lines(section))
    assert "### Export search on this base (gates: perplexity_ratio <= 1.3, kl_nats_per_token <= 0.05" in text
    assert "| `block-128` | int4_block_size=128 | pass |" in text and "use the shipped variant (`block-128`)" in text


def test_llama_shaped_bench_base_has_separate_projections_and_packs_like_phi3(tmp_path, monkeypatch):
    from test_bench import _olive_in_process, _tokenizer

    import phi_pipeline.orchestration.runner
    from phi_pipeline.bench.models import SIZES, build_bench_base, export_bundle, make_random_adapter

    arch = SIZES["llama-tiny"]
    base = build_bench_base(tmp_path / "base", arch, _tokenizer(tmp_path / "tokenizer"))
    assert json.loads((base / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert arch.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = {"r8": make_random_adapter(base, tmp_path / "r8", r=8, seed=8, target_modules=arch.target_modules)}
    monkeypatch.setattr(phi_pipeline.orchestration.runner, "run_olive", _olive_in_process)
    bundle = export_bundle(base, peft, {"r8": 8}, "int4", tmp_path / "int4").bundle
    import onnx

    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    names = [n.name for n in graph.node if n.op_type == "MatMulNBits" and "layers.0/" in n.name]
    assert len(names) == 4  # qkv packed, o, gate/up packed, down: as the Phi-3 bundle


def test_chunked_perplexity_scores_only_the_second_half_of_each_chunk_as_llama_perplexity():
    import numpy as np

    chunks = [[0, 1, 2, 3, 0, 1, 2, 3], [3, 2, 1, 0, 3, 2, 1, 0]]
    logits = []
    for ids in chunks:
        lg = np.full((len(ids), 4), -1e9)
        lg[:, 0] = 0.0  # the first half predicts token 0 at full confidence: wrong for most targets there
        for j in range(len(ids) // 2, len(ids) - 1):  # scored: the target at probability 1/2, two others at 1/4
            lg[j] = np.log([0.25, 0.25, 0.25, 0.25])
            lg[j, ids[j + 1]] = np.log(0.5)
            lg[j, (ids[j + 1] + 1) % 4] = -1e9
        logits.append(lg)
    by_ids = {tuple(ids): lg for ids, lg in zip(chunks, logits)}
    assert peer.chunked_perplexity(lambda ids, first: by_ids[tuple(ids)][first:], chunks) == pytest.approx(2.0)


def test_perplexity_is_read_from_llama_perplexity_final_estimate():
    text = "[1]9.1234,[2]10.5000,\nFinal estimate: PPL = 10.5000 +/- 0.81234\n"
    assert peer.parse_perplexity(text) == {"perplexity": 10.5, "plus_minus": 0.81234}
    with pytest.raises(peer.PeerError, match="no final perplexity"):
        peer.parse_perplexity("main: error: you need at least 256 tokens")
