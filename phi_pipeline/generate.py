"""Run a published bundle with ONNX Runtime GenAI alone (no torch): one loaded model, adapters
swapped per request, prompts formatted the way each adapter was trained."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from phi_pipeline.bundle import MANIFEST, variant_dir
from phi_pipeline.errors import UsageError


class BundleModel:
    """A bundle loaded once; every adapter in its manifest loaded once and switchable per call."""

    def __init__(self, bundle: Path, *, intra_op_threads: int | None = None, variant: str | None = None):
        """`variant`: for a merged bundle (one model per adapter), which adapter's model to load."""
        import onnxruntime_genai as og

        self.og = og
        self.bundle = Path(bundle)
        try:
            self.manifest: dict[str, Any] = json.loads((self.bundle / MANIFEST).read_text())
        except FileNotFoundError:
            raise UsageError(str(bundle), [f"no {MANIFEST} here; give a folder published by phi-pipeline run"]) from None
        model_dir = self.bundle
        self.merged_variant = None
        if self.manifest.get("layout") == "merged":
            names = [a["name"] for a in self.manifest["adapters"]]
            if variant not in names:
                raise UsageError(
                    str(bundle), [f"this bundle has one model per adapter ({', '.join(names)}); choose one with --adapter"]
                )
            model_dir, self.merged_variant = self.bundle / variant_dir(variant), variant
        config = og.Config(str(model_dir))
        self.cpu_fallback = self._needs_cpu_fallback(self.manifest.get("execution_provider", "CPUExecutionProvider"))
        if self.cpu_fallback:
            # e.g. a webgpu or cuda bundle checked on a CPU-only build machine: same graph, CPU kernels
            config.clear_providers()
        if intra_op_threads:
            config.overlay(
                json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": intra_op_threads}}}})
            )
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.adapters = og.Adapters(self.model)
        self.formats: dict[str, dict[str, Any]] = {}
        for a in self.manifest["adapters"]:
            if "file" in a:
                self.adapters.load(str(self.bundle / a["file"]), a["name"])
                self.formats[a["name"]] = a["prompt_format"]
            elif a["name"] == self.merged_variant:
                self.formats[a["name"]] = a["prompt_format"]

    @staticmethod
    def _needs_cpu_fallback(provider: str) -> bool:
        import onnxruntime

        return provider != "CPUExecutionProvider" and provider not in onnxruntime.get_available_providers()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.formats)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def prompt_for(self, example_prompt: str | list[dict[str, str]], adapter: str | None) -> str:
        """The exact text an adapter saw in training before its answer.

        example_prompt is chat messages (chat data) or the template's text before the answer.
        """
        if isinstance(example_prompt, list):
            return self.chat_prompt(example_prompt)
        fmt = self.formats.get(adapter or "", {})
        bos = fmt.get("bos")
        return f"{bos} {example_prompt}" if bos else example_prompt

    def user_prompt(self, text: str, adapter: str | None) -> str:
        """Format a user's free text like the adapter's training data (chat for the base model)."""
        fmt = self.formats.get(adapter or "", {"type": "chat"})
        if fmt["type"] == "chat":
            return self.chat_prompt([{"role": "user", "content": text}])
        fields = [f for _, f, _, _ in string.Formatter().parse(fmt["prefix"]) if f]
        if len(set(fields)) != 1:
            raise UsageError(
                "--prompt", [f"adapter {adapter!r} formats several fields {fields}; pass the full text with --raw"]
            )
        return self.prompt_for(fmt["prefix"].format(**{fields[0]: text}), adapter)

    def generate(self, prompt: str, adapter: str | None = None, max_new_tokens: int = 64) -> str:
        """Greedy completion of `prompt` (already formatted), with `adapter` active or none."""
        if adapter is not None and adapter not in self.formats:
            raise UsageError(str(self.bundle), [f"no adapter {adapter!r}; this bundle has {', '.join(self.formats)}"])
        tokens = self.tokenizer.encode(prompt)
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(tokens) + max_new_tokens)
        generator = self.og.Generator(self.model, params)
        if adapter is not None and self.merged_variant is None:  # a merged model has its adapter built in
            generator.set_active_adapter(self.adapters, adapter)
        generator.append_tokens(tokens)
        while not generator.is_done():
            generator.generate_next_token()
        new = generator.get_sequence(0)[len(tokens) :]
        return self.tokenizer.decode(new).strip()


def generate_cli(
    bundle: str, prompt: str, *, adapter: str | None, max_new_tokens: int, raw: bool, threads: int | None = None
) -> int:
    model = BundleModel(Path(bundle), intra_op_threads=threads, variant=adapter)
    text = prompt if raw else model.user_prompt(prompt, adapter)
    print(model.generate(text, adapter, max_new_tokens))
    return 0
