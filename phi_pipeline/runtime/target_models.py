"""Run a bundle on its target's own runtime for evaluation, and decide whether this machine can.

The evaluation asks two things here:
- `missing_eval_device(target)`: None when this machine can run the target's evaluation runtime, else why
  not (a CUDA bundle on a build host without a GPU). `keep_unevaluated` then keeps the staged bundle and
  `DeviceNeeded` says where it is, which device its gates need and the commands that finish the job.
- `load(bundle, variant)`: a `TargetModel` on the runtime that target.eval_runtime names (targets.py):
  greedy ids from prompt ids, logits of a sequence, and `describe()` (runtime, provider, device,
  cpu_fallback, simulated) for eval.json and report.md.

onnxruntime-genai bundles (cpu, cuda, webgpu, dml) keep going through runtime.BundleModel; this module adds
the runtimes onnxruntime-genai cannot stand in for on a build machine: OpenVINO (its CPU device runs the IR an
Intel NPU runs) and the QNN HTP backend's x86-64 simulator. No torch import; runtimes import lazily.
"""

from __future__ import annotations

import ctypes
import functools
import json
import platform
import shlex
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

import numpy as np

from phi_pipeline.bundle.layout import MANIFEST, variant_dir
from phi_pipeline.errors import PipelineError, UsageError
from phi_pipeline.pipeline_spec.targets import Target, get_target

if TYPE_CHECKING:
    from phi_pipeline.pipeline_spec.plan import Plan

# The folder under a run's folder where a bundle whose gates cannot run here is kept.
UNEVALUATED_DIR = "unevaluated-bundle"
_CUDA_SUCCESS = 0


class DeviceNeeded(PipelineError):
    """The staged bundle is built and kept, but its gates need a device this machine lacks (exit code 1)."""


@dataclass(frozen=True)
class RuntimeDescription:
    """What actually ran an evaluation: recorded so a CPU-fallback figure is never taken for the target's own."""

    runtime: str
    """Runtime package and version, e.g. `openvino 2026.4.1`."""
    provider: str
    """Execution provider or plugin that ran the graph, e.g. `OpenVINO CPU device`."""
    device: str
    """The device the figures come from, e.g. `cpu`, `npu (simulated on x86-64)`."""
    cpu_fallback: bool
    """True when the target's own provider did not run and the same graph ran on CPU kernels instead."""
    simulated: bool = False
    """True when the target's accelerator was simulated on this host (QNN HTP simulator)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def genai_description(execution_provider: str, cpu_fallback: bool) -> RuntimeDescription:
    """What ran an onnxruntime-genai bundle (runtime.BundleModel): its provider, or the CPU one in its place."""
    import onnxruntime_genai as og

    return RuntimeDescription(
        runtime=f"onnxruntime-genai {og.__version__}",
        provider="CPUExecutionProvider" if cpu_fallback else execution_provider,
        device="cpu" if cpu_fallback or execution_provider == "CPUExecutionProvider" else "gpu",
        cpu_fallback=cpu_fallback,
    )


class TargetModel(Protocol):
    """One bundle variant loaded on a target runtime: what the evaluation needs from it."""

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of `prompt_ids` (the new ids only, EOS included if produced)."""
        ...

    def logits(self, ids: Sequence[int]) -> np.ndarray | None:
        """Next-token logits at every position of `ids` ([len(ids), vocab]); None if the runtime gives none."""
        ...

    def describe(self) -> RuntimeDescription: ...


# ---------------------------------------------------------------------------------------------- devices


def cuda_device_problem() -> str | None:
    """None when a CUDA device answers through the driver API, else what is missing.

    onnxruntime-gpu lists CUDAExecutionProvider as available with or without a GPU, and the CUDA build of
    onnxruntime-genai then fails inside og.Model; the driver library and a device are the real test.
    """
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver on this machine (libcuda.so.1 cannot be loaded)"
    rc = cuda.cuInit(0)
    if rc != _CUDA_SUCCESS:
        return f"the CUDA driver found no usable device (cuInit returned {rc})"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != _CUDA_SUCCESS or count.value < 1:
        return "the CUDA driver reports no device"
    return None


_DEVICE_CHECKS = {"cuda": cuda_device_problem}


