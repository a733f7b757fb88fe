"""Each int4 choice of Model Builder alone, on a base model folder: perplexity against PyTorch fp32 on held-out
prose and on the shipped tasks' eval rows, greedy next-token agreement, size on disk, build time.

    .venv/bin/python bench/int4_choices.py .phi-pipeline/base/smollm2-135m-instruct --out bench/int4-choices.json

Where int4 loses quality on a real model, this says which knob does it (docs/real-weights.md tabulates the
figures). Each variant is built with `python -m onnxruntime_genai.models.builder` and the options phi-pipeline's
export spec sets (workflows/export.py: op_types_to_quantize MatMul and Gather, symmetric, accuracy level 4,
block 32; shared_embeddings false where the tied LM head leaves int4), then run whole-sequence on the CPU EP.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROSE = ROOT / "pipelines/data/heldout/prose.txt"
TASKS = ("tone", "antonyms", "extract")
DEFAULTS = {"block_size": 32, "accuracy_level": 4, "is_symmetric": "true", "op_types_to_quantize": "MatMul/Gather"}
UNTIED_INT8_HEAD = {"shared_embeddings": "false", "matmul_mixed_precision": "last_matmul:int8"}
MIXED = {"shared_embeddings": "false", "matmul_mixed_precision": "last_matmul:int8,mixed_layers:int8"}
# name -> (precision, options changed from DEFAULTS): one knob at a time, then the combinations that pay.
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "fp32": ("fp32", {}),
    "int8 (every MatMul)": ("int8", {}),
    "int4 rtn b32 (spec default)": ("int4", {}),
    "int4 rtn b64": ("int4", {"block_size": "64"}),
    "int4 rtn b128": ("int4", {"block_size": "128"}),
    "int4 rtn b32 accuracy 1 (fp32 activations)": ("int4", {"accuracy_level": "1"}),
    "int4 rtn b32 embeddings fp32, head int4": ("int4", {"shared_embeddings": "false", "op_types_to_quantize": "MatMul"}),
    "int4 rtn b32 head int8": ("int4", UNTIED_INT8_HEAD),
    "int4 k_quant b32": ("int4", {"algo_config": "k_quant"}),
    "int4 k_quant b32 head int8": ("int4", {"algo_config": "k_quant", **UNTIED_INT8_HEAD}),
    "int4 k_quant b32 head int8, mixed layers int8": ("int4", {"algo_config": "k_quant", **MIXED}),
    "int4 k_quant b32 head int8, mixed layers int8, accuracy 1": ("int4", {"algo_config": "k_quant", **MIXED,
                                                                           "accuracy_level": "1"}),
    "int4 rtn b32 head int8, mixed layers int8": ("int4", MIXED),
    "int4 k_quant b16 head int8": ("int4", {"algo_config": "k_quant", "block_size": "16", **UNTIED_INT8_HEAD}),
    "int4 rtn b16 head int8, mixed layers int8": ("int4", {"block_size": "16", **MIXED}),
    "int4 rtn b32 asymmetric head int8, mixed layers int8": ("int4", {"is_symmetric": "false", **MIXED}),
}


def sequences(tokenizer, window: int = 256) -> dict[str, list[list[int]]]:
    """Held-out prose in windows, and each task's eval rows as the chat/text the adapters train on."""
    prose = tokenizer(PROSE.read_text())["input_ids"]
    out = {"prose": [prose[i:i + window] for i in range(0, len(prose) - 1, window)]}
    rows = []
    for task in TASKS:
        for line in (ROOT / f"pipelines/data/{task}/eval.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "messages" in r:
                rows.append(tokenizer.apply_chat_template(r["messages"], tokenize=False))
            else:
                rows.append(f"Opposite: {r['input']}\nAnswer: {r['output']}")
    out["eval rows"] = [tokenizer(t)["input_ids"] for t in rows]
    return out


def torch_logits(model_dir: Path, seqs: list[list[int]]) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0].numpy() for s in seqs]


def onnx_logits(folder: Path, seqs: list[list[int]]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    inputs = {i.name for i in session.get_inputs()}
    empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
    out = []
    for s in seqs:
        feed = {"input_ids": np.array([s], np.int64), "attention_mask": np.ones((1, len(s)), np.int64)}
        feed |= {f"past_key_values.{i}.{kv}": empty for i in range(decoder["num_hidden_layers"]) for kv in ("key", "value")}
        out.append(session.run(["logits"], {k: v for k, v in feed.items() if k in inputs})[0][0].astype(np.float32))
    return out


def nll(logits: list[np.ndarray], seqs: list[list[int]]) -> float:
    """Mean negative log-likelihood of each next token (the evaluation's token_nll, float64)."""
    from phi_pipeline.evaluate.onnx_side import token_nll

    return sum(token_nll(lg[:-1], s[1:]) for lg, s in zip(logits, seqs)) / sum(len(s) - 1 for s in seqs)


def build(model_dir: Path, out: Path, precision: str, options: dict[str, str]) -> float:
    opts = {**DEFAULTS, **options} if precision == "int4" else {}
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / "hf-cache")]
    if opts:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in opts.items())]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--work", type=Path, default=ROOT / ".phi-pipeline/bench/int4-choices")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/int4-choices.json")
    parser.add_argument("--only", help="measure only the variants whose name contains this text (and fp32)")
    args = parser.parse_args()
    variants = {k: v for k, v in VARIANTS.items() if args.only is None or args.only in k or k == "fp32"}
    from transformers import AutoTokenizer

    sets = sequences(AutoTokenizer.from_pretrained(args.model_dir))
    reference = {name: torch_logits(args.model_dir, seqs) for name, seqs in sets.items()}
    ref_nll = {name: nll(reference[name], seqs) for name, seqs in sets.items()}
    print(f"PyTorch fp32: perplexity prose {math.exp(ref_nll['prose']):.2f}, eval rows {math.exp(ref_nll['eval rows']):.2f}")
    results = []
    for name, (precision, options) in variants.items():
        folder = args.work / name.replace(" ", "_").replace(",", "")
        seconds = build(args.model_dir, folder, precision, options) if not (folder / "model.onnx").is_file() else None
        row = {"variant": name, "precision": precision, "options": {**DEFAULTS, **options} if precision == "int4" else {},
               "size_mb": round(sum(f.stat().st_size for f in folder.glob("model.onnx*")) / 1e6, 1),
               "build_s": None if seconds is None else round(seconds, 1)}
        for set_name, seqs in sets.items():
            logits = onnx_logits(folder, seqs)
            agree = np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(logits, reference[set_name])]))
            row[set_name] = {"perplexity_ratio": round(math.exp(nll(logits, seqs) - ref_nll[set_name]), 4),
                             "top1_agreement": round(float(agree), 4)}
        results.append(row)
        print(f"{name:48s} {row['size_mb']:7.1f} MB  prose ppl x{row['prose']['perplexity_ratio']:.3f} "
              f"agree {row['prose']['top1_agreement']:.3f}  eval rows ppl x{row['eval rows']['perplexity_ratio']:.3f} "
              f"agree {row['eval rows']['top1_agreement']:.3f}", flush=True)
    args.out.write_text(json.dumps({"model": str(args.model_dir), "reference_perplexity":
                                    {k: round(math.exp(v), 3) for k, v in ref_nll.items()}, "variants": results}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
