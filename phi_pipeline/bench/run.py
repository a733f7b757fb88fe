"""The whole benchmark: machine, the given bundle, the benchmark model, pipeline costs -> results.json.

Order matters for fairness: every decode configuration of one model runs back to back in the same
invocation, so ratios between them (speed-ups, adapter slowdowns, thread gains) compare runs
taken under the same conditions; the load average is recorded before and after each section.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from phi_pipeline.bench import roofline
from phi_pipeline.bench.machine import machine
from phi_pipeline.bench.decode import (
    TORCH_DTYPES,
    TORCH_PRECISION,
    DecodeConfig,
    run_config,
)
from phi_pipeline.bench.models import (
    SIZES,
    build_bench_base,
    export_bundle,
    make_random_adapter,
    merged_bundle,
)
from phi_pipeline.bench.options import (
    ADAPTER_RANKS,
    PRECISIONS,
    SCHEMA,
    TABLE_ADAPTER,
    BenchOptions,
)
from phi_pipeline.bench.serving import bench_serving
from phi_pipeline.orchestration.diskspace import tree_size
from phi_pipeline.bundle.layout import ADAPTERS_DIR
from phi_pipeline.evaluate.stats import load_average, ratio
from phi_pipeline.errors import PipelineError
from phi_pipeline.runtime.target_models import OpenVINOModel


def _say(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def _thread_settings(opts: BenchOptions) -> list[int | None]:
    """onnxruntime-genai's default (None) and one intra-op thread per core; on CUDA only the
    default, as the GPU does the work."""
    return [None, opts.threads] if opts.threads > 1 and opts.device == "cpu" else [None]


def tuned_threads(opts: BenchOptions) -> int | str:
    """The `threads` value of the rows the headlines quote."""
    return _thread_settings(opts)[-1] or "default"


def _label(engine: str, precision: str, adapter: str | None, threads: int | None) -> str:
    return f"{engine}-{precision}-{adapter or 'none'}-t{threads or 'default'}"


def decode_rows(
    onnx: dict[str, Path], adapters: dict[str, dict[str, Path]], torch_base: Path | None, opts: BenchOptions, scratch: Path
) -> list[dict[str, Any]]:
    """One subprocess per configuration: torch eager (none, adapter) then each ONNX precision x
    (none, adapter) x thread setting. adapters: engine/precision key -> {name: path}."""
    common = dict(prompt_lens=opts.prompt_lens, new_tokens=opts.new_tokens, reps=opts.reps, device=opts.device)
    rows = []
    if torch_base is not None:
        precision = TORCH_PRECISION[opts.device]
        for name, path in [(None, None), *adapters.get("torch", {}).items()]:
            label = _label("torch", precision, name, None)
            _say(f"decode {label}")
            cfg = DecodeConfig(label, "torch", str(torch_base), adapter=str(path) if path else None, **common)
            meta = dict(engine="pytorch-eager", precision=precision, adapter=name, threads="torch default")
            rows.append(meta | run_config(cfg, scratch))
    for precision, model in onnx.items():
        for name, path in [(None, None), *adapters.get(precision, {}).items()]:
            for threads in _thread_settings(opts):
                label = _label("onnx", precision, name, threads)
                _say(f"decode {label}")
                cfg = DecodeConfig(label, "onnx", str(model), adapter=str(path) if path else None, threads=threads, **common)
                meta = dict(engine="onnxruntime-genai", precision=precision, adapter=name, threads=threads or "default")
                rows.append(meta | run_config(cfg, scratch))
    return rows


def _timed(row: dict[str, Any] | None, length: str) -> dict[str, Any] | None:
    """A row's figures at one prompt length; None when the row failed or skipped that length."""
    if row is None or "error" in row:
        return None
    p = row["prompts"].get(length)
    return p if p and "skipped" not in p else None


