"""Decode speed of one configuration, in its own subprocess.

A configuration is an engine (PyTorch eager + PEFT, or ONNX Runtime GenAI on a bundle), an
optional adapter and a thread setting. Each runs in a fresh Python process so that its peak
resident memory (VmHWM of that process, imports included) is its own: that is what a user's
process costs.

Timings: time to first token (TTFT) runs from the start of a request (generator creation, adapter
activation, prefill, first token) to the first new token; decode tokens/s counts the tokens after
the first over the time after it. Generation is greedy and forced to exactly `new_tokens` tokens
(min length = max length), prompts are random token ids, batch size 1.

    python -m phi_pipeline.bench.decode CONFIG.json RESULT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal


from phi_pipeline.evaluate.speed import Timing, random_prompt, time_request, timing
from phi_pipeline.evaluate.stats import load_average, summary

# PyTorch eager as a user runs it: fp32 on CPU (fp16 matmuls are slow there), fp16 on a GPU.
TORCH_PRECISION = {"cpu": "fp32", "cuda": "fp16"}
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
WARMUP = (16, 8)  # prompt tokens, new tokens of the untimed first request (allocations, lazy init)


@dataclass(frozen=True)
class DecodeConfig:
    label: str
    engine: Literal["torch", "onnx", "openvino"]
    model: str
    """torch: Hugging Face model folder; onnx: ONNX Runtime GenAI folder (a bundle); openvino: a merged
    openvino bundle's variant folder (its encapsulated IR)."""
    adapter: str | None = None
    """torch: PEFT adapter folder; onnx: .onnx_adapter file; None: the base model."""
    threads: int | None = None
    """onnx: intra_op_num_threads of the decoder session (None: onnxruntime-genai's default);
    torch: torch.set_num_threads (None: torch's default, the physical core count)."""
    prompt_lens: tuple[int, ...] = (64, 512)
    new_tokens: int = 128
    reps: int = 3
    device: Literal["cpu", "cuda"] = "cpu"
    mode: Literal["decode", "adapters", "profile"] = "decode"
    """decode: the main table; adapters: adapter load, switch and slowdown; profile: time per
    operator with and without an adapter (both in adapter_costs.py)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Mode-specific settings (adapter_costs.py)."""
    session_options: dict[str, Any] = field(default_factory=dict)
    """onnx: decoder session options laid over the model's genai_config.json (tuning.py's variants);
    openvino: the CPU plugin's compile properties (empty: the plugin's defaults)."""


class OnnxRunner:
    """An ONNX Runtime GenAI model loaded and run through phi_pipeline.runtime.genai, as every command runs it."""

    def __init__(
        self, model_dir: str, threads: int | None, device: str = "cpu", session_options: dict[str, Any] | None = None
    ):
        from phi_pipeline.runtime.genai import GenaiModel

        self.runtime = GenaiModel(model_dir, threads=threads, provider="cuda" if device == "cuda" else None,
                                  session_options=session_options)
        self.model, self.adapters = self.runtime.model, self.runtime.adapters
        self.vocab_size, self.context_length = self.runtime.vocab_size, self.runtime.context_length

    def load_adapter(self, path: str, name: str) -> float:
        start = time.perf_counter()
        self.adapters.load(path, name)
        return time.perf_counter() - start

    def unload_adapter(self, name: str) -> None:
        self.adapters.unload(name)

    def time_switch(self, name: str) -> float:
        """Seconds to make `name` the active adapter of a new request (adapters are per generator)."""
        generator = self.runtime.start([], None, 8).generator
        start = time.perf_counter()
        generator.set_active_adapter(self.adapters, name)
        return time.perf_counter() - start

    def generate(self, ids: list[int], new_tokens: int, adapter: str | None) -> Timing:
        return time_request(self.runtime, ids, new_tokens, adapter)


class _Clock:
    """A generate() streamer that only records when each piece arrives (the prompt first)."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def put(self, value: Any) -> None:
        self.times.append((time.perf_counter(), time.process_time()))

    def end(self) -> None:
        pass


class TorchRunner:
    """transformers eager in TORCH_PRECISION[device], with PEFT for adapters (unmerged LoRA):
    the baseline a user has."""

    def __init__(self, model_dir: str, threads: int | None, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, TORCH_DTYPES[TORCH_PRECISION[device]])).to(device).eval()
        self.model: Any = self.base
        self.vocab_size = self.base.config.vocab_size
        self.context_length = self.base.config.max_position_embeddings

    def load_adapter(self, path: str, name: str) -> float:
        from peft import PeftModel

        start = time.perf_counter()
        if self.model is self.base:
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
        else:
            self.model.load_adapter(path, adapter_name=name)
        self._sync()
        return time.perf_counter() - start

    def unload_adapter(self, name: str) -> None:
        self.model.delete_adapter(name)

    def time_switch(self, name: str) -> float:
        """Seconds for PEFT's set_adapter (adapters are switched on the shared model)."""
        start = time.perf_counter()
        self.model.set_adapter(name)
        self._sync()
        return time.perf_counter() - start

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def generate(self, ids: list[int], new_tokens: int, adapter: str | None) -> Timing:
        torch = self.torch
        clock = _Clock()
        start = time.perf_counter()
        input_ids = torch.tensor([ids], device=self.device)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=clock,
        )
        with torch.inference_mode():
            if adapter is None and self.model is not self.base:
                with self.model.disable_adapter():
                    out = self.model.generate(**kwargs)
            else:
                if adapter is not None:
                    self.model.set_adapter(adapter)
                out = self.model.generate(**kwargs)
        self._sync()
        produced = out.shape[1] - len(ids)
        if produced != new_tokens:
            raise RuntimeError(f"generated {produced} tokens, expected {new_tokens}")
        return timing(start, clock.times[1], clock.times[-1], produced)


