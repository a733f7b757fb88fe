"""The benchmark's models: Phi-3- and Llama-shaped bases with random weights, random LoRA adapters,
and their int4 / fp32 bundles exported by the pipeline's own code.

Why random weights: speed, memory and size depend on shapes, not on what the weights learned, and
a random base is built in seconds with no hub access. Why a realistic embedding table: the
vocabulary is Phi-3's (32064 rows) although the tokenizer is the tiny base's (1024 tokens): the
int4 bundle keeps the embedding table in fp32, so a toy vocabulary would hide a large part of its
size and memory. Prompts are random token ids over the whole vocabulary, so the tokenizer never
limits which rows are read.

Bundles go through the same steps as `phi-pipeline run` (Plan from a generated spec, the export
workflow run by `run_olive`, `write_layout_adapter`, `bundle.stage` -> `convert_adapter`,
`bundle.verify`, `publish_dir`); only fine-tuning is skipped, as the adapters are random.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from phi_pipeline.bench.decode import TORCH_DTYPES
from phi_pipeline.orchestration.cache import file_sha256

PHI3_VOCAB = 32064
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@dataclass(frozen=True)
class BenchArch:
    """Shape of a benchmark base (full multi-head attention, untied embeddings). `family` phi3: fused
    qkv_proj and gate_up_proj, as Phi-3-mini; llama: q/k/v and gate/up as separate Linears, as
    Llama, Qwen2 and Mistral (LoRA on seven projections per layer, packed by bundle/lora_packing.py)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int = PHI3_VOCAB
    max_position_embeddings: int = 4096
    family: str = "phi3"

    @property
    def target_modules(self) -> list[str]:
        """LoRA targets of the bench adapters: the spec's default for the family (every projection)."""
        from phi_pipeline.pipeline_spec.schema import DEFAULT_TARGET_MODULES

        return DEFAULT_TARGET_MODULES[self.family]

    @property
    def parameters(self) -> int:
        h, i, n = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        per_layer = 4 * h * h + 3 * h * i + 2 * h
        return 2 * self.vocab_size * h + n * per_layer + h


# --size choices. "150m" is the default: big enough that weights, not per-op overhead, dominate an
# int4 decode step, small enough that `make bench` fits in 20 minutes on 2 cores.
SIZES: dict[str, BenchArch] = {
    "tiny": BenchArch(64, 2, 128, 2, vocab_size=1024, max_position_embeddings=1024),  # tests only
    "150m": BenchArch(768, 12, 2560, 12),
    "llama-150m": BenchArch(768, 12, 2560, 12, family="llama"),  # the same sizes, Llama's layout
    "llama-tiny": BenchArch(64, 2, 128, 2, vocab_size=1024, max_position_embeddings=1024, family="llama"),  # tests
    "300m": BenchArch(1024, 18, 2816, 16),
    "phi3-mini": BenchArch(3072, 32, 8192, 32),  # Phi-3-mini-4k's shape (3.8B): for --device cuda
}