def derived(rows: list[dict[str, Any]], opts: BenchOptions) -> dict[str, Any]:
    """Ratios between rows of one invocation: ONNX vs PyTorch, adapter vs none, cores vs default."""
    def find(**match: Any) -> dict[str, Any] | None:
        return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)

    out: dict[str, Any] = {"speedup_vs_pytorch": {}, "adapter_decode_slowdown": {}, "threads_speedup": {}}
    for r in rows:
        for length in map(str, opts.prompt_lens):
            p = _timed(r, length)
            if p is None:
                continue
            key = f"{r['label']}@{length}"
            torch = _timed(find(engine="pytorch-eager", adapter=r["adapter"]), length)
            if torch is not None and r["engine"] != "pytorch-eager":
                out["speedup_vs_pytorch"][key] = {
                    "decode": ratio(p["decode_tok_s"], torch["decode_tok_s"]),
                    "ttft": ratio(torch["ttft_s"], p["ttft_s"]),
                }
            none = _timed(find(engine=r["engine"], precision=r["precision"], adapter=None, threads=r["threads"]), length)
            if r["adapter"] is not None and none is not None:
                rel = ratio(p["decode_tok_s"], none["decode_tok_s"])
                out["adapter_decode_slowdown"][key] = round(1 - rel, 4) if rel is not None else None
            default = _timed(find(engine=r["engine"], precision=r["precision"], adapter=r["adapter"], threads="default"), length)
            if r["threads"] == opts.threads and default is not None:
                out["threads_speedup"][key] = {
                    "decode": ratio(p["decode_tok_s"], default["decode_tok_s"]),
                    "ttft": ratio(default["ttft_s"], p["ttft_s"]),
                }
    return out


