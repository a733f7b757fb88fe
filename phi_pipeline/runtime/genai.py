"""The one wrapper over onnxruntime-genai: `generate`, `eval`, `bench` and `serve` all run a bundle
through it.

- `GenaiModel`: one model folder loaded (threads, execution provider, session options), its
  tokenizer and an adapter container; `start()` opens a `Generation` for one request.
- `BundleModel`: a published bundle (manifest.json): CPU fallback for a bundle built for an
  execution provider this machine lacks, one model per adapter for merged bundles, every adapter
  loaded once, and prompts formatted the way each adapter was trained.
- `Generation`: one request on its own generator with its own active adapter, advanced a prompt
  chunk or a token at a time so that one thread can interleave many (the serve engine does).

onnxruntime-genai is not thread-safe and its Python calls hold the GIL: use one model from one
thread.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from phi_pipeline.bundle.layout import MANIFEST, variant_dir
from phi_pipeline.errors import UsageError

if TYPE_CHECKING:
    from phi_pipeline.runtime.teacher_forcing import FullLogits


class PromptFormatError(ValueError):
    """A user's text cannot be put into an adapter's training format."""


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one request; all None: the model folder's genai_config.json search
    defaults (greedy for phi-pipeline bundles)."""

    temperature: float | None = None
    """0: greedy; > 0: sample at this temperature."""
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def search_options(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False}
        if self.temperature is None and self.top_p is None and self.top_k is None:
            return {} if self.seed is None else {"random_seed": self.genai_seed}
        options: dict[str, Any] = {"do_sample": True, "temperature": 1.0 if self.temperature is None else self.temperature}
        # genai_config's top_k would otherwise cut the distribution that an OpenAI client expects whole
        options["top_k"] = self.top_k if self.top_k is not None else 0
        options["top_p"] = self.top_p if self.top_p is not None else 1.0
        if self.seed is not None:
            options["random_seed"] = self.genai_seed
        return options

    @property
    def genai_seed(self) -> int | None:
        """The seed as onnxruntime-genai takes it: a non-negative 32-bit int (its binding refuses a wider one,
        and it draws a random seed for any negative one). Other seeds (OpenAI's are signed 64-bit) are folded
        into that range by a hash, so that each stays a seed: the same seed gives the same output, and seeds
        that differ only in their high bits or sign still differ."""
        if self.seed is None or 0 <= self.seed < 2**31:
            return self.seed
        digest = hashlib.blake2b(self.seed.to_bytes(16, "little", signed=True), digest_size=4).digest()
        return int.from_bytes(digest, "little") & 0x7FFFFFFF


GREEDY = Sampling(temperature=0)


def needs_cpu_fallback(provider: str) -> bool:
    """True when a bundle built for `provider` must run on CPU kernels here (same graph)."""
    import onnxruntime

    return provider != "CPUExecutionProvider" and provider not in onnxruntime.get_available_providers()


