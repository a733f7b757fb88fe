"""Prove a bundle before it ships: task metric, perplexity and PyTorch-vs-ONNX parity, then gates.

For the base model (no adapter) and for each adapter, on that adapter's eval split:

- task metric (exact_match or chrF) of greedy generations by the ONNX bundle (onnxruntime-genai)
  and by PyTorch + PEFT (transformers, fp32), from the same prompt token ids;
- perplexity of the reference answers, conditioned on the prompt, under both, on the same ids;
- parity between the two: token agreement, identical outputs, and logit differences.

Definitions (also written into eval.json):

- Prompt: the text the adapter saw in training before its answer (BundleModel.prompt_for), tokenized
  once by the bundle's tokenizer; both runtimes get these ids.
- Answer tokens: the ids that follow the prompt ids in tokenize(prompt + separator + reference),
  where the separator is what the template had between prompt and answer ("" for chat data). No
  end-of-turn or end-of-text marker is scored.
- Perplexity: exp(total negative log-likelihood / total answer tokens) over the split.
- Token agreement: the PyTorch greedy continuation (up to max_new_tokens, its end-of-sequence token
  included) is fed to the ONNX model teacher-forced; the share of those positions at which the ONNX
  model's argmax is the token PyTorch chose. One early divergence therefore costs one position, not
  the rest of the sequence.
- Identical outputs: share of examples whose free-running greedy outputs are the same token ids.
- Logit differences: max and mean |ONNX - PyTorch| over the full vocabulary at every teacher-forced
  position (reference answers and PyTorch greedy continuations).

The ONNX side needs onnxruntime-genai only; torch, transformers and peft are imported inside the
PyTorch side, which is optional for `phi-pipeline eval` (a bundle on a machine without the
training cache) and required by `phi-pipeline run`. The ONNX side runs one example at a time, as a
device would; the PyTorch side runs batches (left-padded greedy generation, right-padded
teacher-forced passes), one intra-op thread for small models. A merged bundle (one model per
adapter, no base model shipped) is evaluated model by model, its base figures from PyTorch only.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from phi_pipeline.bundle import MANIFEST
from phi_pipeline.cache import file_sha256
from phi_pipeline.data import Example, load_examples
from phi_pipeline.errors import PipelineError, UsageError
from phi_pipeline.spec import DataSpec, EvalSpec, GateSpec, PipelineSpec

if TYPE_CHECKING:
    from phi_pipeline.generate import BundleModel
    from phi_pipeline.plan import Plan

FORMAT = "phi-pipeline-eval/1"
VARIANTS = ("base", "adapter")
SMALL_MODEL_PARAMS = 50_000_000

DEFINITIONS = {
    "prompt": "the text the adapter saw in training before its answer, tokenized once by the bundle's tokenizer; "
    "both runtimes get the same ids",
    "answer_tokens": "ids following the prompt ids in tokenize(prompt + separator + reference); no end marker scored",
    "perplexity": "exp(total NLL of the answer tokens / their count), conditioned on the prompt",
    "token_agreement": "PyTorch greedy continuation (eos included) teacher-forced through the ONNX model: share of "
    "positions where the ONNX argmax equals PyTorch's token",
    "identical_outputs": "share of examples whose free-running greedy token ids are the same in both runtimes",
    "logit_abs_diff": "|ONNX - PyTorch| logits over the vocabulary at every teacher-forced position "
    "(reference answers and PyTorch greedy continuations)",
    "exact_match": "share of examples whose generated text, stripped, equals the stripped reference (0-1)",
    "chrf": "corpus chrF (sacreBLEU default: character n-grams 1-6, whitespace removed, beta=2), 0-100",
}


# --------------------------------------------------------------------------------------------- metrics


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Share of hypotheses equal to their reference after stripping surrounding whitespace."""
    _same_length(hypotheses, references)
    if not references:
        return 0.0
    return sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(references)


CHRF_ORDER = 6
CHRF_BETA = 2.0


def _char_ngrams(text: str, n: int) -> Counter:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf_statistics(hypothesis: str, reference: str, order: int = CHRF_ORDER) -> list[int]:
    """[hyp n-grams, ref n-grams, matches] for n = 1..order, whitespace removed (sacreBLEU's default).

    As in sacreBLEU, hypothesis n-grams are not counted for an order the reference has none of.
    """
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    stats: list[int] = []
    for n in range(1, order + 1):
        h, r = _char_ngrams(hyp, n), _char_ngrams(ref, n)
        matches = sum(min(c, r[g]) for g, c in h.items() if g in r)
        stats += [sum(h.values()) if r else 0, sum(r.values()), matches]
    return stats


