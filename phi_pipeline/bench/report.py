"""results.json -> report.md (tables) and decode.png (decode speed, first-token latency, memory).

Only what results.json holds is shown; figures are `median [min-max]` over the repetitions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi_pipeline.bench.machine import describe
from phi_pipeline.evaluate.speed import CONSISTENT, NOISE

CHART = "decode.png"
MIB = 1 << 20
# ONNX Runtime's published decode speed for Phi-3-mini-4k int4 with ONNX Runtime GenAI on one
# A100 (batch 1): what a Phi-3-mini-shaped CUDA run is set beside.
PUBLISHED_PHI3_MINI_INT4_A100_TOK_S = 218


def _mm(s: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    if not s or s.get("median") is None:
        return "-"
    return f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f}]"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:.1f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows
    ]


def decode_table(section: dict[str, Any], sizes: dict[str, int]) -> list[str]:
    speedups = section["derived"]["speedup_vs_pytorch"]
    gpu = any("gpu_memory_bytes" in r for r in section["rows"])
    rows = []
    for r in section["rows"]:
        name = row_name(r)
        if "error" in r:
            rows.append([name, r["adapter"] or "none", r["threads"], "-", "error: see results.json", "", "", "", "", ""])
            continue
        for length, p in r["prompts"].items():
            if "skipped" in p:
                rows.append([name, r["adapter"] or "none", r["threads"], length, "-", f"skipped: {p['skipped']}", "", "", "", ""])
                continue
            up = speedups.get(f"{r['label']}@{length}", {})
            rows.append([
                name, r["adapter"] or "none", r["threads"], length, _mm(p["ttft_s"], 1000, 0), _mm(p["decode_tok_s"]),
                _mm(p["decode_cpu_ms"], 1, 2), _x(up.get("decode")), _mib(r["peak_rss_bytes"]),
                *([_mib(r.get("gpu_memory_bytes"))] if gpu else []), _mib(sizes.get(_size_key(r))),
            ])
    return _table(
        ["engine", "adapter", "threads", "prompt", "TTFT ms", "decode tok/s", "CPU ms/token", "decode vs PyTorch",
         "peak RSS MiB", *(["GPU memory MiB"] if gpu else []), "size MiB"],
        rows,
    )


def row_name(row: dict[str, Any]) -> str:
    """engine precision, and for the openvino rows the layout and inference precision."""
    name = f"{row['engine']} {row['precision']}"
    if row.get("layout") == "merged":
        name += f" (merged, {row['inference_precision']} inference)"
    return name


def _size_key(row: dict[str, Any]) -> str:
    if row["engine"] == "pytorch-eager":
        return f"pytorch_{row['precision']}_safetensors"
    return f"{'openvino' if row['engine'] == 'openvino' else 'onnx'}_{row['precision']}_model"


def adapter_tables(costs: dict[str, Any]) -> list[str]:
    lines = ["### Load and switch", ""]
    rows = []
    for label, c in costs.items():
        if label.startswith("profile") or "error" in c:
            continue
        for name, load in c["load"].items():
            sw = c["switch"]
            rows.append([
                label, name, f"{load['first_s'] * 1000:.2f}", _mm(load["reload_s"], 1000, 2), _mm(load["ttft_first_use_s"], 1000, 0),
                _mm(sw["set_active_s"], 1e6, 1), _mm(sw["ttft_after_switch_s"], 1000, 0), _mm(sw["ttft_same_adapter_s"], 1000, 0),
            ])
    lines += _table(
        ["measured in", "adapter", "first load ms", "reload ms", "TTFT first use after load ms", "set active us",
         "TTFT after switch ms", "TTFT same adapter ms"],
        rows,
    )
    lines += ["", "### Decode slowdown (requests interleaved round-robin in one process, paired per round)", ""]
    rows = []
    for label, c in costs.items():
        for length, variants in c.get("slowdown", {}).items():
            for name, v in variants.items():
                rows.append([label, length, name, _mm(v["decode_tok_s"]), _mm(v["decode_slowdown_vs_none"], 100, 1),
                             _mm(v["decode_cpu_ms"], 1, 2), _mm(v["decode_cpu_increase_vs_none"], 100, 1)])
    lines += _table(["measured in", "prompt", "variant", "decode tok/s", "slowdown vs none %", "CPU ms/token",
                     "CPU time vs none %"], rows)
    lines += ["", "CPU time per token is the contention-robust figure for one-thread rows (`tdefault`); with more threads "
              "it includes spinning.", ""]
    for label, c in costs.items():
        if not label.startswith("profile") or "error" in c:
            continue
        lines += [f"### Kernel time per decode step by operator ({label}, onnxruntime profiler)", ""]
        groups = list(dict.fromkeys([*c["none"]["by_op"], *c["adapter"]["by_op"]]))[:8]
        rows = [
            [g, *(f"{c[v]['by_op'].get(g, {}).get('ms_per_step', 0):.3f}" for v in ("none", "adapter")),
             f"{c['none']['by_op'].get(g, {}).get('calls_per_step', 0):.0f}"]
            for g in groups
        ]
        rows.append(["all kernels", f"{c['none']['kernel_ms_per_step']:.3f}", f"{c['adapter']['kernel_ms_per_step']:.3f}", ""])
        rows.append(["whole model run", f"{c['none']['run_ms_per_step']:.3f}", f"{c['adapter']['run_ms_per_step']:.3f}", ""])
        lines += _table(["operator", "no adapter ms", "adapter r8 ms", "calls per step"], rows) + [""]
    return lines


def roofline_table(section: dict[str, Any]) -> list[str]:
    rows = [
        [r["label"], r["prompt"], f"{r['decode_tok_s']:.1f}", _mib(r["bytes_per_token"]["weights"]),
         _mib(r["bytes_per_token"]["kv_cache"]), f"{r['bandwidth_gb_s']:.1f}", f"{r['bound_tok_s']:.0f}",
         f"{100 * r['fraction_of_bound']:.0f}%"]
        for r in section["roofline"]
    ]
    return _table(
        ["configuration", "prompt", "decode tok/s", "weights read MiB/token", "KV read MiB/token", "copy GB/s",
         "bound tok/s", "share of bound"],
        rows,
    )


def pipeline_lines(p: dict[str, Any]) -> list[str]:
    run = p["pipeline_runs"][-1]
    rows = [[stage, f"{s:.1f}"] for stage, s in run["stage_seconds"].items()]
    lines = [f"Last run's stages (manifest stage_seconds, `{p['spec']}`, target {p['target']}):", ""]
    lines += _table(["stage", "seconds"], rows) + [""]
    rows = [[r["config"], f"{r['wall_s']:.1f}", ", ".join(f"{k} {v:.1f}" for k, v in run["olive_logs"].get(Path(r["config"]).stem, {}).get("passes_s", {}).items())]
            for r in run["olive_runs"]]
    lines += _table(["Olive workflow (pipeline)", "process wall s", "Olive passes s"], rows) + [""]
    rows = [[r["command"], f"{r['wall_s']:.1f}", ", ".join(f"{k} {v:.1f}" for k, v in r["passes_s"].items())]
            for r in p["by_hand_runs"][-1]["runs"]]
    lines += _table(["by hand", "wall s", "Olive passes s"], rows) + [""]
    lines += _table(["figure", "median [min-max]"], [
        ["phi-pipeline run, process wall s", _mm(p["pipeline_wall_s"])],
        ["same workflows by hand (sum of olive commands) s", _mm(p["by_hand_wall_s"])],
        ["pipeline time outside the Olive processes s", _mm(p["outside_olive_s"])],
        ["  of which stages Olive does not do (" + ", ".join(run["not_olive_stages_s"]) + ") s", _mm(p["not_olive_stages_s"])],
        ["  of which orchestration s", _mm(p["orchestration_s"])],
        ["  (the layout adapter, last run) s", f"{run['layout_adapter_s']:.1f}"],
        ["orchestration share of the pipeline wall %", _mm(p["orchestration_share"], 100, 1)],
        ["pipeline time beyond Olive's passes and those stages s", _mm(p["pipeline_beyond_passes_s"])],
        ["by-hand time beyond Olive's passes (process start-up, teardown) s", _mm(p["by_hand_beyond_passes_s"])],
        ["pipeline / by hand, wall (training time swings with load)", _mm(p["pipeline_over_by_hand"], 1, 3)],
        ["pipeline / by hand, the same work with pass time equalised", _mm(p["pipeline_over_by_hand_passes_equalised"], 1, 3)],
    ])
    return lines


def _row(section: dict[str, Any], **match: Any) -> dict[str, Any] | None:
    return next((r for r in section["rows"] if "error" not in r and all(r.get(k) == v for k, v in match.items())), None)


def headlines(results: dict[str, Any]) -> list[str]:
    """The few numbers a reader wants first, each from this run (absent pieces are left out)."""
    b, s = results["benchmark_model"], results["settings"]
    cuda = s["device"] == "cuda"
    threads = "default"  # the bundle as shipped: its genai_config.json (every core on CPU)
    short = str(s["prompt_lens"][0])
    lines = []
    torch, int4 = _row(b, engine="pytorch-eager", adapter=None), _row(b, precision="int4", adapter=None, threads=threads)
    if torch and int4 and "skipped" not in int4["prompts"][short]:
        up = b["derived"]["speedup_vs_pytorch"].get(f"{int4['label']}@{short}", {})
        memory = f"peak RSS {_mib(int4['peak_rss_bytes'])} vs {_mib(torch['peak_rss_bytes'])} MiB, "
        if int4.get("gpu_memory_bytes") and torch.get("gpu_memory_bytes"):
            memory += f"GPU memory {_mib(int4['gpu_memory_bytes'])} vs {_mib(torch['gpu_memory_bytes'])} MiB, "
        lines.append(
            f"ONNX int4 ({'CUDA' if cuda else 'as shipped'}) vs PyTorch eager {torch['precision']} "
            f"(prompt {short}): decode {_mm(int4['prompts'][short]['decode_tok_s'])} vs "
            f"{_mm(torch['prompts'][short]['decode_tok_s'])} tok/s ({_x(up.get('decode'))}), time to first token "
            f"{_x(up.get('ttft'))} faster, {memory}on disk {_mib(b['sizes_bytes'].get('onnx_int4_model'))} vs "
            f"{_mib(b['sizes_bytes'].get(_size_key(torch)))} MiB."
        )
    if cuda and int4 and b["size"] == "phi3-mini" and "skipped" not in int4["prompts"][short]:
        tok = int4["prompts"][short]["decode_tok_s"]["median"]
        lines.append(
            f"Phi-3-mini-shaped int4 on this GPU: {tok:.0f} tok/s decode; ONNX Runtime's published figure for Phi-3-mini "
            f"int4 on an A100 is about {PUBLISHED_PHI3_MINI_INT4_A100_TOK_S} tok/s "
            f"({tok / PUBLISHED_PHI3_MINI_INT4_A100_TOK_S:.2f}x; a different GPU, so a sanity check, not a ranking)."
        )
    adapter, merged = b["sizes_bytes"]["onnx_adapter"].get("r8"), b["sizes_bytes"].get("onnx_int4_merged_variant")
    if adapter and merged:
        lines.append(f"One r8 adapter: {_mib(adapter)} MiB as an .onnx_adapter vs {_mib(merged)} MiB for a full int4 model "
                     f"with it merged in ({merged / adapter:.0f}x).")
    gain = b["derived"]["threads_speedup"].get(f"onnx-int4-none-t{s['threads']}@{short}")
    if gain:
        lines.append(f"intra_op_num_threads={s['threads']} vs the bundle as shipped: int4 decode {_x(gain['decode'])}, "
                     f"first token {_x(gain['ttft'])}.")
    acc = b.get("accuracy")
    if acc and "error" not in acc:
        lines.append(accuracy_line(acc))
    lines += openvino_headline(b, threads, short)
    costs = b["adapter_costs"].get(f"adapters-onnx-int4-t{threads}", {}).get("slowdown", {}).get(short)
    tried = {t["name"]: t for t in (results.get("peer") or {}).get("tried", [])}
    if costs:
        lines.append(
            f"Adapter cost, int4, threads {threads}, paired: r8 active {_pct(costs['r8']['decode_slowdown_vs_none']['median'])}, "
            f"r16 {_pct(costs['r16']['decode_slowdown_vs_none']['median'])} decode vs no adapter on the same graph."
        )
    for name in ("no LoRA inputs", "unpacked projections"):
        t = tried.get(name)
        if t:
            lens = list(t["decode_vs_shipped"])
            lines.append(f"Tried `{name}`, {t['change']}; each in its own process, paired rounds: decode "
                         + ", ".join(f"{_mm(t['decode_vs_shipped'][n], 1, 2)}x (prompt {n}, faster in "
                                     f"{t['faster_than_shipped_in'][n]})" for n in lens)
                         + f" vs the bundle as shipped, {_mib(t['size_bytes'])} MiB on disk: {t['verdict']}.")
    roof = next((r for r in b["roofline"] if r["label"] == f"onnx-int4-none-t{threads}" and str(r["prompt"]) == short), None)
    if roof:
        lines.append(f"int4 decode reaches {100 * roof['fraction_of_bound']:.0f}% of the copy-bandwidth bound "
                     f"({roof['bound_tok_s']:.0f} tok/s).")
    peers = {s["size"]: results.get("peer")} | (results.get("peer_more") or {})
    for size, peer in peers.items():
        if not peer or "ratios" not in peer:
            continue
        r = peer["ratios"]
        lens = [k.split("@")[1] for k in r if k.startswith("decode_vs_llama_q4_0@")]
        search = peer.get("export_search")
        shipped = f" by the export search (variant `{search['winner']}`)" if search and search.get("winner") else ""
        lines.append(
            f"{size}: bundle int4 as shipped{shipped} / llama.cpp Q4_0, paired rounds: decode "
            + ", ".join(f"{_mm(r[f'decode_vs_llama_q4_0@{n}'], 1, 2)}x (prompt {n})" for n in lens)
            + "; first-token speed " + ", ".join(f"{_mm(r[f'first_token_speed_vs_llama_q4_0@{n}'], 1, 2)}x" for n in lens)
            + f"; size {r['size_vs_llama_q4_0']:.2f}x; r8 adapter decode cost "
            + ", ".join(f"{_mm(r[f'adapter_decode_cost_bundle@{n}'], 100, 1)} % vs llama.cpp's "
                        f"{_mm(r[f'adapter_decode_cost_llama_cpp@{n}'], 100, 1)} %" for n in lens) + "."
        )
    p = results.get("pipeline_costs")
    if p and "error" not in p:
        lines.append(
            f"Pipeline: orchestration {_mm(p['orchestration_share'], 100, 1)} % of `phi-pipeline run`'s wall time; "
            f"pipeline / the same Olive workflows by hand {_mm(p['pipeline_over_by_hand_passes_equalised'], 1, 3)} with "
            f"Olive's pass time equalised ({_mm(p['pipeline_over_by_hand'], 1, 2)} in raw wall time, which training "
            "time under varying load dominates)."
        )
    return [f"- {line}" for line in lines]


def openvino_headline(b: dict[str, Any], threads: str, short: str) -> list[str]:
    """The openvino bundle's variant (r8 merged) on OpenVINO's CPU device beside the cpu bundle with r8."""
    ov = [r for r in b["rows"] if r["engine"] == "openvino" and "error" not in r]
    bundle = _row(b, engine="onnxruntime-genai", precision="int4", adapter="r8", threads=threads)
    if not ov or bundle is None or "error" in bundle:
        return [f"OpenVINO rows: skipped ({b['openvino']['skipped']})."] if "skipped" in b.get("openvino", {}) else []
    sizes = b["sizes_bytes"]
    parts = [f"{r['inference_precision']} inference decode {_mm(r['prompts'][short]['decode_tok_s'])} tok/s, "
             f"first token {_mm(r['prompts'][short]['ttft_s'], 1000, 0)} ms" for r in ov]
    return [f"OpenVINO int4 (openvino target's chain, r8 merged, CPU device, prompt {short}): " + "; ".join(parts)
            + f"; vs the cpu bundle with r8 {_mm(bundle['prompts'][short]['decode_tok_s'])} tok/s, "
            f"{_mm(bundle['prompts'][short]['ttft_s'], 1000, 0)} ms; on disk {_mib(sizes.get('openvino_int4_model'))} MiB "
            f"(one per adapter) vs {_mib(sizes.get('onnx_int4_model'))} MiB + {_mib(sizes['onnx_adapter'].get('r8'))} MiB."]


def accuracy_line(acc: dict[str, Any]) -> str:
    return (f"int4 vs fp32 export, {acc['prompts']} random {acc['prompt_len']}-token prompts, {acc['new_tokens']} "
            f"teacher-forced positions: token agreement {_mm(acc['token_agreement'], 100, 1)} %, perplexity "
            f"{acc['perplexity_quantized']:.2f} vs {acc['perplexity_reference']:.2f} ({acc['perplexity_ratio']:.3f}x), "
            f"KL {_mm(acc['kl_nats_per_token'], 1, 4)} nats/token (random weights: near-flat logits, a pessimistic proxy).")


def peer_lines(p: dict[str, Any]) -> list[str]:
    """The llama.cpp comparison (peer.py): rows, paired ratios, what was tried."""
    if "skipped" in p:
        return [f"Skipped: {p['skipped']}", ""]
    lens = list(p["rows"][0]["prompts"])
    sizes = p["sizes_bytes"]
    size_of = {"bundle int4": sizes["bundle_int4"], "llama.cpp Q4_0": sizes["gguf_Q4_0"], "llama.cpp Q4_K_M": sizes["gguf_Q4_K_M"]}
    adapter_of = {"onnxruntime-genai": sizes["onnx_adapter_r8"], "llama.cpp": sizes["gguf_lora_r8"]}
    rows = []
    for r in p["rows"]:
        on_disk = _mib(size_of.get(r["name"])) if r["adapter"] is None else f"+ {_mib(adapter_of[r['engine']])}"
        rows.append([r["name"], r["tool"],
                     *(_mm(r["prompts"][n]["decode_tok_s"]) for n in lens),
                     *(_mm(r["prompts"][n]["ttft_s"], 1000, 0) for n in lens),
                     _mib(r["peak_rss_bytes"]), on_disk if r["name"] in size_of or r["adapter"] else "-"])
    lines = [f"llama.cpp from the llama-cpp-python {p['llama_cpp']['llama-cpp-python sdist']} sdist "
             f"(cmake {' '.join(p['llama_cpp']['cmake_options'])}), {p['llama_cpp']['threads']} threads; the bundle "
             f"as shipped (decoder session options {p['bundle_session_options']}); {p['rounds']} interleaved rounds, "
             "one request per prompt length and row per round.", ""]
    lines += _table(["row", "measured with", *(f"decode tok/s, prompt {n}" for n in lens),
                     *(f"first token ms, prompt {n}" for n in lens), "peak RSS MiB", "on disk MiB"], rows) + [""]
    ratio_rows = [[k, _mm(v, 1, 3) if isinstance(v, dict) else f"{v:.3f}"] for k, v in p["ratios"].items()]
    lines += _table(["paired per round: bundle / llama.cpp (first token: llama.cpp time / bundle time; "
                     "adapter cost: 1 - with / without)", "median [min-max]"], ratio_rows) + [""]
    search = p.get("export_search")
    if search:
        from phi_pipeline.evaluate.report import export_search_markdown

        lines += [f"### Export search on this base (gates: {', '.join(f'{k} {v}' for k, v in search['gates'].items())} "
                  "against the fp32 export; `ppl ratio` below is that proxy)", ""]
        lines += export_search_markdown(search)[2:]
        lines += [f"The rows and ratios above use the shipped variant (`{search['winner']}`); `bundle int4` is the spec's "
                  "settings (variant `spec`).", ""]
    lines += ["llama.cpp's first token is llama-bench's prompt processing time (the bundle's also counts creating "
              "the generator and sampling); its decode runs after a context of the prompt's length (`-d`). The "
              "adapter rows are llama-completion's own timings, with and without `--lora`, on the same prompt file.", ""]
    if p.get("tried"):
        lines += ["### What was tried (each variant once in every round, rows in a shuffled order)", ""]
        lines += tried_table(p["tried"], lens) + [""]
        lines += [f"Verdict: `faster` / `slower` where, at every prompt length, the median paired decode ratio against "
                  f"the shipped bundle is beyond ±{100 * NOISE:.0f} % and has that sign in at least "
                  f"{100 * CONSISTENT:.0f} % of the rounds, else `no measurable change`. The control row is the shipped "
                  "bundle run again: how far its ratios stray from 1 is this run's noise.", ""]
    return lines


def tried_table(tried: list[dict[str, Any]], lens: list[str]) -> list[str]:
    rows = [[t["name"], t["change"], _mib(t["size_bytes"]),
             *(f"{_mm(t['decode_vs_shipped'][n], 1, 3)} ({t['faster_than_shipped_in'][n]} faster)" for n in lens),
             *(_mm(t["first_token_speed_vs_shipped"][n], 1, 3) for n in lens),
             *(_mm(t["decode_vs_llama_q4_0"][n], 1, 3) for n in lens), t["verdict"]]
            for t in tried]
    return _table(["variant", "change from the shipped bundle", "on disk MiB",
                   *(f"decode vs shipped, prompt {n}" for n in lens), *(f"first token speed vs shipped, prompt {n}" for n in lens),
                   *(f"decode vs llama.cpp Q4_0, prompt {n}" for n in lens), "verdict"], rows)


def limits_lines(results: dict[str, Any]) -> list[str]:
    """Where the shipped bundle's decode step and first token go (the operator profile at the shipped
    threads) and how close decode runs to the memory-bandwidth bound: what limits it against llama.cpp."""
    b = results.get("benchmark_model", {})
    threads = results["settings"]["threads"]
    profile = b.get("adapter_costs", {}).get(f"profile-onnx-int4-t{threads}")
    lines = []
    if profile and "error" not in profile:
        none = profile["none"]
        top = ", ".join(f"{op} {100 * v['share']:.0f} %" for op, v in list(none["by_op"].items())[:4])
        outside = 1 - none["kernel_ms_per_step"] / none["run_ms_per_step"] if none["run_ms_per_step"] else None
        lines.append(f"Decode step of the int4 bundle with no adapter ({threads} threads, onnxruntime profiler): "
                     f"{none['run_ms_per_step']:.2f} ms per model run, {none['kernel_ms_per_step']:.2f} ms of it in kernels "
                     f"({'-' if outside is None else f'{100 * outside:.0f} %'} outside them: scheduling and the runtime between kernels); kernel time by "
                     f"operator: {top}.")
    if profile and "error" not in profile and (pre := profile["none"].get("prefill")):  # results before 2026-12-03 lack it
        top = ", ".join(f"{op} {100 * v['share']:.0f} %" for op, v in list(pre["by_op"].items())[:4])
        lines.append(f"First token of the same request (its prefill of {pre['prompt_tokens']} tokens): {pre['run_ms_per_step']:.2f} ms "
                     f"in one model run, {pre['kernel_ms_per_step']:.2f} ms of it in kernels; kernel time by operator: {top}.")
    roof = [r for r in b.get("roofline", []) if r["label"] == f"onnx-int4-none-t{threads}"]
    if roof:
        lines.append("Against the copy-bandwidth bound (weights + KV cache read once per token): " + ", ".join(
            f"prompt {r['prompt']} {100 * r['fraction_of_bound']:.0f} % of {r['bound_tok_s']:.0f} tok/s" for r in roof) + ".")
    return [f"- {line}" for line in lines] + ([""] if lines else [])


def write_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    section = results["benchmark_model"]
    rows = [r for r in section["rows"] if "error" not in r]
    lengths = list(rows[0]["prompts"]) if rows else []
    short = {"pytorch-eager": "torch", "openvino": "ov"}
    labels = [f"{short.get(r['engine'], 'ort')} {r['precision']}\n{r['adapter'] or 'none'} t={r['threads']}".replace("torch default", "def")
              for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    width = 0.8 / max(len(lengths), 1)
    for metric, ax, scale, title in (("decode_tok_s", axes[0], 1, "decode tokens/s (higher is better)"),
                                     ("ttft_s", axes[1], 1000, "time to first token, ms (lower is better)")):
        for i, length in enumerate(lengths):
            med = [r["prompts"][length][metric]["median"] * scale for r in rows]
            lo = [med[j] - r["prompts"][length][metric]["min"] * scale for j, r in enumerate(rows)]
            hi = [r["prompts"][length][metric]["max"] * scale - med[j] for j, r in enumerate(rows)]
            ax.bar([j + i * width for j in range(len(rows))], med, width, yerr=[lo, hi], capsize=2, label=f"prompt {length}")
        ax.set_title(title)
        ax.set_xticks([j + width * (len(lengths) - 1) / 2 for j in range(len(rows))], labels, fontsize=7, rotation=60)
        ax.legend()
    cuda = results["settings"]["device"] == "cuda"
    key = "gpu_memory_bytes" if cuda else "peak_rss_bytes"
    axes[2].bar(range(len(rows)), [(r.get(key) or 0) / MIB for r in rows], color="gray")
    axes[2].set_xticks(range(len(rows)), labels, fontsize=7, rotation=60)
    axes[2].set_title(f"{'GPU memory' if cuda else 'peak RSS'} per configuration, MiB")
    where = results["bandwidth"].get("gpu", {}).get("device") if cuda else f"{results['machine']['cpus']} CPU cores"
    fig.suptitle(f"phi-pipeline bench: {section['size']} Phi-3-shaped model ({section['parameters'] / 1e6:.0f}M params), "
                 f"{where}, batch 1, {results['settings']['new_tokens']} new tokens; median with min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_lines(results: dict[str, Any]) -> list[str]:
    b, bw = results["benchmark_model"], results["bandwidth"]
    sizes = b["sizes_bytes"]
    lines = [
        f"Arch {b['arch']}. Exported by the pipeline's export workflow in {b['export_seconds']} s. "
        f"Load average {b['load_average']['before']} -> {b['load_average']['after']}.",
        "",
        f"![decode speed, first-token latency and memory]({CHART})",
        "",
    ]
    lines += decode_table(b, sizes) + [""]
    lines += ["Adapter decode slowdown from the table (separate processes): " + ", ".join(
        f"{k} {_pct(v)}" for k, v in b["derived"]["adapter_decode_slowdown"].items()), ""]
    lines += ["Intra-op threads = cores vs default: " + ", ".join(
        f"{k} decode {_x(v['decode'])} TTFT {_x(v['ttft'])}" for k, v in b["derived"]["threads_speedup"].items()), ""]
    lines += ["### Sizes on disk", ""]
    model = sizes.get("onnx_int4_model")
    rows = [[k, _mib(v)] for k, v in sizes.items() if isinstance(v, int)]
    rows += [[f"PEFT adapter {n}", _mib(v)] for n, v in sizes["peft_adapter"].items()]
    rows += [[f".onnx_adapter {n}", f"{_mib(v)} ({100 * v / model:.1f}% of the int4 model)" if model else _mib(v)]
             for n, v in sizes["onnx_adapter"].items()]
    lines += _table(["artefact", "MiB"], rows) + [""]
    lines += ["## Adapter costs", ""] + adapter_tables(b["adapter_costs"]) + [""]
    if "gpu" in bw:
        measured = f"CUDA device-to-device copy bandwidth ({bw['gpu']['device']}, bytes read + written per second): {_mm(bw['gpu']['gb_per_s'])} GB/s."
    else:
        measured = (f"numpy copy bandwidth (bytes read + written per second): one thread {_mm(bw['one_thread']['gb_per_s'])} GB/s, "
                    f"{bw['all_cores']['threads']} threads {_mm(bw['all_cores']['gb_per_s'])} GB/s; the higher median is the bound.")
    lines += [
        "## Memory-bandwidth roofline",
        "",
        measured + " Bytes per token: every initializer once (one embedding row) plus the KV cache (in the graph's "
        "dtype) at the mean context; an active adapter adds its own file size.",
        "",
    ]
    return lines + roofline_table(b) + [""]


def given_lines(g: dict[str, Any]) -> list[str]:
    lines = ["Adapters: " + ", ".join(f"{n} {_mib(v)} MiB" for n, v in g["adapter_bytes"].items())
             + f". Stage seconds in its manifest (0: cached): {g['manifest_stage_seconds']}.", ""]
    return lines + decode_table(g, g["sizes_bytes"]) + [""]


def _failed(section: dict[str, Any]) -> list[str]:
    return ["Failed:", "", "```", section["error"].rstrip(), "```", ""]


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    m, s = results["machine"], results["settings"]
    lines = [
        "# phi-pipeline benchmark",
        "",
        f"Generated by `phi-pipeline bench` on {results['created']}: {m['cpus']} CPU cores ({describe(m)}), "
        f"load average {m['load_average_start']} at start, {m['load_average_end']} at end; total {results['wall_s']} s.",
        f"Settings: size {s['size']}, {s['reps']} repetitions, prompts {s['prompt_lens']} tokens, {s['new_tokens']} new "
        f"tokens, batch 1, greedy, device {s['device']}. Every figure is `median [min-max]`; ratios compare runs of this "
        "invocation. `threads`: onnxruntime-genai intra-op threads (`default`: the bundle's genai_config.json as shipped; "
        "CPU bundles name 0, every core). "
        "Other processes on the machine move wall-clock figures: each row records the load average after it, and "
        "CPU ms/token (process CPU time) is the steadier figure for one-thread rows.",
        "",
        *[f"- Note: {note}" for note in results.get("notes", [])],
        *([""] if results.get("notes") else []),
    ]
    if "skipped" in results:
        lines += [f"Skipped: {results['skipped']}", ""]
        (out_dir / "report.md").write_text("\n".join(lines))
        return out_dir / "report.md"
    b, g, costs = results["benchmark_model"], results["given_bundle"], results.get("pipeline_costs")
    ok = "error" not in b and "error" not in results["bandwidth"]
    if ok:
        lines += ["## Headlines", ""] + headlines(results) + [""]
    title = f"{b['size']}, {b['parameters'] / 1e6:.0f}M parameters, random weights" if "size" in b else ""
    lines += [f"## Benchmark model: {title}", ""] + (model_lines(results) if ok else _failed(b if "error" in b else results["bandwidth"]))
    lines += [f"## Given bundle: `{s['bundle']}`", ""] + (_failed(g) if "error" in g else given_lines(g))
    if "peer" in results:
        lines += ["## Against llama.cpp (`--peer llama.cpp`)", ""]
        lines += _failed(results["peer"]) if "error" in results["peer"] else peer_lines(results["peer"]) + limits_lines(results)
    for size, section in (results.get("peer_more") or {}).items():
        lines += [f"## Against llama.cpp on the {size} bench base", ""]
        lines += _failed(section) if "error" in section else peer_lines(section)
    if costs:
        lines += ["## Pipeline costs (tiny default, scratch copy of the project)", ""]
        lines += _failed(costs) if "error" in costs else pipeline_lines(costs) + [""]
    if "serving" in results:
        from phi_pipeline.bench.serving import report_lines

        lines += ["## Serving: concurrent clients, mixed adapters", ""] + report_lines(results["serving"])
    if ok:
        write_chart(results, out_dir / CHART)
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return out_dir / "report.md"
