"""What the serve tests share: a tiny random multi-adapter bundle built in seconds, and the real
server (uvicorn) started on port 0 in a thread of the test process (phi_pipeline.serve.server.running)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from phi_pipeline.serve.server import running  # noqa: F401  (the serve tests' way to start a server)

PHI3_MODULES = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
# random_bundle's adapters: "chatty" is declared a chat adapter, "templ" keeps its text template
CHAT_ADAPTER, TEMPLATE_ADAPTER = "chatty", "templ"
# different ranks: the batched engine concatenates a step's adapters along the rank axis and masks each row
RANKS = {CHAT_ADAPTER: 4, TEMPLATE_ADAPTER: 8}


def _olive_in_process(config_path: Path, log_path: Path, expected_outputs, **_kwargs) -> float:
    from olive.workflows import run as olive_run

    from phi_pipeline.orchestration.olive_compat import apply

    apply()
    olive_run(json.loads(Path(config_path).read_text()))
    assert all(Path(p).exists() for p in expected_outputs)
    return 0.0


def build_random_bundle(work: Path) -> Path:
    """A published bundle of the bench's tiny random Phi-3 (2 layers, hidden 64) with the tiny base's
    byte-level tokenizer and chat template and two random LoRA adapters, exported by the pipeline's
    own code (phi_pipeline.bench.models.export_bundle), Olive run in this process."""
    import pytest

    import phi_pipeline.orchestration.runner
    from phi_pipeline.bench.models import SIZES, build_bench_base, export_bundle, make_random_adapter
    from phi_pipeline.tiny.base_model import train_tokenizer

    tokenizer = work / "tokenizer"
    train_tokenizer(SIZES["tiny"].vocab_size).save_pretrained(tokenizer)
    base = build_bench_base(work / "base", SIZES["tiny"], tokenizer)
    adapters = {
        name: make_random_adapter(base, work / name, r=RANKS[name], seed=seed, target_modules=PHI3_MODULES)
        for seed, name in enumerate((CHAT_ADAPTER, TEMPLATE_ADAPTER))
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(phi_pipeline.orchestration.runner, "run_olive", _olive_in_process)
        bundle = export_bundle(base, adapters, RANKS, "int4", work / "export").bundle
    # The bench spec trains every adapter from a text template; declare one a chat adapter so both
    # prompt formats are served (the weights are random either way).
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for a in manifest["adapters"]:
        if a["name"] == CHAT_ADAPTER:
            a["prompt_format"] = {"type": "chat"}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return bundle


def client(url: str, api_key: str = "none", **kwargs):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)


def pace(monkeypatch, seconds: float) -> None:
    """Every decode step of either engine takes `seconds` longer: requests long enough to overlap however
    the client threads get scheduled, or tokens far enough apart to be seen one by one."""
    from phi_pipeline.runtime.batched import BatchedDecoder
    from phi_pipeline.runtime.genai import Generation

    for cls, name in ((Generation, "step"), (BatchedDecoder, "decode")):
        real = getattr(cls, name)

        def slow(self, *args, _real=real, **kwargs):
            time.sleep(seconds)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, slow)


def write_random_adapter(like: Path, out: Path, rank: int, seed: int, scale: float = 0.05) -> Path:
    """An .onnx_adapter with the inputs of `like`, random weights (standard deviation `scale`) at another rank."""
    import numpy as np
    import onnxruntime

    from phi_pipeline.runtime.batched import read_adapter

    rng = np.random.default_rng(seed)
    params = {}
    for name, w in read_adapter("like", like).weights.items():
        shape = (w.shape[0], rank) if "lora_A" in name else (rank, w.shape[1])
        params[name] = onnxruntime.OrtValue.ortvalue_from_numpy((rng.standard_normal(shape) * scale).astype(np.float32))
    adapter = onnxruntime.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(params)
    adapter.export_adapter(str(out))
    return out