def build_bench_base(
    out: Path, arch: BenchArch, tokenizer_dir: Path, *, seed: int = 0, dtype: str = "fp32", device: str = "cpu"
) -> Path:
    """A randomly initialised Phi3ForCausalLM (or LlamaForCausalLM) saved as safetensors in `dtype`, with
    `tokenizer_dir`'s tokenizer; initialised on `device` (a 3.8B init takes minutes on CPU).

    `tokenizer_dir` is any folder holding a Hugging Face tokenizer.json (a phi-pipeline bundle or
    the tiny base); its special tokens give the bos/eos/pad ids.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
    )

    record = _base_record(arch, seed, dtype)
    if built_from(out, record) is not None:
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = tokenizer.eos_token_id
    common = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_attention_heads,
        max_position_embeddings=arch.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        tie_word_embeddings=False,
    )
    if arch.family == "llama":
        config, model_class = LlamaConfig(**common, architectures=["LlamaForCausalLM"]), LlamaForCausalLM
    else:
        # Equal lengths select Model Builder's plain Phi-3 (no LongRoPE), as in phi_pipeline.tiny.
        config = Phi3Config(**common, original_max_position_embeddings=arch.max_position_embeddings,
                            architectures=["Phi3ForCausalLM"])
        model_class = Phi3ForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(config).to(getattr(torch, TORCH_DTYPES[dtype]))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=config.pad_token_id, do_sample=False
    )
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stamp(out, record)
    return out


# The benchmark's own cache: a 3.8B base, its adapters and exports take minutes each, and are
# rebuilt only when what they are built from changes (everything is seeded).
STAMP = "bench_record.json"


def built_from(folder: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """The stamp of `folder` when an earlier run built it from `record`, else None."""
    path = folder / STAMP
    if not path.is_file():
        return None
    stamped = json.loads(path.read_text())
    return stamped if stamped["record"] == record else None


def stamp(folder: Path, record: dict[str, Any], **facts: Any) -> None:
    """Mark `folder` as built from `record` (written last, so a half-built folder has none)."""
    (folder / STAMP).write_text(json.dumps({"record": record, **facts}, indent=2) + "\n")


def _record_of(folder: Path) -> dict[str, Any] | None:
    path = folder / STAMP
    return json.loads(path.read_text())["record"] if path.is_file() else None


def _base_record(arch: BenchArch, seed: int, dtype: str) -> dict[str, Any]:
    return {"arch": asdict(arch), "seed": seed, "dtype": dtype, "weights": "random (transformers' initialisation)"}


def make_random_adapter(base_dir: Path, out: Path, *, r: int, seed: int, target_modules: list[str]) -> Path:
    """A PEFT LoRA adapter of rank `r` with random A and B (PEFT's default B is zero, a no-op).

    Written as `out/adapter/` so it has the layout of a fine-tune result (pipeline.TrainedAdapter).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    record = {"base": _record_of(base_dir), "r": r, "seed": seed, "target_modules": target_modules}
    if record["base"] is not None and built_from(out, record) is not None:
        return out
    (out / STAMP).unlink(missing_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    lora = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=target_modules, task_type="CAUSAL_LM",
        init_lora_weights=False,  # random A and B instead of B = 0
    )
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                std = 1 / param.shape[1] ** 0.5 if "lora_A" in name else 0.02
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    target = out / "adapter"
    shutil.rmtree(target, ignore_errors=True)
    peft_model.save_pretrained(str(target))
    config_path = target / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(adapter_config, indent=2))
    stamp(out, record)
    return out


def bench_spec(
    name: str, base_dir: Path, ranks: dict[str, int], precision: str, work: Path, export_options: dict[str, Any] | None = None
) -> str:
    """A pipeline spec (YAML text) for the benchmark base and its adapters, all paths under `work`;
    `export_options`: ExportSpec fields beside the precision (tuning.py's variants).

    The adapters' data files exist only because a spec needs them: nothing is trained.
    """
    data = work / "data.jsonl"
    data.write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
    spec = {
        "name": name,
        "description": "phi-pipeline benchmark: a base with random weights, random adapters.",
        "base_model": {"name_or_path": str(base_dir)},
        "lora": {"alpha": 16, "dropout": 0.0},
        "adapters": [
            {
                "name": adapter,
                "data": {"train": str(data), "eval": str(data), "text_template": "{input} {output}", "response_field": "output"},
                "lora": {"r": r},
            }
            for adapter, r in ranks.items()
        ],
        "export": {"precision": precision, **(export_options or {})},
        "output_dir": str(work / "dist"),
        "work_dir": str(work / "work"),
    }
    return yaml.safe_dump(spec, sort_keys=False)


@dataclass(frozen=True)
class ExportedBundle:
    bundle: Path
    precision: str
    export_seconds: float
    """Wall time of the `olive run` of the export workflow (Model Builder + ExtractAdapters)."""
    export_dir: Path
    """Olive's output, the graph before bundle staging packs its projections."""


