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

report.py turns eval.json's figures into report.md and charts. May import: ``runtime``, ``bundle``,
``orchestration``, ``pipeline_spec``, ``errors``. Never search, serve or the orchestration.
"""

from phi_pipeline.evaluate.cli import eval_cli, evaluate_staged, gated_results, manifest_summary, write_staged_report
from phi_pipeline.evaluate.gates import GateCheck, check_gates, gate_checks, record_gates
from phi_pipeline.evaluate.metrics import METRICS, score
from phi_pipeline.evaluate.run import evaluate_bundle
from phi_pipeline.evaluate.tasks import EvalTask, tasks_from_manifest, tasks_from_plan

__all__ = [
    "METRICS",
    "EvalTask",
    "GateCheck",
    "check_gates",
    "eval_cli",
    "evaluate_bundle",
    "evaluate_staged",
    "gate_checks",
    "gated_results",
    "manifest_summary",
    "record_gates",
    "score",
    "tasks_from_manifest",
    "tasks_from_plan",
    "write_staged_report",
]