def missing_eval_device(target: Target) -> str | None:
    """Why this machine cannot run `target`'s evaluation runtime, or None when it can."""
    check = _DEVICE_CHECKS.get(target.eval_device_required or "")
    return check() if check else None


def keep_unevaluated(plan: "Plan", staged: Path, reason: str, spec_path: str) -> DeviceNeeded:
    """Move the staged bundle to the run folder (the run's cleanup leaves it there) and return the error
    that tells the user how to finish: gates on the device, or publish without them."""
    kept = plan.paths.run_dir / UNEVALUATED_DIR
    shutil.rmtree(kept, ignore_errors=True)
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staged), kept)
    device = plan.target.eval_device_required
    return DeviceNeeded(
        f"the {plan.target.name} bundle is built and verified, but its publish gates need a {device} device: "
        f"{reason}.\n"
        f"  staged bundle: {kept}\n"
        f"  on a machine with a {device} device (same project folder, for the eval splits and the base model): "
        f"phi-pipeline eval {shlex.quote(kept.as_posix())}\n"
        f"  or publish here without the gates (recorded in manifest.json): "
        f"phi-pipeline run {shlex.quote(spec_path)} --target {plan.target.name} --no-gate"
    )


def skipped_gates(target: Target, reason: str) -> dict[str, Any]:
    """manifest.json's `gates` for a bundle published with --no-gate where its gates could not run."""
    return {
        "enforced": False,
        "passed": None,
        "failures": [],
        "skipped": f"not evaluated: {reason}; its gates need a {target.eval_device_required} device",
    }


# ---------------------------------------------------------------------------------------------- runtimes


def _manifest(bundle: Path) -> dict[str, Any]:
    try:
        return json.loads((bundle / MANIFEST).read_text())
    except FileNotFoundError:
        raise UsageError(str(bundle), [f"no {MANIFEST} here; give a folder published by phi-pipeline run"]) from None


def _variant_folder(bundle: Path, manifest: dict[str, Any], variant: str) -> Path:
    names = [a["name"] for a in manifest["adapters"]]
    if variant not in names:
        raise UsageError(str(bundle), [f"no adapter {variant!r}; this bundle has {', '.join(names)}"])
    return bundle / variant_dir(variant)


def load(bundle: Path, variant: str) -> TargetModel:
    """One variant (adapter) of a merged NPU bundle on its target's evaluation runtime."""
    bundle = Path(bundle)
    manifest = _manifest(bundle)
    target = get_target(manifest["target"])
    loader = _LOADERS.get(target.eval_runtime)
    if loader is None:
        raise UsageError(
            str(bundle), [f"target {target.name!r} evaluates through onnxruntime-genai (runtime.BundleModel), not here"]
        )
    return loader(_variant_folder(bundle, manifest, variant))


def _genai_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "genai_config.json").read_text())


def _eos_ids(folder: Path) -> set[int]:
    eos = _genai_config(folder)["model"]["eos_token_id"]
    return {int(t) for t in (eos if isinstance(eos, list) else [eos])}


def _context_file(folder: Path) -> Path:
    """The OpenVINO IR an encapsulated model wraps: the EPContext node's `ep_cache_context` (OVEP's
    embed_mode 0 names the .xml next to the .onnx); the same file OVEP would compile for the NPU."""
    import onnx

    model_file = folder / _genai_config(folder)["model"]["decoder"]["filename"]
    graph = onnx.load(model_file, load_external_data=False).graph
    for node in graph.node:
        if node.op_type == "EPContext":
            attrs = {a.name: a for a in node.attribute}
            return folder / attrs["ep_cache_context"].s.decode()
    raise PipelineError(f"{model_file}: no EPContext node; not an OpenVINO-encapsulated model")