class GenaiModel:
    """One onnxruntime-genai model folder, loaded once, with an adapter container."""

    def __init__(
        self,
        model_dir: Path | str,
        *,
        threads: int | None = None,
        provider: str | None = None,
        session_options: dict[str, Any] | None = None,
    ):
        """threads: the decoder's intra_op_num_threads (None: genai_config.json's, which for phi-pipeline's
        CPU bundles is every core; onnxruntime-genai's own default is one thread); provider: None keeps genai_config.json's, "cpu" clears it (CPU kernels), any other
        name replaces it (e.g. "cuda")."""
        import onnxruntime_genai as og

        self.og = og
        self.model_dir = Path(model_dir)
        self.threads = threads
        self.adapter_files: dict[str, Path] = {}
        """adapter name -> .onnx_adapter file, for what reads the weights outside onnxruntime-genai"""
        config = og.Config(str(self.model_dir))
        if provider is not None:
            config.clear_providers()
            if provider != "cpu":
                config.append_provider(provider)
        options = dict(session_options or {})
        if threads:
            options["intra_op_num_threads"] = threads
        if options:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.adapters = og.Adapters(self.model)
        genai = json.loads((self.model_dir / "genai_config.json").read_text())["model"]
        self.vocab_size: int = genai["vocab_size"]
        self.context_length: int = genai["context_length"]

    @cached_property
    def tokenizer(self) -> Any:
        return self.og.Tokenizer(self.model)

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(int(t) for t in self.tokenizer.eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(np.asarray(ids, dtype=np.int32))

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The model's chat template applied to `messages`, ready for the assistant's turn."""
        return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def active_adapter(self, adapter: str | None) -> str | None:
        """The adapter to activate on a generator for a request that asks for `adapter`."""
        return adapter

    def start(
        self,
        prompt: Sequence[int],
        adapter: str | None = None,
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
        *,
        min_new_tokens: int = 0,
    ) -> "Generation":
        """A new request: its own generator, KV cache sized for prompt + max_new_tokens only."""
        return Generation(self, prompt, self.active_adapter(adapter), max_new_tokens, sampling, min_new_tokens)

    def generate_ids(
        self, prompt: Sequence[int], adapter: str | None, max_new_tokens: int, sampling: Sampling = GREEDY
    ) -> list[int]:
        """New token ids, the end-of-sequence token included when one was produced."""
        generation = self.start(prompt, adapter, max_new_tokens, sampling)
        generation.feed()
        while not generation.done:
            generation.step()
        return generation.new_tokens

    @cached_property
    def prunes_logits(self) -> bool:
        """True when the graph gives logits for the last position of a run only (Model Builder's
        `prune_lm_head`: the logits output is [batch, 1, vocab])."""
        import onnx

        decoder = json.loads((self.model_dir / "genai_config.json").read_text())["model"]["decoder"]
        graph = onnx.load(str(self.model_dir / decoder["filename"]), load_external_data=False).graph
        logits = next(o for o in graph.output if o.name == "logits")
        return logits.type.tensor_type.shape.dim[1].dim_value == 1

    def logits(self, ids: Sequence[int], adapter: str | None, first: int = 0) -> np.ndarray:
        """(len(ids) - first, vocab): the teacher-forced logits at positions first.. of `ids`, row i
        predicting the token after ids[first + i]: one run over `ids`. A full graph runs in onnxruntime-genai;
        a pruned one (prefill computes the LM head for the last position only) runs with the prune undone
        (teacher_forcing.py), where genai would need one run per position."""
        if not 0 <= first < len(ids):
            raise ValueError(f"first={first} is outside the {len(ids)} ids")
        if self.prunes_logits:
            return self._full_logits(ids, self.active_adapter(adapter), first)
        generation = self.start(ids, adapter, 1)
        generation.feed()
        return np.asarray(generation.generator.get_output("logits"))[0, first:].astype(np.float32)

    @cached_property
    def _full_logits(self) -> "FullLogits":
        from phi_pipeline.runtime.teacher_forcing import FullLogits

        return FullLogits(self.model_dir, self.adapter_files, self.threads)


def decoder_threads(model_dir: Path, threads: int | None) -> str:
    """The decoder's intra-op threads in words: `threads` when given, else what genai_config.json says."""
    if threads:
        return str(threads)
    genai = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]
    configured = genai["decoder"].get("session_options", {}).get("intra_op_num_threads")
    if configured is None:
        return "1 (onnxruntime-genai's default)"
    return "every core" if configured == 0 else str(configured)


class Generation:
    """One request on its own generator: `feed()` the prompt (in chunks if asked), then `step()`
    one token at a time until `done`."""

    def __init__(
        self, owner: GenaiModel, prompt: Sequence[int], adapter: str | None, max_new_tokens: int,
        sampling: Sampling, min_new_tokens: int = 0,
    ):
        og = owner.og
        self.prompt = np.asarray(prompt, dtype=np.int32)
        self.max_new_tokens = max_new_tokens
        params = og.GeneratorParams(owner.model)
        total = len(self.prompt) + max_new_tokens
        options: dict[str, Any] = {"max_length": total, **sampling.search_options()}
        if min_new_tokens:
            options["min_length"] = len(self.prompt) + min_new_tokens
        params.set_search_options(**options)
        self.generator = og.Generator(owner.model, params)
        if adapter is not None:
            self.generator.set_active_adapter(owner.adapters, adapter)
        self.fed = 0
        self.new_tokens: list[int] = []

    @property
    def prefilled(self) -> bool:
        return self.fed == len(self.prompt)

    def feed(self, chunk: int | None = None) -> bool:
        """Append the next `chunk` prompt tokens (all that are left when None); True once the
        whole prompt is in. Each call is one model run over its tokens."""
        end = len(self.prompt) if chunk is None else min(len(self.prompt), self.fed + chunk)
        if end > self.fed:
            self.generator.append_tokens(self.prompt[self.fed:end])
            self.fed = end
        return self.prefilled

    def step(self) -> int:
        """Generate one token (the prompt must be in) and return it."""
        self.generator.generate_next_token()
        token = int(self.generator.get_next_tokens()[0])
        self.new_tokens.append(token)
        return token

    @property
    def done(self) -> bool:
        return self.generator.is_done()


