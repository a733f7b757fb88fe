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
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

import numpy as np

from phi_pipeline.bundle import MANIFEST, variant_dir
from phi_pipeline.errors import PipelineError, UsageError
from phi_pipeline.targets import Target, get_target

if TYPE_CHECKING:
    from phi_pipeline.plan import Plan

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


def snapdragon_problem() -> str | None:
    """None on an ARM64 host (a Snapdragon machine), else why the QNN bundle's gates cannot run here.

    On x86-64 onnxruntime-qnn's HTP backend loads the context binaries in simulation, but the first prompt
    fails in the composed model's GroupQueryAttention nodes, which run on the CPU EP beside them (onnxruntime
    1.31.1 refuses StaticLLM's static cache), and onnxruntime-genai's heap is corrupted on the way out.
    """
    if platform.machine().lower() in ("arm64", "aarch64"):
        return None
    return (
        f"this is a {platform.machine()} host: the HTP simulator loads the context binaries, but the composed "
        "model's CPU-side GroupQueryAttention refuses its static KV cache under onnxruntime 1.31.1"
    )


_DEVICE_CHECKS = {"cuda": cuda_device_problem, "snapdragon": snapdragon_problem}


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
    """A QNN bundle variant (context binaries) on onnxruntime-genai with the onnxruntime-qnn plugin EP.

    The bundle's genai_config names the HTP backend (libQnnHtp.so); on an x86-64 host the wheel's
    libQnnHtp.so runs the HTP graphs in simulation, at a small fraction of the NPU's speed.
    """

    _registered = False

    def __init__(self, folder: Path):
        import onnxruntime_genai as og
        import onnxruntime_qnn

        if not QnnHtpModel._registered:  # once per process: genai refuses a second registration
            og.register_execution_provider_library(onnxruntime_qnn.get_ep_name(), onnxruntime_qnn.get_library_path())
            QnnHtpModel._registered = True
        self.og = og
        self.version = onnxruntime_qnn.__version__
        self.eos = _eos_ids(folder)
        genai = _genai_config(folder)
        self.vocab = int(genai["model"]["vocab_size"])
        # The bundle leaves the backend to the device's default (QnnHtp.dll on Snapdragon Windows); on x86-64
        # the plugin has none, so each QNN session is pointed at the wheel's HTP library, its simulator here.
        # genai's config overlay does not reach pipeline components: a view of the folder (links to its files)
        # gets the edited genai_config.json instead.
        backend = str(Path(onnxruntime_qnn.__file__).parent / "libQnnHtp.so")
        for stage in genai["model"]["decoder"].get("pipeline", []):
            for component in stage.values():
                for provider in component.get("session_options", {}).get("provider_options", []):
                    if "qnn" in provider:
                        provider["qnn"]["backend_path"] = backend
        self._view = tempfile.TemporaryDirectory(prefix="phi-qnn-")
        view = Path(self._view.name)
        for f in folder.iterdir():
            if f.name != "genai_config.json":
                (view / f.name).symlink_to(f.resolve())
        (view / "genai_config.json").write_text(json.dumps(genai))
        self.model = og.Model(og.Config(str(view)))

    def _generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=max_length)
        return self.og.Generator(self.model, params)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        generator = self._generator(len(prompt_ids) + max_new_tokens)
        generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        new: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        return new

    def logits(self, ids: Sequence[int]) -> np.ndarray | None:
        # The static graphs return the last fed position's logits only, so the sequence is fed one token at a
        # time (the iterator graph): one simulated HTP call per position.
        generator = self._generator(len(ids) + 1)
        rows = []
        for token in ids:
            generator.append_tokens(np.asarray([token], dtype=np.int32))
            rows.append(np.asarray(generator.get_output("logits"), dtype=np.float32).reshape(-1, self.vocab)[-1])
        return np.stack(rows)

    def describe(self) -> RuntimeDescription:
        return RuntimeDescription(
            runtime=f"onnxruntime-genai {self.og.__version__} + onnxruntime-qnn {self.version}",
            provider="QNNExecutionProvider, HTP backend (libQnnHtp.so)",
            device="npu (Hexagon HTP simulated on x86-64)",
            cpu_fallback=False,
            simulated=True,
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

    def logits(self, ids: Sequence[int], adapter: str | None) -> np.ndarray:
        self._check(adapter)
        try:
            logits = self.model.logits(list(ids))
        except RuntimeError as exc:
            raise self._failed(exc) from None
        if logits is None:
            raise PipelineError(f"{self.model.describe().runtime} gives no logits: perplexity cannot be measured")
        return logits

    def describe(self) -> RuntimeDescription:
        return self.model.describe()


def eval_side(bundle: Path, variant: str | None) -> TargetSide | None:
    """The evaluation's model side for `bundle` when its target evaluates outside onnxruntime-genai, else None."""
    target = get_target(_manifest(Path(bundle))["target"])
    if target.eval_runtime == "onnxruntime-genai" or variant is None:
        return None
    return TargetSide(Path(bundle), variant)
