"""The reference side: the same questions asked of transformers + PEFT in fp32 (torch imported lazily)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

SMALL_MODEL_PARAMS = 50_000_000


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