class OpenVINOModel:
    """An OpenVINO-encapsulated bundle variant on OpenVINO's CPU device.

    optimum-intel exports a stateful decoder (the KV cache lives in the infer request's state), so a
    sequence is fed once and each greedy step feeds one token; logits come back for every fed position.
    """

    DEVICE = "CPU"
    # f32 inference: the CPU plugin's default bf16/f16 hint on some CPUs would blur parity with PyTorch
    EVAL_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}

    def __init__(self, folder: Path, compile_config: dict[str, str] | None = None):
        """`compile_config`: OpenVINO CPU plugin properties (default: EVAL_CONFIG; the bench also runs the
        plugin's own defaults)."""
        import openvino as ov

        self.folder = folder
        self.eos = _eos_ids(folder)
        self.version = ov.get_version().split("-")[0]
        model = _genai_config(folder)["model"]
        self.vocab, self.context_length = int(model["vocab_size"]), int(model["context_length"])
        config = self.EVAL_CONFIG if compile_config is None else compile_config
        compiled = ov.Core().compile_model(str(_context_file(folder)), self.DEVICE, config)
        self.inputs = {name for port in compiled.inputs for name in port.get_names()}
        self.request = compiled.create_infer_request()

    def _feed(self, ids: Sequence[int], start: int) -> np.ndarray:
        n = len(ids)
        feed: dict[str, np.ndarray] = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, start + n), dtype=np.int64),
        }
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None]
        if "beam_idx" in self.inputs:
            feed["beam_idx"] = np.zeros(1, dtype=np.int32)
        self.request.infer(feed)
        return np.array(self.request.get_tensor("logits").data[0], dtype=np.float32)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        self.request.reset_state()
        return self._feed(list(ids), 0)

    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, stop_at_eos: bool = True) -> Iterator[int]:
        """Greedy new tokens as each is chosen (the bench times them); the first after the prompt's prefill."""
        self.request.reset_state()
        logits = self._feed(list(prompt_ids), 0)
        for i in range(max_new_tokens):
            token = int(np.argmax(logits[-1]))
            yield token
            if (stop_at_eos and token in self.eos) or i + 1 == max_new_tokens:
                return
            logits = self._feed([token], len(prompt_ids) + i)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        return list(self.stream(prompt_ids, max_new_tokens))

    def describe(self) -> RuntimeDescription:
        return RuntimeDescription(
            runtime=f"openvino {self.version}",
            provider=f"OpenVINO {self.DEVICE} device (the encapsulated IR {_context_file(self.folder).name})",
            device="cpu (the bundle targets the Intel NPU)",
            cpu_fallback=False,
        )