def roofline_rows(rows: list[dict[str, Any]], onnx: dict[str, Path], bandwidth: dict[str, Any], opts: BenchOptions) -> list[dict[str, Any]]:
    """decode tokens/s x bytes read per token / copy bandwidth, for each ONNX row with no adapter."""
    gb_s = bandwidth["gb_per_s"]["median"]
    out = []
    for r in rows:
        if r.get("engine") != "onnxruntime-genai" or r.get("adapter") is not None:
            continue
        for length in opts.prompt_lens:
            p = _timed(r, str(length))
            if p is None:
                continue
            read = roofline.bytes_per_token(onnx[r["precision"]], length + opts.new_tokens // 2)
            tok = p["decode_tok_s"]["median"]
            out.append({
                "label": r["label"], "prompt": length, "decode_tok_s": tok, "bytes_per_token": read,
                "bandwidth_gb_s": gb_s, "fraction_of_bound": roofline.roofline(tok, read["total"], gb_s),
                "bound_tok_s": round(gb_s * 1e9 / read["total"], 1),
            })
    return out


def _section(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one section; a failure is recorded as {"error": traceback} so the others still report."""
    start, before = time.perf_counter(), load_average()
    _say(f"{name} ...")
    try:
        result = fn()
    except Exception:  # one broken section (e.g. the pipeline mid-edit) must not lose the others
        result = {"error": traceback.format_exc()[-4000:]}
        _say(f"{name} failed:\n{result['error']}")
    result["load_average"] = {"before": before, "after": load_average()}
    result["section_wall_s"] = round(time.perf_counter() - start, 1)
    return result


def bench_given_bundle(opts: BenchOptions) -> dict[str, Any]:
    """The bundle as shipped: ONNX rows with and without its first adapter, and their sizes; PyTorch
    rows too when its base model and the adapter's PEFT folder (in the pipeline's cache) are here."""
    manifest = json.loads((opts.bundle / "manifest.json").read_text())
    first = manifest["adapters"][0]
    precision = manifest["precision"]
    adapters: dict[str, dict[str, Path]] = {precision: {first["name"]: opts.bundle / first["file"]}}
    base = opts.project_root / manifest["base_model"]["name_or_path"]
    torch_base = base if (base / "config.json").is_file() else None
    peft = opts.project_root / ".phi-pipeline" / "cache" / "adapters" / first["cache_key"] / "adapter"
    if torch_base and peft.is_dir():
        adapters["torch"] = {first["name"]: peft}
    rows = decode_rows({precision: opts.bundle}, adapters, torch_base, opts, opts.work_dir / "runs" / "bundle")
    sizes = {f"onnx_{precision}_model": tree_size(opts.bundle, exclude=(ADAPTERS_DIR,))}
    if torch_base is not None:
        sizes[torch_size_key(torch_base)] = safetensors_bytes(torch_base)
    return {
        "bundle": str(opts.bundle),
        "pipeline": manifest["pipeline"],
        "precision": precision,
        "manifest_stage_seconds": manifest.get("stage_seconds", {}),
        "sizes_bytes": sizes,
        "adapter_bytes": {a["name"]: (opts.bundle / a["file"]).stat().st_size for a in manifest["adapters"]},
        "rows": rows,
        "derived": derived(rows, opts),
    }


def bench_model(opts: BenchOptions, bandwidth: dict[str, Any]) -> dict[str, Any]:
    """The benchmark base at every precision, PyTorch eager beside it, adapter costs, roofline."""
    arch = SIZES[opts.size]
    work = opts.work_dir / opts.size
    base = build_bench_base(work / "base", arch, opts.bundle, dtype=TORCH_PRECISION[opts.device], device=opts.device)
    peft = {
        name: make_random_adapter(base, work / "adapters" / name, r=r, seed=r, target_modules=arch.target_modules)
        for name, r in ADAPTER_RANKS.items()
    }
    target = "cuda" if opts.device == "cuda" else "cpu"
    exports = {}
    for precision in PRECISIONS[opts.device]:
        _say(f"exporting the benchmark base ({precision}) with the pipeline's export workflow")
        exports[precision] = export_bundle(base, peft, ADAPTER_RANKS, precision, work / precision, target)
    onnx = {p: e.bundle for p, e in exports.items()}
    int4 = PRECISIONS[opts.device][0]
    merged = None
    if opts.device == "cpu":  # on CUDA a third multi-GB export would not fit a GPU lease; the CPU run measures it
        _say("exporting the merged variant (adapter r8 folded into the weights)")
        merged = merged_bundle(base, peft[TABLE_ADAPTER] / "adapter", ADAPTER_RANKS[TABLE_ADAPTER], int4, work / f"merged-{int4}")

    openvino = openvino_variant(base, peft[TABLE_ADAPTER] / "adapter", opts, work / "openvino-int4")

    adapter_files = {p: {n: b / "adapters" / f"{n}.onnx_adapter" for n in ADAPTER_RANKS} for p, b in onnx.items()}
    table_adapters: dict[str, dict[str, Path]] = {"torch": {TABLE_ADAPTER: peft[TABLE_ADAPTER] / "adapter"}}
    table_adapters |= {p: {TABLE_ADAPTER: files[TABLE_ADAPTER]} for p, files in adapter_files.items()}
    scratch = work / "runs"
    rows = decode_rows(onnx, table_adapters, base, opts, scratch)
    if isinstance(openvino, Path):
        rows += openvino_rows(openvino, opts, scratch)
    costs = adapter_costs(onnx, adapter_files, peft, base, opts, scratch)
    return {
        "size": opts.size,
        "arch": asdict(arch),
        "parameters": arch.parameters,
        "export_seconds": {p: e.export_seconds for p, e in exports.items()},
        "bundles": {p: str(b) for p, b in onnx.items()},
        "sizes_bytes": {
            torch_size_key(base): safetensors_bytes(base),
            **{f"onnx_{p}_model": tree_size(b, exclude=(ADAPTERS_DIR,)) for p, b in onnx.items()},
            **({f"onnx_{int4}_merged_variant": tree_size(merged)} if merged else {}),
            **({"openvino_int4_model": tree_size(openvino)} if isinstance(openvino, Path) else {}),
            "peft_adapter": {n: (peft[n] / "adapter" / "adapter_model.safetensors").stat().st_size for n in ADAPTER_RANKS},
            "onnx_adapter": {n: f.stat().st_size for n, f in adapter_files[int4].items()},
        },
        "rows": rows,
        "openvino": {"variant": str(openvino)} if isinstance(openvino, Path) else {"skipped": openvino},
        "derived": derived(rows, opts),
        "adapter_costs": costs,
        "roofline": roofline_rows(rows, onnx, bandwidth, opts),
        "accuracy": accuracy_proxies(onnx, opts),
    }


# OpenVINO rows: the compile properties the openvino gates use (target_runtime.OpenVINOModel) and the
# CPU plugin's own defaults (bf16 inference where the CPU has it), each with OpenVINO's default threads.
OPENVINO_CONFIGS = {"f32": OpenVINOModel.EVAL_CONFIG, "plugin default": {}}


def openvino_problem(project_root: Path) -> str | None:
    """Why this checkout cannot export and run an openvino bundle, or None."""
    import importlib.util

    from phi_pipeline.pipeline_spec.targets import get_target

    python = project_root / (get_target("openvino").export_python or "")
    if not python.exists():
        return f"no {python} (make venv TARGET=openvino builds the OpenVINO pass venv)"
    if importlib.util.find_spec("openvino") is None:
        return "the openvino extra is not installed in this venv (make venv TARGET=openvino)"
    return None


def openvino_variant(base: Path, adapter: Path, opts: BenchOptions, work: Path) -> Path | str:
    """The benchmark base with the r8 adapter merged, exported by the openvino target's chain (its pass
    venv), as one variant folder of an openvino bundle; or why not (the rows are then left out)."""
    if opts.device != "cpu":
        return "the openvino rows run on the CPU device, in CPU runs"
    problem = openvino_problem(opts.project_root)
    if problem:
        _say(f"openvino rows skipped: {problem}")
        return problem
    _say("exporting the benchmark base with r8 merged through the openvino target's chain")
    try:
        return merged_bundle(base, adapter, ADAPTER_RANKS[TABLE_ADAPTER], "int4", work, target="openvino")
    except PipelineError as exc:  # rows beside the others: their export failing must not lose the section
        _say(f"openvino rows skipped: {exc}")
        return f"the openvino export failed: {str(exc)[-1500:]}"


def openvino_rows(variant: Path, opts: BenchOptions, scratch: Path) -> list[dict[str, Any]]:
    common = dict(prompt_lens=opts.prompt_lens, new_tokens=opts.new_tokens, reps=opts.reps, device="cpu")
    rows = []
    for hint, config in OPENVINO_CONFIGS.items():
        label = f"openvino-int4-{TABLE_ADAPTER}-merged-{hint.replace(' ', '-')}"
        _say(f"decode {label}")
        cfg = DecodeConfig(label, "openvino", str(variant), session_options=config, **common)
        meta = dict(engine="openvino", precision="int4", adapter=TABLE_ADAPTER, threads="default", layout="merged",
                    inference_precision=hint)
        rows.append(meta | run_config(cfg, scratch))
    return rows


def accuracy_proxies(onnx: dict[str, Path], opts: BenchOptions) -> dict[str, Any]:
    """The int4 export against the reference precision's on random prompts (accuracy.py)."""
    from phi_pipeline.bench.accuracy import compare

    low, reference = PRECISIONS[opts.device]
    _say(f"accuracy proxies: {low} vs {reference}")
    try:
        return compare(onnx[reference], onnx[low], threads=opts.threads)
    except Exception:  # a figure beside the timings: its failure must not lose them
        return {"error": traceback.format_exc()[-4000:]}