def chrf_from_statistics(stats: Sequence[int], beta: float = CHRF_BETA) -> float:
    """chrF (0-100) from summed statistics: precision and recall averaged over the orders both sides
    have n-grams of (sacreBLEU's effective order), then the F-beta score of the two averages."""
    precisions, recalls = [], []
    for i in range(len(stats) // 3):
        n_hyp, n_ref, n_match = stats[3 * i : 3 * i + 3]
        if n_hyp > 0 and n_ref > 0:
            precisions.append(n_match / n_hyp)
            recalls.append(n_match / n_ref)
    if not precisions:
        return 0.0
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p + r == 0:
        return 0.0
    b2 = beta * beta
    return 100.0 * (1 + b2) * p * r / (b2 * p + r)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF: statistics summed over all pairs, then one score (as sacreBLEU's corpus_score)."""
    _same_length(hypotheses, references)
    total = [0] * (3 * CHRF_ORDER)
    for h, r in zip(hypotheses, references):
        total = [a + b for a, b in zip(total, chrf_statistics(h, r))]
    return chrf_from_statistics(total)


def sentence_chrf(hypothesis: str, reference: str) -> float:
    return chrf_from_statistics(chrf_statistics(hypothesis, reference))


def _same_length(a: Sequence[Any], b: Sequence[Any]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} hypotheses for {len(b)} references")


METRICS = {"exact_match": exact_match, "chrf": chrf}


def metric_fn(name: str):
    return METRICS[name]


# ----------------------------------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class EvalTask:
    """One adapter's evaluation: its eval split, how rows become text, its metric and gates."""

    adapter: str
    data: DataSpec
    eval: EvalSpec
    gates: GateSpec
    eval_file: Path
    expected_sha256: str | None = None
    """The eval split's sha256 when the bundle was built (manifest.json), to notice a changed file."""

    @property
    def separator(self) -> str:
        """What the training text had between the prompt and the answer."""
        if self.data.messages_field:
            return ""
        template, field_ = self.data.text_template or "", self.data.response_field or ""
        before = template[: template.rindex("{" + field_ + "}")]
        return before[len(before.rstrip(" ")) :]

    def examples(self) -> list[Example]:
        try:
            rows = load_examples(self.eval_file, self.data)
        except (ValueError, KeyError) as exc:
            raise UsageError(str(self.eval_file), [f"cannot read the eval split of adapter {self.adapter!r}: {exc}"])
        return rows[: self.eval.max_examples] if self.eval.max_examples else rows


def tasks_from_plan(plan: "Plan") -> list[EvalTask]:
    return [
        EvalTask(a.name, a.spec.data, a.spec.eval, a.spec.gates, Path(a.spec.data.eval)) for a in plan.adapters
    ]


def tasks_from_manifest(
    manifest: Mapping[str, Any],
    *,
    spec: PipelineSpec | None = None,
    adapter: str | None = None,
    data_file: str | Path | None = None,
) -> list[EvalTask]:
    """Tasks for a published bundle: data format, eval settings and gates from its manifest (or from
    `spec` for bundles whose manifest predates them); `data_file` replaces the adapter's eval split."""
    entries = list(manifest.get("adapters", []))
    names = [a["name"] for a in entries]
    if adapter is not None:
        if adapter not in names:
            raise UsageError("--adapter", [f"no adapter {adapter!r}; this bundle has {', '.join(names)}"])
        entries = [a for a in entries if a["name"] == adapter]
    if data_file is not None and len(entries) != 1:
        raise UsageError("--data", [f"the bundle has {len(entries)} adapters; say which one --data is for with --adapter"])
    spec_adapters = {a.name: a for a in spec.adapters} if spec else {}
    tasks, problems = [], []
    for entry in entries:
        name = entry["name"]
        if spec is not None:
            if name not in spec_adapters:
                problems.append(f"adapter {name!r} is not in the spec")
                continue
            a = spec_adapters[name]
            data, eval_spec, gates = a.data, a.eval, a.gates
        else:
            ds = entry.get("dataset", {})
            if not any(k in ds for k in ("messages_field", "text_template")):
                problems.append(
                    f"adapter {name!r}: the manifest does not record its data format (built before evaluation "
                    "existed); pass --spec with the pipeline spec it was built from"
                )
                continue
            data = DataSpec(
                train=ds.get("train", ""),
                eval=ds.get("eval", ""),
                text_template=ds.get("text_template"),
                response_field=ds.get("response_field"),
                messages_field=ds.get("messages_field"),
            )
            eval_spec = EvalSpec(**entry.get("eval", {}))
            gates = GateSpec(**entry.get("gates", {}))
        path = Path(data_file) if data_file is not None else Path(data.eval)
        expected = None if data_file is not None else entry.get("dataset", {}).get("eval_sha256")
        tasks.append(EvalTask(name, data, eval_spec, gates, path, expected))
    if problems:
        raise UsageError("manifest.json", problems)
    return tasks


# -------------------------------------------------------------------------------------------- runtimes


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, targets: Sequence[int]) -> float:
    """Summed negative log-likelihood of `targets`, logits[i] predicting targets[i]."""
    if len(targets) == 0:
        return 0.0
    lp = log_softmax(logits)
    return float(-lp[np.arange(len(targets)), np.asarray(targets)].sum())


class OnnxSide:
    """Greedy generation and teacher-forced logits with onnxruntime-genai (no torch)."""

    def __init__(self, model: "BundleModel"):
        self.bm = model
        self.og = model.og
        self.eos = {int(t) for t in model.tokenizer.eos_token_ids}
        # a merged bundle's model has one adapter built into its weights (and no base model to run)
        self.merged = getattr(model, "merged_variant", None)

    def _generator(self, adapter: str | None, max_length: int):
        if adapter != self.merged and self.merged is not None:
            raise ValueError(f"this model is adapter {self.merged!r} merged into the base; it cannot run {adapter!r}")
        params = self.og.GeneratorParams(self.bm.model)
        params.set_search_options(do_sample=False, max_length=max_length)
        generator = self.og.Generator(self.bm.model, params)
        if adapter is not None and self.merged is None:
            generator.set_active_adapter(self.bm.adapters, adapter)
        return generator

    def generate(self, prompt: Sequence[int], adapter: str | None, max_new_tokens: int) -> list[int]:
        """New token ids, the end-of-sequence token included when one was produced."""
        generator = self._generator(adapter, len(prompt) + max_new_tokens)
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        new: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        return new

    def logits(self, ids: Sequence[int], adapter: str | None) -> np.ndarray:
        """(len(ids), vocab) logits of one teacher-forced pass over `ids`."""
        generator = self._generator(adapter, len(ids) + 1)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        return np.asarray(generator.get_output("logits"))[0].astype(np.float32)


@contextmanager
def _quiet_hf() -> Iterator[None]:
    """No weight-loading progress bars or deprecation warnings from transformers/peft internals."""
    import warnings

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


class TorchSide:
    """The same questions asked of transformers + PEFT in fp32: the reference the bundle is held to."""

    def __init__(self, base_model: str, peft_dirs: Mapping[str, Path], *, trust_remote_code: bool = False):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        with _quiet_hf():
            model = AutoModelForCausalLM.from_pretrained(
                base_model, dtype=torch.float32, trust_remote_code=trust_remote_code
            )
            self.tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code)
            self.adapters = list(peft_dirs)
            if self.adapters:
                first, *rest = self.adapters
                model = PeftModel.from_pretrained(model, str(peft_dirs[first]), adapter_name=first)
                for name in rest:
                    model.load_adapter(str(peft_dirs[name]), adapter_name=name)
        model.eval()
        self.model = model
        params = sum(p.numel() for p in model.parameters())
        # Intra-op threads pay off only for large matrices: on a small model their synchronisation
        # costs more than the work (10x slower measured on 2 busy cores), so small models get one.
        self.threads = 1 if params < SMALL_MODEL_PARAMS else torch.get_num_threads()

    @contextmanager
    def _context(self, adapter: str | None) -> Iterator[None]:
        torch = self.torch
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode(), self._adapter(adapter), _quiet_hf():
                yield
        finally:
            torch.set_num_threads(before)

    def _adapter(self, adapter: str | None):
        if not self.adapters:
            if adapter is not None:
                raise ValueError(f"no PEFT adapter {adapter!r} loaded")
            return nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return nullcontext()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def generate(
        self, prompts: Sequence[Sequence[int]], adapter: str | None, max_new_tokens: int, eos: set[int], pad: int
    ) -> list[tuple[list[int], np.ndarray]]:
        """Greedy decoding of a batch (left-padded): per prompt, the new ids (eos included when produced)
        and the logits that chose each, (n, vocab)."""
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(list(p))
            mask[i, width - len(p) :] = 1
        with self._context(adapter):
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                eos_token_id=sorted(eos),
                pad_token_id=pad,
                output_logits=True,
                return_dict_in_generate=True,
            )
        steps = torch.stack(out.logits, dim=1).float().numpy()  # (batch, steps, vocab)
        results = []
        for i in range(len(prompts)):
            new: list[int] = []
            for token in out.sequences[i, width:].tolist():
                new.append(token)
                if token in eos:
                    break
            results.append((new, steps[i, : len(new)]))
        return results

    def logits(self, seqs: Sequence[Sequence[int]], adapter: str | None, pad: int) -> list[np.ndarray]:
        """Teacher-forced logits of a batch (right-padded, so no position moves): (len(seq), vocab) each."""
        torch = self.torch
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(list(s))
            mask[i, : len(s)] = 1
        with self._context(adapter):
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float().numpy()
        return [logits[i, : len(s)] for i, s in enumerate(seqs)]