def export_bundle(
    base_dir: Path, adapters: dict[str, Path], ranks: dict[str, int], precision: str, work: Path, target: str = "cpu",
    export_options: dict[str, Any] | None = None,
) -> ExportedBundle:
    """Export `base_dir` at `precision` (and `export_options`, ExportSpec fields) with the pipeline's
    export workflow and publish a bundle holding `adapters` (name -> folder with adapter/), converted
    and verified by bundle.py."""
    from phi_pipeline.orchestration.configs import EXPORT_FILE, render, workflow_configs
    from phi_pipeline.orchestration.progress import Stages
    from phi_pipeline.orchestration.runner import run_olive
    from phi_pipeline.bundle import staging as bundle
    from phi_pipeline.bundle.adapters import write_layout_adapter
    from phi_pipeline.bundle.publish import publish_dir
    from phi_pipeline.errors import PipelineError
    from phi_pipeline.pipeline import TrainedAdapter
    from phi_pipeline.pipeline_spec.plan import make_plan
    from phi_pipeline.pipeline_spec.schema import parse_spec
    from phi_pipeline.versions import package_versions

    work.mkdir(parents=True, exist_ok=True)
    name = f"bench-{precision}"
    spec_text = bench_spec(name, base_dir, ranks, precision, work, export_options)
    plan = make_plan(parse_spec(spec_text, str(work / "spec.yaml")), target, source=str(work / "spec.yaml"))
    workflow = render(workflow_configs(plan)[EXPORT_FILE])
    record = {
        "base": _record_of(base_dir), "adapters": {a: _record_of(f) for a, f in adapters.items()}, "ranks": ranks,
        "precision": precision, "target": target, "packages": package_versions(),
        "staging": "lora projections packed",  # bundles staged before lora_packing existed are rebuilt
        "workflow": workflow,  # and those exported with other Model Builder settings
        "decoder_session_options": plan.target.decoder_session_options,
    }
    cached = built_from(work, record) if record["base"] is not None else None
    if cached is not None and "export_dir" in cached and (Path(cached["bundle"]) / "manifest.json").is_file():
        return ExportedBundle(Path(cached["bundle"]), precision, cached["export_seconds"], Path(cached["export_dir"]))
    (work / STAMP).unlink(missing_ok=True)
    (work / "spec.yaml").write_text(spec_text)
    config_path = work / EXPORT_FILE
    config_path.write_text(workflow)
    write_layout_adapter(plan)
    out = plan.paths.export_dir
    shutil.rmtree(out, ignore_errors=True)
    seconds = run_olive(config_path, work / "export.log", [out / "model.onnx", out / "genai_config.json"])
    data_sha = file_sha256(work / "data.jsonl")
    trained = [
        TrainedAdapter(plan.adapter(a), folder, key=f"random-{a}", dataset_sha256={"train": data_sha, "eval": data_sha})
        for a, folder in adapters.items()
    ]
    staged = bundle.stage(plan, out, trained, Stages(stream=io.StringIO()))
    problems = bundle.verify(staged)
    if problems:
        raise PipelineError(f"benchmark bundle {staged} failed verification: {problems}")
    publish_dir(staged, plan.paths.bundle_dir)
    stamp(work, record, bundle=str(plan.paths.bundle_dir), export_seconds=round(seconds, 2), export_dir=str(out))
    return ExportedBundle(plan.paths.bundle_dir, precision, round(seconds, 2), out)


def merged_bundle(base_dir: Path, adapter_dir: Path, rank: int, precision: str, work: Path, target: str = "cpu") -> Path:
    """The merged variant: one adapter folded into the base weights (Olive's MergeAdapterWeights),
    exported by the pipeline's `layout: merged` workflow for `target` with no LoRA inputs. One full
    model per adapter and no run-time LoRA cost: what the multi-adapter graph is compared with; for
    openvino, the target's own chain, run with its pass venv's Python."""
    from phi_pipeline.orchestration.configs import export_file, render, workflow_configs
    from phi_pipeline.orchestration.runner import run_olive
    from phi_pipeline.pipeline_spec.plan import make_plan
    from phi_pipeline.pipeline_spec.schema import parse_spec

    work.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load(bench_spec(f"bench-merged-{precision}", base_dir, {"merged": rank}, precision, work))
    spec["export"]["layout"] = "merged"
    plan = make_plan(parse_spec(yaml.safe_dump(spec)), target)
    trained = plan.paths.trained_adapter_dir("merged")
    shutil.rmtree(trained, ignore_errors=True)
    shutil.copytree(adapter_dir, trained)
    config_path = work / export_file("merged")
    config_path.write_text(render(workflow_configs(plan)[export_file("merged")]))
    out = plan.paths.merged_export_dir("merged")
    shutil.rmtree(out, ignore_errors=True)
    run_olive(config_path, work / "export-merged.log", [out / "genai_config.json"], python=plan.target.export_python)
    return out
