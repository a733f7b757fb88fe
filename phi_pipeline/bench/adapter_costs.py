"""What an adapter costs at run time, measured inside one process so comparisons are paired.

- load: seconds to load an adapter file into a loaded model (first load, then unload/reload), and
  the first-token latency of the first request that uses it;
- switch: seconds to make another adapter active, and the first-token latency right after a
  switch vs with the adapter of the previous request;
- slowdown: decode tokens/s with no adapter and with each adapter on one session, requests
  interleaved round-robin so that load from other processes hits every variant alike (other graphs,
  such as the merged or unpacked exports, are not measured here: a second session's idle intra-op
  threads spin beside the one running; the peer's tuning table runs each in its own process);
- profile: onnxruntime's per-operator times for one request with and without an adapter, to
  show where the slowdown goes.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from phi_pipeline.bench.decode import DecodeConfig, OnnxRunner, make_runner
from phi_pipeline.evaluate.speed import Timing, random_prompt
from phi_pipeline.evaluate.stats import summary

SWITCH_NEW_TOKENS = 2  # enough to time the first token


def _load_times(runner: Any, adapters: dict[str, str], ids: list[int], reps: int) -> dict[str, Any]:
    """Load (and reload) seconds, and the first request's TTFT right after a load: onnxruntime-genai
    may defer work to the adapter's first use, which a load time alone would hide."""
    first = {name: runner.load_adapter(path, name) for name, path in adapters.items()}
    again: dict[str, list[float]] = {name: [] for name in adapters}
    first_use: dict[str, list[float]] = {name: [] for name in adapters}
    for _ in range(reps):
        for name, path in adapters.items():
            runner.unload_adapter(name)
            again[name].append(runner.load_adapter(path, name))
            first_use[name].append(runner.generate(ids, SWITCH_NEW_TOKENS, name).ttft_s)
    return {
        name: {
            "first_s": round(first[name], 5),
            "reload_s": summary(again[name], digits=5),
            "ttft_first_use_s": summary(first_use[name]),
        }
        for name in adapters
    }


def _switch_times(runner: Any, names: list[str], ids: list[int], reps: int) -> dict[str, Any]:
    calls = [runner.time_switch(names[i % len(names)]) for i in range(2 * reps * len(names))]
    runner.generate(ids, SWITCH_NEW_TOKENS, names[-1])  # the next request switches
    switched: list[float] = []
    same: list[float] = []
    for _ in range(reps):
        for name in names:
            switched.append(runner.generate(ids, SWITCH_NEW_TOKENS, name).ttft_s)
            same.append(runner.generate(ids, SWITCH_NEW_TOKENS, name).ttft_s)
    return {
        "set_active_s": summary(calls, digits=8),
        "ttft_after_switch_s": summary(switched),
        "ttft_same_adapter_s": summary(same),
    }


def _interleaved(variants: list[tuple[str, Any, str | None]], ids: list[int], new_tokens: int, reps: int) -> dict:
    runs: dict[str, list[Timing]] = {label: [] for label, _, _ in variants}
    for label, runner, adapter in variants:  # warm-up: first request of each variant is untimed
        runner.generate(ids[:16], 8, adapter)
    for _ in range(reps):
        for label, runner, adapter in variants:
            runs[label].append(runner.generate(ids, new_tokens, adapter))
    base = [t.decode_tok_s for t in runs["none"]]
    base_cpu = [t.decode_cpu_ms for t in runs["none"]]
    out = {}
    for label, timings in runs.items():
        tok = [t.decode_tok_s for t in timings]
        cpu = [t.decode_cpu_ms for t in timings]
        out[label] = {
            "decode_tok_s": summary(tok, digits=2),
            "decode_cpu_ms": summary(cpu, digits=3),
            "ttft_s": summary([t.ttft_s for t in timings]),
            # paired: request i of this variant against request i with no adapter (same round)
            "decode_slowdown_vs_none": summary([1 - a / b for a, b in zip(tok, base)]),
            "decode_cpu_increase_vs_none": summary([a / b - 1 for a, b in zip(cpu, base_cpu)]),
        }
    return out