class OpenVinoRunner:
    """A merged openvino bundle variant on OpenVINO's CPU device, through target_runtime.OpenVINOModel
    (what the openvino gates run). Adapters are merged into the weights: none to load."""

    def __init__(self, model_dir: str, threads: int | None, compile_config: dict[str, str]):
        from phi_pipeline.runtime.target_models import OpenVINOModel

        config = dict(compile_config) | ({"INFERENCE_NUM_THREADS": str(threads)} if threads else {})
        self.model = OpenVINOModel(Path(model_dir), config)
        self.vocab_size, self.context_length = self.model.vocab, self.model.context_length

    def generate(self, ids: list[int], new_tokens: int, adapter: str | None) -> Timing:
        if adapter is not None:
            raise ValueError("an openvino bundle variant has its adapter merged in; it loads none")
        start = time.perf_counter()
        tokens = self.model.stream(ids, new_tokens, stop_at_eos=False)
        next(tokens)
        first = time.perf_counter(), time.process_time()
        produced = 1 + sum(1 for _ in tokens)
        last = time.perf_counter(), time.process_time()
        return timing(start, first, last, produced)


def make_runner(config: DecodeConfig) -> OnnxRunner | TorchRunner | OpenVinoRunner:
    if config.engine == "onnx":
        return OnnxRunner(config.model, config.threads, config.device, config.session_options)
    if config.engine == "openvino":
        return OpenVinoRunner(config.model, config.threads, config.session_options)
    return TorchRunner(config.model, config.threads, config.device)


def adapter_name(config: DecodeConfig) -> str | None:
    return Path(config.adapter).name.split(".")[0] if config.adapter else None


def measure_decode(config: DecodeConfig) -> dict[str, Any]:
    """Load the model (and adapter), warm up once, then `reps` requests per prompt length."""
    gpu_before = gpu_memory_used_bytes() if config.device == "cuda" else None
    start = time.perf_counter()
    runner = make_runner(config)
    load_s = time.perf_counter() - start
    name = adapter_name(config)
    adapter_load_s = runner.load_adapter(config.adapter, name) if config.adapter else None
    runner.generate(random_prompt(WARMUP[0], runner.vocab_size), WARMUP[1], name)
    prompts: dict[str, Any] = {}
    for length in config.prompt_lens:
        if length + config.new_tokens > runner.context_length:
            prompts[str(length)] = {"skipped": f"{length} + {config.new_tokens} tokens exceed the model's context "
                                               f"length {runner.context_length}"}
            continue
        ids = random_prompt(length, runner.vocab_size)
        runs = [runner.generate(ids, config.new_tokens, name) for _ in range(config.reps)]
        prompts[str(length)] = {
            "ttft_s": summary([r.ttft_s for r in runs]),
            "decode_tok_s": summary([r.decode_tok_s for r in runs], digits=2),
            "decode_cpu_ms": summary([r.decode_cpu_ms for r in runs], digits=3),
        }
    result = {
        "load_s": round(load_s, 3),
        "adapter_load_s": round(adapter_load_s, 4) if adapter_load_s is not None else None,
        "threads_effective": _effective_threads(config),
        "prompts": prompts,
    }
    if gpu_before is not None:  # read while the model is alive: freeing it returns its memory
        after = gpu_memory_used_bytes()
        result["gpu_memory_bytes"] = after - gpu_before if after is not None else None
    return result


def _effective_threads(config: DecodeConfig) -> int | str:
    if config.engine == "torch":
        import torch

        return torch.get_num_threads()
    return config.threads or f"{'OpenVINO' if config.engine == 'openvino' else 'onnxruntime-genai'} default"


def peak_rss_bytes() -> int | None:
    """This process's resident-memory high-water mark (VmHWM), or None where /proc is missing.

    Not ru_maxrss: Linux carries the pre-exec high-water mark (the forked parent's) into it.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return kib * 1024 if kib is not None else None


def gpu_memory_used_bytes() -> int | None:
    """Memory in use on GPU 0 (nvidia-smi): read before loading and after the last request, the
    difference is what the loaded model and its runtime hold (both pool their peak allocations)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return int(out.split()[0]) * (1 << 20)


def run_config(config: DecodeConfig, scratch: Path) -> dict[str, Any]:
    """Run `config` in a fresh subprocess; its result (with its own peak RSS) and wall time.

    A failure is returned as {"error": ...} so one broken configuration does not lose the rest.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    cfg_path, out_path = scratch / f"{config.label}.config.json", scratch / f"{config.label}.result.json"
    cfg_path.write_text(json.dumps(asdict(config)))
    out_path.unlink(missing_ok=True)
    log_path = scratch / f"{config.label}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "phi_pipeline.bench.worker", str(cfg_path), str(out_path)],
            stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"},
        )
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out_path.exists():
        tail = log_path.read_text()[-2000:]
        return {"label": config.label, "error": f"exit code {proc.returncode}; log {log_path}:\n{tail}"}
    result = json.loads(out_path.read_text())
    result.update(label=config.label, process_wall_s=round(wall, 2), load_average=load_average())
    return result