# ---------------------------------------------------------------------------------------- evaluation


@dataclass
class _Tally:
    """Running figures of one variant (base or adapter) on one task."""

    onnx_text: list[str] = field(default_factory=list)
    torch_text: list[str] = field(default_factory=list)
    onnx_nll: float = 0.0
    torch_nll: float = 0.0
    answer_tokens: int = 0
    agree: int = 0
    positions: int = 0
    identical: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    n_abs: int = 0

    def diff(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.size:
            d = np.abs(a.astype(np.float64) - b.astype(np.float64))
            self.max_abs = max(self.max_abs, float(d.max()))
            self.sum_abs += float(d.sum())
            self.n_abs += d.size


def _ppl(nll: float, n: int) -> float | None:
    if not n:
        return None
    try:
        return math.exp(nll / n)
    except OverflowError:
        return math.inf


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b


def _split_answer(prompt_ids: list[int], full_ids: list[int]) -> tuple[list[int], list[int]]:
    """Prompt and answer ids; where tokenization merges across the boundary, the shared prefix is the prompt."""
    k = 0
    while k < min(len(prompt_ids), len(full_ids)) and prompt_ids[k] == full_ids[k]:
        k += 1
    return full_ids[:k], full_ids[k:]


def _decode(onnx: OnnxSide, ids: Sequence[int]) -> str:
    """Generated text as BundleModel.generate returns it (end-of-sequence tokens dropped, stripped)."""
    ids = [t for t in ids if t not in onnx.eos]
    return onnx.bm.tokenizer.decode(np.asarray(ids, dtype=np.int32)).strip() if ids else ""


def _strip_eos(ids: Sequence[int], eos: set[int]) -> list[int]:
    return [t for t in ids if t not in eos]


def _progress(total: int, enabled: bool | None):
    from tqdm import tqdm

    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(total=total, desc="evaluating", unit="example", file=sys.stderr, disable=disable, leave=False)


def evaluate_bundle(
    bundle: Path,
    tasks: Sequence[EvalTask],
    *,
    base_model: str | None = None,
    peft_dirs: Mapping[str, Path] | None = None,
    trust_remote_code: bool = False,
    require_pytorch: bool = False,
    progress: bool | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Evaluate base and adapters of `bundle` on each task's eval split; every figure, as a dict.

    The PyTorch side runs when `base_model` and a PEFT folder for every task's adapter are given and
    load; otherwise the ONNX figures alone are reported, with the reason (or PipelineError when
    `require_pytorch`). A merged bundle (one model per adapter, no base model shipped) is evaluated
    model by model; its base figures come from PyTorch only.
    """
    from phi_pipeline.generate import BundleModel
    from phi_pipeline.target_runtime import eval_side

    start = time.perf_counter()
    manifest = json.loads((Path(bundle) / MANIFEST).read_text())
    names = [a["name"] for a in manifest.get("adapters", [])]
    missing = [t.adapter for t in tasks if t.adapter not in names]
    if missing:
        raise UsageError(str(bundle), [f"no adapter {', '.join(map(repr, missing))} in this bundle"])
    merged = manifest.get("layout") == "merged"
    shared = None if merged else OnnxSide(BundleModel(Path(bundle)))

    torch_side, reason = _load_torch(tasks, base_model, peft_dirs or {}, trust_remote_code)
    if torch_side is None and require_pytorch:
        raise PipelineError(f"the PyTorch reference for evaluation could not be loaded: {reason}")

    prepared = [(task, task.examples()) for task in tasks]
    results: dict[str, Any] = {
        "format": FORMAT,
        "bundle": {k: manifest.get(k) for k in ("pipeline", "target", "precision", "layout")},
        "pytorch": {
            "available": torch_side is not None,
            "reason": reason,
            "base_model": base_model,
            "dtype": "float32",
        },
        "definitions": DEFINITIONS,
        "adapters": {},
    }
    bar = _progress(sum(len(ex) for _, ex in prepared) * len(VARIANTS), progress)
    try:
        for task, examples in prepared:
            # NPU bundles run on their own runtime (phi_pipeline/target_runtime.py), the others on onnxruntime-genai
            onnx = shared or eval_side(Path(bundle), task.adapter) or OnnxSide(BundleModel(Path(bundle), variant=task.adapter))
            results["adapters"][task.adapter] = _evaluate_task(task, examples, onnx, torch_side, bar, batch_size)
    finally:
        bar.close()
    results["seconds"] = round(time.perf_counter() - start, 2)
    return results


def _load_torch(
    tasks: Sequence[EvalTask], base_model: str | None, peft_dirs: Mapping[str, Path], trust_remote_code: bool
) -> tuple[TorchSide | None, str | None]:
    if not base_model:
        return None, "no base model given"
    local = Path(base_model)
    if (local.is_absolute() or base_model.startswith(".") or base_model.count("/") != 1) and not local.is_dir():
        return None, f"base model folder {base_model} not found"
    for t in tasks:
        folder = peft_dirs.get(t.adapter)
        if folder is None or not (Path(folder) / "adapter_config.json").is_file():
            return None, f"PEFT adapter {t.adapter!r} not found (looked in {folder}); was the cache cleaned?"
    try:
        import torch  # noqa: F401  (imported here so the ONNX side never needs it)
    except ImportError:
        return None, "torch is not installed"
    try:
        return TorchSide(base_model, {t.adapter: Path(peft_dirs[t.adapter]) for t in tasks},
                         trust_remote_code=trust_remote_code), None
    except Exception as exc:  # a hub id not in the offline cache, a corrupt checkpoint, ...
        return None, f"cannot load the PyTorch model: {type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class _Item:
    line: int
    reference: str
    prompt: list[int]
    """Prompt ids as generation sees them."""
    context: list[int]
    """Prompt ids the answer is scored after (shorter than `prompt` only where tokens merge across the boundary)."""
    answer: list[int]


def _prepare(task: EvalTask, examples: list[Example], onnx: OnnxSide) -> list[_Item]:
    bm = onnx.bm
    items = []
    for ex in examples:
        text = bm.prompt_for(ex.prompt, task.adapter)
        prompt = [int(t) for t in bm.tokenizer.encode(text)]
        full = [int(t) for t in bm.tokenizer.encode(text + task.separator + ex.reference)]
        context, answer = _split_answer(prompt, full)
        items.append(_Item(ex.line, ex.reference, prompt, context, answer))
    return items


def _evaluate_task(
    task: EvalTask, examples: list[Example], onnx: OnnxSide, torch_side: TorchSide | None, bar, batch_size: int
) -> dict[str, Any]:
    start = time.perf_counter()
    max_new = task.eval.max_new_tokens
    items = _prepare(task, examples, onnx)
    pad = int(onnx.bm.tokenizer.pad_token_id)
    tally = {v: _Tally() for v in VARIANTS}
    predictions: list[dict[str, Any]] = [{"line": it.line, "reference": it.reference} for it in items]
    for variant in VARIANTS:
        adapter = task.adapter if variant == "adapter" else None
        run_onnx = onnx.merged is None or adapter == onnx.merged
        t = tally[variant]
        for lo in range(0, len(items), batch_size):
            chunk = items[lo : lo + batch_size]
            onnx_new: list[list[int]] = []
            onnx_ref: list[np.ndarray] = []
            for it in chunk:
                n = len(it.context)
                t.answer_tokens += len(it.answer)
                if run_onnx:
                    onnx_new.append(onnx.generate(it.prompt, adapter, max_new))
                    onnx_ref.append(onnx.logits(it.context + it.answer, adapter)[n - 1 : n - 1 + len(it.answer)])
                    t.onnx_text.append(_decode(onnx, onnx_new[-1]))
                    t.onnx_nll += token_nll(onnx_ref[-1], it.answer)
                bar.update(1)
            if torch_side is None:
                continue
            generated = torch_side.generate([it.prompt for it in chunk], adapter, max_new, onnx.eos, pad)
            torch_ref = torch_side.logits([it.context + it.answer for it in chunk], adapter, pad)
            for k, (it, (p_new, p_steps), p_ref) in enumerate(zip(chunk, generated, torch_ref)):
                n = len(it.context)
                p_ref = p_ref[n - 1 : n - 1 + len(it.answer)]
                t.torch_text.append(_decode(onnx, p_new))
                t.torch_nll += token_nll(p_ref, it.answer)
                if not run_onnx:
                    continue
                t.diff(onnx_ref[k], p_ref)
                if p_new:
                    m = len(it.prompt)
                    forced = onnx.logits(it.prompt + p_new[:-1], adapter)[m - 1 :]
                    t.agree += int((forced.argmax(axis=-1) == np.asarray(p_new)).sum())
                    t.positions += len(p_new)
                    t.diff(forced, p_steps)
                t.identical += int(_strip_eos(onnx_new[k], onnx.eos) == _strip_eos(p_new, onnx.eos))
        for row, text in zip(predictions, t.onnx_text):
            row[f"{variant}_onnx"] = text
        for row, text in zip(predictions, t.torch_text):
            row[f"{variant}_pytorch"] = text

    score = metric_fn(task.eval.metric)
    references = [it.reference for it in items]
    sha = file_sha256(task.eval_file)
    out: dict[str, Any] = {
        "metric": task.eval.metric,
        "eval_file": task.eval_file.as_posix(),
        "eval_sha256": sha,
        "eval_split_changed": task.expected_sha256 is not None and sha != task.expected_sha256,
        "examples": len(items),
        "max_new_tokens": max_new,
        "answer_tokens": tally["base"].answer_tokens,
        "prompt_boundary_merges": sum(len(it.context) != len(it.prompt) for it in items),
        "gates": task.gates.model_dump(),
    }
    if torch_side is not None:
        out["pytorch_tokenizer_mismatches"] = sum(
            torch_side.encode(onnx.bm.prompt_for(ex.prompt, task.adapter)) != it.prompt for ex, it in zip(examples, items)
        )
    for variant, t in tally.items():
        has_onnx = onnx.merged is None or variant == "adapter"
        figures: dict[str, Any] = {
            "onnx": {"metric": score(t.onnx_text, references), "perplexity": _ppl(t.onnx_nll, t.answer_tokens)}
            if has_onnx
            else None,
            "pytorch": None,
            "parity": None,
        }
        if torch_side is not None:
            figures["pytorch"] = {
                "metric": score(t.torch_text, references),
                "perplexity": _ppl(t.torch_nll, t.answer_tokens),
            }
        if torch_side is not None and has_onnx:
            figures["parity"] = {
                "token_agreement": t.agree / t.positions if t.positions else None,
                "positions": t.positions,
                "identical_outputs": t.identical / len(items) if items else None,
                "perplexity_ratio": _ratio(figures["onnx"]["perplexity"], figures["pytorch"]["perplexity"]),
                "logit_max_abs_diff": t.max_abs,
                "logit_mean_abs_diff": t.sum_abs / t.n_abs if t.n_abs else None,
            }
        out[variant] = figures
    out["predictions"] = predictions
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


# --------------------------------------------------------------------------------------------- gates


@dataclass(frozen=True)
class GateCheck:
    adapter: str
    gate: str
    bound: float
    value: float | None
    passed: bool | None
    """None: not checked (the PyTorch reference was unavailable)."""
    message: str


def _fmt(metric: str, value: float) -> str:
    return f"{value:.2f}" if metric == "chrf" else f"{value:.3f}"


def gate_checks(results: Mapping[str, Any], spec: PipelineSpec | Mapping[str, Any] | None = None) -> list[GateCheck]:
    """Every gate of every evaluated adapter, passed, failed or not checked, with its message.

    Gates apply to the adapter (the base model's figures are the comparison point). `spec` gives the
    bounds: a PipelineSpec, a mapping adapter -> GateSpec (or dict), or None for those recorded in
    `results`.
    """
    checks: list[GateCheck] = []
    for name, r in results.get("adapters", {}).items():
        gates = _gates_for(name, r, spec)
        metric = r["metric"]
        onnx, torch_, parity = r["adapter"]["onnx"], r["adapter"]["pytorch"], r["adapter"]["parity"]
        who = f"adapter {name!r}"
        if onnx is None:  # nothing of the bundle ran for this adapter: every gate is unmet
            checks += [
                GateCheck(name, g, getattr(gates, g), None, False, f"{who}: no ONNX figures to check (gates.{g})")
                for g in ("min_gain_over_base", "max_drop_vs_pytorch", "max_perplexity_ratio", "min_token_agreement")
            ]
            continue
        base_figures, base_label = r["base"]["onnx"], "the base model's"
        if base_figures is None:  # a merged bundle ships no base model: compare with the PyTorch base
            base_figures, base_label = r["base"]["pytorch"], "the base model's (PyTorch; not in the bundle)"

        bound = gates.min_gain_over_base
        if base_figures is None:
            checks.append(GateCheck(name, "min_gain_over_base", bound, None, None,
                                    f"{who}: min_gain_over_base not checked: no base model figures (gates.min_gain_over_base)"))
        else:
            base = base_figures["metric"]
            gain = onnx["metric"] - base
            ok = gain > bound
            checks.append(GateCheck(
                name, "min_gain_over_base", bound, gain, ok,
                f"{who}: {metric} {_fmt(metric, onnx['metric'])} "
                + (f"beats {base_label} {_fmt(metric, base)} by {_fmt(metric, gain)}, more than {_fmt(metric, bound)}"
                   if ok else f"does not beat {base_label} {_fmt(metric, base)} by more than {_fmt(metric, bound)}")
                + " (gates.min_gain_over_base)",
            ))

        bound = gates.max_drop_vs_pytorch
        if torch_ is None:
            checks.append(_unchecked(name, "max_drop_vs_pytorch", bound, who))
        else:
            drop = torch_["metric"] - onnx["metric"]
            ok = drop <= bound
            onnx_s, torch_s = _fmt(metric, onnx["metric"]), _fmt(metric, torch_["metric"])
            if drop <= 0:
                text = f"ONNX {metric} {onnx_s} is not below PyTorch+PEFT's {torch_s}"
            else:
                text = (f"ONNX {metric} {onnx_s} trails PyTorch+PEFT's {torch_s} by {_fmt(metric, drop)}, "
                        + ("within" if ok else "more than") + f" {_fmt(metric, bound)}")
            checks.append(GateCheck(name, "max_drop_vs_pytorch", bound, drop, ok,
                                    f"{who}: {text} (gates.max_drop_vs_pytorch)"))

        bound = gates.max_perplexity_ratio
        ratio = parity["perplexity_ratio"] if parity else None
        if ratio is None:
            checks.append(_unchecked(name, "max_perplexity_ratio", bound, who))
        else:
            ok = ratio <= bound
            checks.append(GateCheck(
                name, "max_perplexity_ratio", bound, ratio, ok,
                f"{who}: ONNX perplexity {onnx['perplexity']:.3f} is {ratio:.3f}x PyTorch's "
                f"{torch_['perplexity']:.3f}, " + ("within" if ok else "above")
                + f" {bound:.3f} (gates.max_perplexity_ratio)",
            ))

        bound = gates.min_token_agreement
        agreement = parity["token_agreement"] if parity else None
        if agreement is None:
            checks.append(_unchecked(name, "min_token_agreement", bound, who))
        else:
            ok = agreement >= bound
            checks.append(GateCheck(
                name, "min_token_agreement", bound, agreement, ok,
                f"{who}: token agreement with PyTorch {agreement:.3f} is "
                + ("at least" if ok else "below") + f" {bound:.3f} (gates.min_token_agreement)",
            ))
    return checks


def _unchecked(name: str, gate: str, bound: float, who: str) -> GateCheck:
    return GateCheck(name, gate, bound, None, None, f"{who}: {gate} not checked: no PyTorch reference (gates.{gate})")


def _gates_for(name: str, r: Mapping[str, Any], spec: PipelineSpec | Mapping[str, Any] | None) -> GateSpec:
    if isinstance(spec, PipelineSpec):
        for a in spec.adapters:
            if a.name == name:
                return a.gates
        return spec.gates
    if spec is not None and name in spec:
        g = spec[name]
        return g if isinstance(g, GateSpec) else GateSpec(**g)
    return GateSpec(**r.get("gates", {}))


def check_gates(results: Mapping[str, Any], spec: PipelineSpec | Mapping[str, Any] | None = None) -> list[str]:
    """One message per failed gate, naming the adapter, the metric, the figure and the bound; [] if all pass."""
    return [c.message for c in gate_checks(results, spec) if c.passed is False]


def record_gates(results: dict[str, Any], spec: PipelineSpec | Mapping[str, Any] | None, *, enforced: bool) -> list[str]:
    """Check the gates, store every check in results["gates"], and return the failure messages."""
    checks = gate_checks(results, spec)
    failures = [c.message for c in checks if c.passed is False]
    results["gates"] = {
        "enforced": enforced,
        "passed": not failures,
        "failures": failures,
        "checks": [c.__dict__ for c in checks],
    }
    return failures


def peft_dirs_from_cache(manifest: Mapping[str, Any], cache_dir: Path) -> dict[str, Path]:
    """PEFT folders of a bundle's adapters in the content cache (cache_key recorded by the manifest)."""
    return {
        a["name"]: cache_dir / "adapters" / a["cache_key"] / "adapter" for a in manifest.get("adapters", []) if a.get("cache_key")
    }



def evaluate_staged(plan: "Plan", staged: Path, trained: Sequence[Any], *, enforced: bool) -> dict[str, Any]:
    """`phi-pipeline run`'s evaluation: the staged bundle against PyTorch + PEFT (required), gates
    checked, eval.json / report.md / charts written into the bundle and copied to the run folder
    (so a bundle refused by its gates still leaves its report behind). Returns the results."""
    import shutil

    from phi_pipeline.report import CHARTS_DIR, EVAL_JSON, REPORT_MD, write_report

    results = evaluate_bundle(
        staged,
        tasks_from_plan(plan),
        base_model=plan.base_model,
        peft_dirs={t.plan.name: t.folder / "adapter" for t in trained},
        trust_remote_code=plan.spec.base_model.trust_remote_code,
        require_pytorch=True,
    )
    record_gates(results, None, enforced=enforced)
    write_report(
        staged,
        results,
        histories={t.plan.name: _history(t.folder) for t in trained},
        tensorboard={t.plan.name: t.folder / "tensorboard" if (t.folder / "tensorboard").is_dir() else None for t in trained},
    )
    copy = plan.paths.run_dir / "evaluation"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for name in (EVAL_JSON, REPORT_MD):
        shutil.copy2(staged / name, copy / name)
    if (staged / CHARTS_DIR).is_dir():
        shutil.copytree(staged / CHARTS_DIR, copy / CHARTS_DIR)
    results["report_copy"] = copy.as_posix()
    return results


def _history(folder: Path) -> list[dict[str, Any]]:
    from phi_pipeline.bundle import training_history

    return training_history(folder)


def manifest_summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """The headline figures for manifest.json (eval.json has the rest)."""
    summary: dict[str, Any] = {"file": "eval.json", "report": "report.md",
                               "pytorch_reference": results["pytorch"]["available"], "adapters": {}}
    for name, r in results["adapters"].items():
        parity = r["adapter"]["parity"] or {}
        summary["adapters"][name] = {
            "metric": r["metric"],
            "examples": r["examples"],
            "base_onnx": (r["base"]["onnx"] or {}).get("metric"),  # None in a merged bundle: no base model
            "base_pytorch": (r["base"]["pytorch"] or {}).get("metric"),
            "adapter_onnx": r["adapter"]["onnx"]["metric"],
            "adapter_pytorch": (r["adapter"]["pytorch"] or {}).get("metric"),
            "perplexity_ratio": parity.get("perplexity_ratio"),
            "token_agreement": parity.get("token_agreement"),
        }
    return summary


def eval_cli(
    bundle: str,
    *,
    adapter: str | None = None,
    data: str | None = None,
    spec: str | None = None,
    cache_dir: str | None = None,
    onnx_only: bool = False,
    out: str | None = None,
) -> int:
    """`phi-pipeline eval`: evaluate a bundle on demand, print the table; 1 if a gate fails."""
    import json

    from phi_pipeline.report import format_table, write_report
    from phi_pipeline.spec import load_spec

    folder = Path(bundle)
    if not (folder / MANIFEST).is_file():
        raise UsageError(bundle, [f"no {MANIFEST} here; give a folder published by phi-pipeline run"])
    manifest = json.loads((folder / MANIFEST).read_text())
    pipeline_spec = load_spec(spec) if spec else None
    tasks = tasks_from_manifest(manifest, spec=pipeline_spec, adapter=adapter, data_file=data)
    problems = [f"{t.eval_file}: eval split of adapter {t.adapter!r} not found" for t in tasks if not t.eval_file.is_file()]
    if problems:
        raise UsageError(bundle, problems + ["run from the project root the bundle was built in, or pass --data"])
    cache = Path(cache_dir) if cache_dir else Path(pipeline_spec.work_dir if pipeline_spec else ".phi-pipeline") / "cache"
    base = None if onnx_only else manifest.get("base_model", {}).get("name_or_path")
    why_not = "--onnx-only" if onnx_only else _base_changed(manifest, cache)
    if why_not:
        base = None
    results = evaluate_bundle(
        folder,
        tasks,
        base_model=base,
        peft_dirs=peft_dirs_from_cache(manifest, cache),
        trust_remote_code=bool(pipeline_spec and pipeline_spec.base_model.trust_remote_code),
    )
    if why_not:
        results["pytorch"]["reason"] = why_not
    for name, r in results["adapters"].items():
        if r["eval_split_changed"]:
            print(
                f"warning: {r['eval_file']} (adapter {name!r}) is not the eval split the bundle was built with "
                "(sha256 differs from manifest.json); figures are not comparable with the bundle's eval.json",
                file=sys.stderr,
            )
    if not results["pytorch"]["available"]:
        print(
            f"note: evaluating the ONNX bundle only ({results['pytorch']['reason']}); "
            "gates that compare with PyTorch are not checked",
            file=sys.stderr,
        )
    failures = record_gates(results, None, enforced=True)
    if out:
        write_report(
            Path(out),
            results,
            histories={a["name"]: a.get("training_history", []) for a in manifest.get("adapters", [])},
            tensorboard={
                a["name"]: cache / "adapters" / a["cache_key"] / "tensorboard"
                for a in manifest.get("adapters", [])
                if a.get("cache_key") and (cache / "adapters" / a["cache_key"] / "tensorboard").is_dir()
            },
        )
    print(format_table(results))
    print(f"evaluated in {results['seconds']:.1f}s" + (f"; report in {out}" if out else ""))
    return 1 if failures else 0


def _base_changed(manifest: Mapping[str, Any], cache: Path) -> str | None:
    """Why the local base model cannot serve as the PyTorch reference any more, or None."""
    from phi_pipeline.cache import DigestMemo, tree_sha256

    base = manifest.get("base_model", {})
    digest, path = base.get("digest"), base.get("name_or_path")
    if not digest or digest.startswith("hub:") or not path or not Path(path).is_dir():
        return None
    memo = DigestMemo(cache / "digests.json")  # the pipeline's memo: unchanged files are not re-hashed
    if tree_sha256(Path(path), memo) != digest:
        return f"the base model in {path} is not the one the bundle was built from (its files changed)"
    return None
