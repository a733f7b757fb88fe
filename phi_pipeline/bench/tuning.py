"""What was tried to close the gap to llama.cpp (GitHub issue 12), measured in the peer's rounds.

Each variant differs from the int4 bundle as shipped in one thing: a Model Builder option (a new
export through the pipeline's export workflow), a decoder session option laid over the bundle's
genai_config.json, or the graph without LoRA inputs (the r8 adapter merged into the weights). It
runs once in every peer round, so its ratios pair runs of the same round; rows run in a seeded random
order in each round (evaluate/speed.py's measure_rounds), and a control row runs the shipped bundle a second time
through the variants' own path: its ratios are the noise floor of the table.
A variant's verdict is computed, never written by hand: `faster` where, at every prompt length, the
median paired decode ratio is above 1 + NOISE and the variant was faster in at least CONSISTENT of the
rounds; `slower` the same way down; else `no measurable change`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from phi_pipeline.evaluate.speed import verdict
from phi_pipeline.evaluate.stats import paired_ratio, per_round_ratios, summary



@dataclass(frozen=True)
class Variant:
    name: str
    change: str
    """What differs from the shipped bundle, in words (the report's column)."""
    export: dict[str, Any] = field(default_factory=dict)
    """ExportSpec fields overriding the shipped export (a new export)."""
    session: dict[str, Any] = field(default_factory=dict)
    """Decoder session options over the bundle's own (string values are onnxruntime config entries)."""
    merged: bool = False
    """The benchmark-model section's merged variant: r8 folded into the weights, no LoRA inputs."""
    rounds: int | None = None
    """Run in the first `rounds` peer rounds only (None: all): for a variant so slow that every round
    of it would take minutes."""


CONTROL = Variant("control: shipped again", "nothing: the shipped bundle once more, through this table's own path "
                  "(the noise floor of its ratios)")
VARIANTS = (
    CONTROL,
    Variant("accuracy level 1", "MatMulNBits on fp32 activations (shipped: level 4, int8 activations)",
            export={"int4_accuracy_level": 1}),
    Variant("asymmetric", "asymmetric int4 with zero points (shipped: symmetric)", export={"int4_symmetric": False}),
    Variant("fp32 embeddings", "embedding table left fp32 (shipped: int4 Gather)", export={"int4_quantize_embeddings": False}),
    Variant("unpacked projections", "q/k/v and gate/up as Model Builder leaves them (shipped: packed)",
            export={"pack_projections": False}),
    Variant("no spinning", "intra-op threads do not spin between kernels (session.intra_op.allow_spinning 0)",
            session={"session.intra_op.allow_spinning": "0"}),
    Variant("dynamic block base 4", "intra-op work split in dynamic blocks (session.dynamic_block_base 4)",
            session={"session.dynamic_block_base": "4"}),
    Variant("no prepacking", "weights not prepacked at load (session.disable_prepacking 1)",
            session={"session.disable_prepacking": "1"}, rounds=2),  # about 3 tok/s: 80 s a round
    Variant("graph optimization extended", "graph_optimization_level ORT_ENABLE_EXTENDED (onnxruntime's default: ALL)",
            session={"graph_optimization_level": "ORT_ENABLE_EXTENDED"}),
    Variant("no LoRA inputs", "the graph without LoRA inputs (r8 merged into the weights: a full model per adapter)",
            merged=True),
)


def row_name(variant: Variant) -> str:
    return f"tried: {variant.name}"


def slug(variant: Variant) -> str:
    """The variant's name as a folder / file name."""
    return "".join(c if c.isalnum() else "-" for c in variant.name)


@dataclass(frozen=True)
class TunedModel:
    variant: Variant
    model: Path
    """The model folder the variant runs."""
    session_options: dict[str, Any]


def prepare(
    shipped: Path, export: Callable[[Variant], Path], merged: Callable[[], Path], variants: tuple[Variant, ...] = VARIANTS
) -> list[TunedModel]:
    """Each variant's model folder and session options. `export(variant)` publishes a bundle with the
    variant's export options, `merged()` the merged variant; session options start from `shipped`'s
    decoder options so that every variant runs on the same threads as the bundle as shipped."""
    options = json.loads((shipped / "genai_config.json").read_text())["model"]["decoder"].get("session_options", {})
    out = []
    for v in variants:
        model = merged() if v.merged else export(v) if v.export else shipped
        out.append(TunedModel(v, model, options | v.session))
    return out


def summarize(
    tuned: list[TunedModel], rounds: dict[str, list[dict[str, Any]]], shipped: str, peer: str, sizes: dict[str, int],
    prompt_lens: tuple[int, ...],
) -> list[dict[str, Any]]:
    """Per variant: paired ratios against the shipped bundle and llama.cpp, size, verdict."""
    lens = list(map(str, prompt_lens))
    out = []
    for t in tuned:
        runs = rounds[row_name(t.variant)]
        per_round = {n: per_round_ratios(runs, rounds[shipped], n, "decode_tok_s") for n in lens}
        out.append({
            "name": t.variant.name,
            "change": t.variant.change,
            "export": t.variant.export,
            "session": t.variant.session,
            "merged": t.variant.merged,
            "model": str(t.model),
            "size_bytes": sizes.get(t.variant.name),
            "decode_tok_s": {n: summary([r[n]["decode_tok_s"] for r in runs if n in r], digits=4) for n in lens},
            "decode_vs_shipped": {n: summary(r) for n, r in per_round.items()},
            "faster_than_shipped_in": {n: f"{sum(x > 1 for x in r)}/{len(r)}" for n, r in per_round.items()},
            "first_token_speed_vs_shipped": {n: paired_ratio(runs, rounds[shipped], n, "ttft_s", invert=True) for n in lens},
            "decode_vs_llama_q4_0": {n: paired_ratio(runs, rounds[peer], n, "decode_tok_s") for n in lens},
            "verdict": verdict(list(per_round.values())),
        })
    return out