def torch_size_key(model_dir: Path) -> str:
    """sizes_bytes key of a Hugging Face folder: pytorch_<dtype>_safetensors."""
    dtype = json.loads((model_dir / "config.json").read_text()).get("dtype", "float32")
    short = {torch_name: name for name, torch_name in TORCH_DTYPES.items()}
    return f"pytorch_{short.get(dtype, dtype)}_safetensors"


def safetensors_bytes(model_dir: Path) -> int:
    """Weights on disk (a large base is saved in shards)."""
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def adapter_costs(
    onnx: dict[str, Path], files: dict[str, dict[str, Path]], peft: dict[str, Path], base: Path, opts: BenchOptions,
    scratch: Path,
) -> dict[str, Any]:
    """Paired (interleaved) adapter measurements per engine and thread setting, and an op profile."""
    short = (opts.prompt_lens[0],)
    common = dict(prompt_lens=short, new_tokens=opts.new_tokens, reps=max(opts.reps, 3), device=opts.device)
    int4 = PRECISIONS[opts.device][0]
    out: dict[str, Any] = {}
    for precision, model in onnx.items():
        # int4 (the shipped precision) at both thread settings; fp32 at the default only, to save time
        for threads in _thread_settings(opts) if precision == int4 else [None]:
            label = f"adapters-onnx-{precision}-t{threads or 'default'}"
            _say(label)
            extra = {"adapters": {n: str(f) for n, f in files[precision].items()}}
            out[label] = run_config(DecodeConfig(label, "onnx", str(model), threads=threads, mode="adapters", extra=extra, **common), scratch)
    _say("adapters-torch")
    extra_torch = {"adapters": {n: str(p / "adapter") for n, p in peft.items()}, "interleave": False}
    label = f"adapters-torch-{TORCH_PRECISION[opts.device]}"
    out[label] = run_config(DecodeConfig(label, "torch", str(base), mode="adapters", extra=extra_torch, **common), scratch)
    for threads in _thread_settings(opts):
        label = f"profile-onnx-{int4}-t{threads or 'default'}"
        _say(label)
        cfg = DecodeConfig(label, "onnx", str(onnx[int4]), adapter=str(files[int4][TABLE_ADAPTER]), threads=threads,
                           mode="profile", **common)
        out[label] = run_config(cfg, scratch)
    return out


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Run every section, write results.json, report.md and the chart; return the results."""
    from phi_pipeline.bench.pipeline_costs import measure_pipeline_costs
    from phi_pipeline.bench.report import write_report

    if opts.size not in SIZES:
        raise ValueError(f"unknown size {opts.size!r}; choose from {', '.join(SIZES)}")
    start = time.perf_counter()
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "machine": machine(),
    }
    if opts.device == "cuda" and not _cuda_available():
        results["skipped"] = "--device cuda: no CUDA device or no CUDA build of torch / onnxruntime-genai here"
        _say(results["skipped"])
    else:
        bandwidth = _section("memory bandwidth", lambda: roofline.bandwidths(opts.device, opts.threads, max(opts.reps, 3)))
        results["bandwidth"] = bandwidth
        best = max((v for v in bandwidth.values() if isinstance(v, dict) and "gb_per_s" in v),
                   key=lambda b: b["gb_per_s"]["median"])
        results["given_bundle"] = _section(f"given bundle {opts.bundle}", lambda: bench_given_bundle(opts))
        results["benchmark_model"] = _section(f"benchmark model {opts.size}", lambda: bench_model(opts, best))
        bundles = results["benchmark_model"].get("bundles")
        if bundles:
            results["serving"] = _section("serving", lambda: bench_serving(
                Path(bundles[PRECISIONS[opts.device][0]]), opts.work_dir / opts.size / "runs" / "serving",
                threads=_thread_settings(opts)[-1], prompt_len=opts.prompt_lens[0], new_tokens=opts.new_tokens,
                reps=opts.reps, rounds=opts.reps))
        if opts.peer:
            from phi_pipeline.bench.peer import bench_peer

            results["peer"] = _section(f"peer {opts.peer}", lambda: bench_peer(opts, _say))
            results["peer_more"] = {
                size: _section(f"peer {opts.peer} on {size}", lambda size=size: bench_peer(replace(opts, size=size), _say))
                for size in opts.peer_sizes if size != opts.size
            }
        if opts.pipeline_reps > 0 and opts.device == "cpu":
            results["pipeline_costs"] = _section("pipeline costs", lambda: measure_pipeline_costs(
                opts.project_root.resolve(), opts.work_dir.resolve() / "pipeline", reps=opts.pipeline_reps))
    results["machine"]["load_average_end"] = load_average()
    results["wall_s"] = round(time.perf_counter() - start, 1)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    (opts.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, opts.out_dir)
    _say(f"wrote {opts.out_dir / 'results.json'} and {opts.out_dir / 'report.md'} in {results['wall_s']} s")
    return results


def _cuda_available() -> bool:
    try:
        import onnxruntime_genai as og
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and og.is_cuda_available()
