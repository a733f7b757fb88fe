"""`phi-pipeline bench BUNDLE` / `python -m phi_pipeline.bench BUNDLE`: flags and entry point."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from phi_pipeline.errors import UsageError


def _prompt_lens(text: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated token counts, e.g. 64,512") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: token counts must be >= 1")
    return lengths


def add_arguments(p: argparse.ArgumentParser) -> None:
    from phi_pipeline.bench.models import SIZES

    p.add_argument("bundle", type=Path, help="published bundle to benchmark, e.g. dist/tiny-phi3/cpu; its tokenizer "
                   "also serves the benchmark model")
    p.add_argument("--size", default="150m", choices=list(SIZES),
                   help="benchmark model: random weights, Phi-3's 32064-token vocabulary, Phi-3-shaped "
                   "(150m: 768 hidden x 12 layers, default; 300m: 1024 x 18; phi3-mini: 3072 x 32, for --device cuda) "
                   "or Llama-shaped (llama-150m)")
    p.add_argument("--reps", type=int, default=3, help="timed requests per configuration and prompt length (default 3)")
    p.add_argument("--prompt-lens", type=_prompt_lens, default=(64, 512), help="prompt lengths in tokens (default 64,512)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: export for the cuda target and run there; skipped with a note when no GPU is present")
    p.add_argument("--out", type=Path, default=Path("bench"), help="where results.json, report.md and the chart go")
    p.add_argument("--work-dir", type=Path, default=Path(".phi-pipeline/bench"),
                   help="benchmark models, bundles and per-configuration logs (reused base when unchanged)")
    p.add_argument("--pipeline-reps", type=int, default=1,
                   help="runs of the tiny pipeline and of the same Olive workflows by hand (0 skips; default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="intra-op threads of the tuned configurations (default: the core count)")
    p.add_argument("--peer", choices=["llama.cpp"],
                   help="also build llama.cpp once (cmake, minutes) and run it against the int4 bundle in the same "
                   "rounds: decode, first token, size, adapter cost (needs the `peer` extra: sentencepiece)")
    p.add_argument("--peer-rounds", type=int, default=5,
                   help="interleaved rounds of the peer comparison, each running every row once (default 5)")
    p.add_argument("--peer-sizes", type=lambda v: tuple(x for x in v.split(",") if x), default=("llama-150m",),
                   help="more bench bases the peer comparison also runs on, comma-separated (default llama-150m: the "
                   "150m sizes in Llama's layout, q/k/v and gate/up separate; empty: none)")


def bench_cli(args: argparse.Namespace) -> int:
    from phi_pipeline.bench.models import SIZES
    from phi_pipeline.bench.options import BenchOptions
    from phi_pipeline.bench.run import run_bench

    unknown = [s for s in args.peer_sizes if s not in SIZES]
    if unknown:
        raise UsageError("phi-pipeline bench", [f"--peer-sizes: unknown size(s) {', '.join(unknown)}; choose from "
                                                f"{', '.join(SIZES)}"])
    if not (args.bundle / "manifest.json").is_file():
        raise UsageError(str(args.bundle), ["no manifest.json here; give a folder published by phi-pipeline run"])
    if args.reps < 1 or args.new_tokens < 2 or args.pipeline_reps < 0 or args.threads < 1 or args.peer_rounds < 1:
        raise UsageError("phi-pipeline bench", ["--reps, --threads and --peer-rounds must be >= 1, --new-tokens >= 2, "
                                                "--pipeline-reps >= 0"])
    run_bench(BenchOptions(
        bundle=args.bundle, out_dir=args.out, size=args.size, reps=args.reps, prompt_lens=args.prompt_lens,
        new_tokens=args.new_tokens, device=args.device, work_dir=args.work_dir, pipeline_reps=args.pipeline_reps,
        threads=args.threads, peer=args.peer, peer_rounds=args.peer_rounds, peer_sizes=args.peer_sizes,
    ))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phi_pipeline.bench", description=__doc__)
    add_arguments(parser)
    try:
        return bench_cli(parser.parse_args(argv))
    except UsageError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