class QnnHtpModel:
    """A QNN bundle variant run component by component with onnxruntime and the onnxruntime-qnn plugin EP.

    The variant is Olive's StaticLLM pipeline (genai_config.json's `pipeline`): embeddings and LM head on
    the CPU EP, a prompt graph of W token slots and a one-token iterator graph, each wrapping HTP context
    binaries (on x86-64 the wheel's libQnnHtp.so runs them in simulation) around GroupQueryAttention nodes on
    the CPU EP, and a KV cache of the model's context length that both graphs read and write in place.
    onnxruntime-genai 0.18's pipeline model runs the same graphs but aborts here in a corrupted heap
    (malloc_consolidate) after its first window, so this driver feeds them directly: the prompt's first W
    tokens through the prompt graph (right padded; see qnn_graph.py), each later token through the iterator.
    """

    _registered = False
    EP = "QNN"  # the name the plugin library is registered under in this process

    def __init__(self, folder: Path):
        import onnxruntime as ort
        import onnxruntime_qnn

        from phi_pipeline.bundle.qnn_graph import is_prompt_graph

        if not QnnHtpModel._registered:  # once per process: onnxruntime refuses a second registration
            ort.register_execution_provider_library(self.EP, onnxruntime_qnn.get_library_path())
            QnnHtpModel._registered = True
        self.ort, self.version = ort, onnxruntime_qnn.__version__
        self.folder, self.eos = folder, _eos_ids(folder)
        model = _genai_config(folder)["model"]
        decoder = model["decoder"]
        self.vocab, self.context_length = int(model["vocab_size"]), int(model["context_length"])
        self.window = int(decoder["sliding_window"]["window_size"])
        self.pad = int(decoder["sliding_window"].get("pad_value", 0))
        names = decoder["inputs"] | decoder["outputs"]
        self.past_len_name, self.total_name = names["past_sequence_length"], names["total_sequence_length"]
        layers = int(decoder["num_hidden_layers"])
        self.kv_names = [(names[f"past_{kind}_names"] % i, names[f"present_{kind}_names"] % i)
                         for i in range(layers) for kind in ("key", "value")]
        self.kv_shape = (1, int(decoder["num_key_value_heads"]), self.context_length, int(decoder["head_size"]))
        components = {name: c for stage in decoder["pipeline"] for name, c in stage.items()}
        role = {"embeddings": lambda c: c["inputs"] == [names["input_ids"]], "lm_head": lambda c: c.get("is_lm_head"),
                "prompt": is_prompt_graph, "iterator": lambda c: c.get("run_on_prompt") is False}
        self.parts = {r: next(c for c in components.values() if test(c)) for r, test in role.items()}
        self.sessions = {r: self._session(c) for r, c in self.parts.items()}

    def _session(self, component: dict[str, Any]) -> Any:
        """A session for one pipeline component: on the QNN EP (HTP backend) where genai_config.json gives it
        QNN provider options, else on the CPU EP, as onnxruntime-genai places them."""
        ort = self.ort
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the plugin's warnings about Windows-only features, once per session
        qnn = [p["qnn"] for p in component.get("session_options", {}).get("provider_options", []) if "qnn" in p]
        if qnn:
            import onnxruntime_qnn

            devices = [d for d in ort.get_ep_devices() if d.ep_name == self.EP]
            backend = str(Path(onnxruntime_qnn.__file__).parent / "libQnnHtp.so")
            options.add_provider_for_devices(devices, {**qnn[0], "backend_path": backend})
        return ort.InferenceSession(str(self.folder / component["filename"]), options)

    def _run(self, role: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        part = self.parts[role]
        outputs = self.sessions[role].run(part["outputs"], {k: feed[k] for k in part["inputs"]})
        return dict(zip(part["outputs"], outputs))

    def _step(self, role: str, ids: list[int], start: int, kv: dict[str, np.ndarray]) -> np.ndarray:
        """Feed `ids` at positions start.. through the prompt graph (padded to its window) or the iterator
        (one id); the KV cache is updated in `kv`; returns the logits of the fed positions."""
        slots = self.window if role == "prompt" else 1
        padded = np.full((1, slots), self.pad, dtype=np.int64)
        padded[0, : len(ids)] = ids
        feed = dict(kv) | self._run("embeddings", {self.parts["embeddings"]["inputs"][0]: padded})
        total = start + len(ids)
        feed |= {self.past_len_name: np.array([[total - 1]], dtype=np.int32), self.total_name: np.array(total, dtype=np.int32)}
        out = self._run(role, feed)
        for past, present in self.kv_names:
            kv[past] = out[present]
        hidden = self.parts["lm_head"]["inputs"][0]
        logits = self._run("lm_head", {hidden: out[hidden]})[self.parts["lm_head"]["outputs"][0]]
        return np.asarray(logits, dtype=np.float32).reshape(-1, self.vocab)[: len(ids)]

    def _new_cache(self) -> dict[str, np.ndarray]:
        return {past: np.zeros(self.kv_shape, dtype=np.float32) for past, _ in self.kv_names}

    def _feed(self, ids: Sequence[int], kv: dict[str, np.ndarray]) -> np.ndarray:
        """Logits of every position of a sequence fed from an empty cache."""
        ids = [int(t) for t in ids]
        if len(ids) > self.context_length:
            raise RuntimeError(f"{len(ids)} tokens exceed the model's context length {self.context_length}")
        rows = [self._step("prompt", ids[: self.window], 0, kv)]
        rows += [self._step("iterator", [t], p, kv) for p, t in enumerate(ids[self.window:], start=self.window)]
        return np.concatenate(rows)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        kv = self._new_cache()
        logits = self._feed(prompt_ids, kv)[-1]
        new: list[int] = []
        for position in range(len(prompt_ids), min(len(prompt_ids) + max_new_tokens, self.context_length)):
            token = int(np.argmax(logits))
            new.append(token)
            if token in self.eos or len(new) == max_new_tokens:
                break
            logits = self._step("iterator", [token], position, kv)[-1]
        return new

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return self._feed(ids, self._new_cache())

    def describe(self) -> RuntimeDescription:
        simulated = platform.machine().lower() not in ("arm64", "aarch64")  # on a Snapdragon the HTP itself
        return RuntimeDescription(
            runtime=f"onnxruntime {self.ort.__version__} + onnxruntime-qnn {self.version} (the variant's pipeline "
                    "graphs fed by phi-pipeline: onnxruntime-genai 0.18 aborts on them on x86-64)",
            provider="QNNExecutionProvider, HTP backend (libQnnHtp.so); GroupQueryAttention, embeddings, LM head on CPU EP",
            device=f"npu (Hexagon HTP{f' simulated on {platform.machine()}' if simulated else ''})",
            cpu_fallback=False,
            simulated=simulated,
        )


_LOADERS = {"openvino": OpenVINOModel, "qnn-htp-simulator": QnnHtpModel}


# ---------------------------------------------------------------------------------------------- evaluation


class _Tokenizer:
    """The bundle's tokenizer.json through Hugging Face `tokenizers`, with onnxruntime-genai's Tokenizer
    calls (encode without special tokens, decode, pad and EOS ids): a runtime without a genai model has none."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        model = _genai_config(folder)["model"]
        self.eos_token_ids = sorted(_eos_ids(folder))
        self.pad_token_id = int(model.get("pad_token_id", self.eos_token_ids[0]))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(t) for t in ids], skip_special_tokens=True)


class _MergedVariant:
    """What the evaluation reads from a bundle model (runtime.BundleModel's tokenizer and prompt_for)
    for one merged variant on a target runtime."""

    def __init__(self, bundle: Path, variant: str):
        manifest = _manifest(bundle)
        self.folder = _variant_folder(bundle, manifest, variant)
        self.tokenizer = _Tokenizer(self.folder)
        self.format = next(a["prompt_format"] for a in manifest["adapters"] if a["name"] == variant)

    def prompt_for(self, example_prompt: str | list[dict[str, str]], adapter: str | None) -> str:
        if isinstance(example_prompt, list):
            # the folder's chat template, rendered by transformers as onnxruntime-genai's apply_chat_template does
            return self._chat.apply_chat_template(example_prompt, tokenize=False, add_generation_prompt=True)
        bos = self.format.get("bos")
        return f"{bos} {example_prompt}" if bos else example_prompt

    @functools.cached_property
    def _chat(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder)


class TargetSide:
    """evaluate.OnnxSide's interface over a TargetModel: one merged variant, its adapter built in."""

    def __init__(self, bundle: Path, variant: str):
        self.bm = _MergedVariant(Path(bundle), variant)
        self.model = load(Path(bundle), variant)
        self.eos = set(self.bm.tokenizer.eos_token_ids)
        self.merged = variant

    def _check(self, adapter: str | None) -> None:
        if adapter != self.merged:
            raise ValueError(f"this model is adapter {self.merged!r} merged into the base; it cannot run {adapter!r}")

    def _failed(self, exc: Exception) -> PipelineError:
        d = self.model.describe()
        return PipelineError(f"evaluation of variant {self.merged!r} on {d.runtime} ({d.provider}, {d.device}) failed: {exc}")

    def generate(self, prompt: Sequence[int], adapter: str | None, max_new_tokens: int) -> list[int]:
        self._check(adapter)
        try:
            return self.model.generate(list(prompt), max_new_tokens)
        except RuntimeError as exc:  # the runtime's own error, e.g. a kernel refusing the graph's shapes
            raise self._failed(exc) from None

    def logits(self, ids: Sequence[int], adapter: str | None, first: int = 0) -> np.ndarray:
        """(len(ids) - first, vocab) teacher-forced logits at positions first.. of `ids`."""
        self._check(adapter)
        try:
            logits = self.model.logits(list(ids))
        except RuntimeError as exc:
            raise self._failed(exc) from None
        if logits is None:
            raise PipelineError(f"{self.model.describe().runtime} gives no logits: perplexity cannot be measured")
        return logits[first:]

    def describe(self) -> RuntimeDescription:
        return self.model.describe()


def eval_side(bundle: Path, variant: str | None) -> TargetSide | None:
    """The evaluation's model side for `bundle` when its target evaluates outside onnxruntime-genai, else None."""
    target = get_target(_manifest(Path(bundle))["target"])
    if target.eval_runtime == "onnxruntime-genai" or variant is None:
        return None
    return TargetSide(Path(bundle), variant)
