"""`phi-pipeline generate`: one prompt through a published bundle with ONNX Runtime GenAI alone (no
torch), formatted the way the chosen adapter was trained (phi_pipeline.runtime.genai does the work)."""

from __future__ import annotations

from pathlib import Path

from phi_pipeline.errors import UsageError
from phi_pipeline.runtime.genai import BundleModel, PromptFormatError


def generate_cli(
    bundle: str, prompt: str, *, adapter: str | None, max_new_tokens: int, raw: bool, threads: int | None = None
) -> int:
    model = BundleModel(Path(bundle), threads=threads, variant=adapter)
    model.check_adapter(adapter)
    try:
        text = prompt if raw else model.user_prompt(prompt, adapter)
    except PromptFormatError as exc:
        raise UsageError("--prompt", [f"{exc} (--raw)"]) from None
    print(model.generate(text, adapter, max_new_tokens))
    return 0