def measure_adapters(config: DecodeConfig) -> dict[str, Any]:
    """extra: adapters {name: path}; interleave: False skips the slowdown rounds."""
    adapters: dict[str, str] = config.extra["adapters"]
    runner = make_runner(config)
    ids = random_prompt(config.prompt_lens[0], runner.vocab_size)
    result: dict[str, Any] = {"load": _load_times(runner, adapters, ids, config.reps)}
    result["switch"] = _switch_times(runner, list(adapters), ids, config.reps)
    if config.extra.get("interleave", True):
        variants: list[tuple[str, Any, str | None]] = [("none", runner, None)]
        variants += [(name, runner, name) for name in adapters]
        result["slowdown"] = {
            str(length): _interleaved(variants, random_prompt(length, runner.vocab_size), config.new_tokens, config.reps)
            for length in config.prompt_lens
        }
    return result


def _op_group(node: str, op: str) -> str:
    return "LoRA (MatMul/Add on lora_A, lora_B)" if "lora" in node.lower() else op


def profile_ops(config: DecodeConfig) -> dict[str, Any]:
    """Kernel time per decode step by operator type (LoRA nodes apart), no adapter vs the adapter.

    Each variant gets its own session with onnxruntime profiling on (the trace is written when the
    session ends): a warm-up request, then one of prompt_lens[0] + new_tokens whose decode steps
    (every model run after its prefill) are the ones counted; its prefill (the model run before them,
    which the first token waits for) is aggregated apart under `prefill`.
    """
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, adapter in (("none", None), ("adapter", config.adapter)):
            prefix = str(Path(tmp) / variant)
            runner = OnnxRunner(config.model, config.threads, config.device, {"enable_profiling": prefix})
            name = None
            if adapter:
                name = "profiled"
                runner.load_adapter(adapter, name)
            ids = random_prompt(config.prompt_lens[0], runner.vocab_size)
            runner.generate(ids[:16], 8, name)
            runner.generate(ids, config.new_tokens, name)
            del runner  # ends the session: onnxruntime writes the trace
            trace = next(Path(tmp).glob(f"{variant}*.json"))
            events = json.loads(trace.read_text())
            out[variant] = _aggregate(events, config.new_tokens - 1)
            out[variant]["prefill"] = {"prompt_tokens": len(ids),
                                       **_kernel_times(events, _model_runs(events)[-config.new_tokens:][:1])}
    return out


def _model_runs(events: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(start, end) microseconds of each model run in a trace, in order."""
    return sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")


def _kernel_times(events: list[dict[str, Any]], runs: list[tuple[float, float]]) -> dict[str, Any]:
    """Node kernel times inside the given consecutive model runs, per run, by operator (LoRA nodes apart)."""
    micros: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    first, last = runs[0][0], runs[-1][1]  # kernels run only inside model runs: the span holds exactly theirs
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and first <= e["ts"] <= last:
            group = _op_group(e["name"], e.get("args", {}).get("op_name", "?"))
            micros[group] += e.get("dur", 0)
            calls[group] += 1
    total = sum(micros.values())
    n = len(runs)
    return {
        "run_ms_per_step": round(sum(end - b for b, end in runs) / 1000 / n, 4),
        "kernel_ms_per_step": round(total / 1000 / n, 4),
        "by_op": {
            g: {"ms_per_step": round(us / 1000 / n, 4), "share": round(us / total, 4), "calls_per_step": round(calls[g] / n, 1)}
            for g, us in sorted(micros.items(), key=lambda kv: -kv[1])
        },
    }


def _aggregate(events: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Node kernel times inside the last `steps` model runs of a trace, per run."""
    return {"decode_steps": steps, **_kernel_times(events, _model_runs(events)[-steps:])}


MODES: dict[str, Callable[[DecodeConfig], dict[str, Any]]] = {"adapters": measure_adapters, "profile": profile_ops}