class BundleModel(GenaiModel):
    """A published bundle loaded once; every adapter in its manifest loaded once and switchable per
    request."""

    def __init__(self, bundle: Path | str, *, threads: int | None = None, variant: str | None = None):
        """`variant`: for a merged bundle (one model per adapter), which adapter's model to load."""
        self.bundle = Path(bundle)
        try:
            self.manifest: dict[str, Any] = json.loads((self.bundle / MANIFEST).read_text())
        except FileNotFoundError:
            raise UsageError(str(bundle), [f"no {MANIFEST} here; give a folder published by phi-pipeline run"]) from None
        model_dir = self.bundle
        self.merged_variant: str | None = None
        if self.manifest.get("layout") == "merged":
            names = [a["name"] for a in self.manifest["adapters"]]
            if variant not in names:
                raise UsageError(
                    str(bundle), [f"this bundle has one model per adapter ({', '.join(names)}); choose one with --adapter"]
                )
            model_dir, self.merged_variant = self.bundle / variant_dir(variant), variant
        # e.g. a webgpu or cuda bundle checked on a CPU-only build machine: same graph, CPU kernels
        self.cpu_fallback = needs_cpu_fallback(self.manifest.get("execution_provider", "CPUExecutionProvider"))
        super().__init__(model_dir, threads=threads, provider="cpu" if self.cpu_fallback else None)
        self.formats: dict[str, dict[str, Any]] = {}
        for a in self.manifest["adapters"]:
            if "file" in a:
                self.adapters.load(str(self.bundle / a["file"]), a["name"])
                self.adapter_files[a["name"]] = self.bundle / a["file"]
                self.formats[a["name"]] = a["prompt_format"]
            elif a["name"] == self.merged_variant:
                self.formats[a["name"]] = a["prompt_format"]

    @property
    def name(self) -> str:
        """The base model's id: the pipeline's name."""
        return self.manifest["pipeline"]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.formats)

    def check_adapter(self, adapter: str | None) -> None:
        if adapter is None and self.merged_variant is not None:
            raise UsageError(str(self.bundle), [f"this model is adapter {self.merged_variant!r} merged into the base; "
                                                "it has no base model to run"])
        if adapter is not None and adapter not in self.formats:
            raise UsageError(str(self.bundle), [f"no adapter {adapter!r}; this bundle has {', '.join(self.formats)}"])

    def active_adapter(self, adapter: str | None) -> str | None:
        self.check_adapter(adapter)
        return None if self.merged_variant is not None else adapter  # a merged model has its adapter built in

    def prompt_format(self, adapter: str | None) -> dict[str, Any]:
        """The manifest's prompt format of `adapter`; the base model is chatted with."""
        return self.formats.get(adapter or "", {"type": "chat"})

    def prompt_for(self, example_prompt: str | list[dict[str, str]], adapter: str | None) -> str:
        """The exact text an adapter saw in training before its answer.

        example_prompt is chat messages (chat data) or the template's text before the answer.
        """
        if isinstance(example_prompt, list):
            return self.chat_prompt(example_prompt)
        bos = self.prompt_format(adapter).get("bos")
        return f"{bos} {example_prompt}" if bos else example_prompt

    def user_prompt(self, text: str, adapter: str | None) -> str:
        """Format a user's free text like the adapter's training data (chat for the base model)."""
        return self.messages_prompt([{"role": "user", "content": text}], adapter)

    def messages_prompt(self, messages: list[dict[str, str]], adapter: str | None) -> str:
        """A chat request as `adapter` was trained: the chat template for chat adapters (and the base
        model); for template adapters, the last user message put into the adapter's template."""
        fmt = self.prompt_format(adapter)
        if fmt["type"] == "chat":
            return self.chat_prompt(messages)
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise PromptFormatError(f"adapter {adapter!r} is a text-template adapter; give a user message for its template")
        fields = [f for _, f, _, _ in string.Formatter().parse(fmt["prefix"]) if f]
        if len(set(fields)) != 1:
            raise PromptFormatError(
                f"adapter {adapter!r} formats several fields {fields}; send the full text as a raw prompt instead"
            )
        return self.prompt_for(fmt["prefix"].format(**{fields[0]: users[-1]}), adapter)

    def generate(self, prompt: str, adapter: str | None = None, max_new_tokens: int = 64) -> str:
        """Greedy completion of `prompt` (already formatted), with `adapter` active or none."""
        new = self.generate_ids(self.encode(prompt), adapter, max_new_tokens)
        return self.decode([t for t in new if t not in self.eos_token_ids]).strip()
