"""`phi-pipeline`: argument parsing only; each subcommand calls one function of the package.

Exit codes: 0 success, 1 a stage failed (or, with --no-wait, another run holds the lock),
2 bad input (spec, data, arguments), 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from phi_pipeline.errors import PipelineError, Terminated, UsageError
from phi_pipeline.orchestration.executors import EXECUTORS
from phi_pipeline.pipeline_spec.targets import TARGETS

SHIPPED_SPECS = Path("pipelines")


def _scale_out(args: argparse.Namespace):
    """The launch settings and the executor of --nproc-per-node ... and --executor."""
    from phi_pipeline.orchestration.distributed import Launch
    from phi_pipeline.orchestration.executors import make_executor
    from phi_pipeline.pipeline_spec.schema import load_spec

    launch = Launch(args.nproc_per_node, args.nnodes, args.node_rank, args.master_addr, args.master_port)
    if launch.problems():
        raise UsageError("phi-pipeline " + args.command, launch.problems())
    return launch, make_executor(args.executor, args.ray_address, Path(load_spec(args.spec).work_dir))


def _cmd_run(args: argparse.Namespace) -> int:
    from phi_pipeline.pipeline import run

    launch, executor = _scale_out(args)
    bundles = [
        run(
            args.spec,
            target,
            precision=args.precision,
            echo=args.verbose,
            no_gate=args.no_gate,
            sign_key=Path(args.sign_key) if args.sign_key else None,
            no_wait=args.no_wait,
            launch=launch,
            executor=executor,
            remeasure=args.remeasure,
        )
        for target in args.target
    ]
    if launch.node_rank > 0:
        return 0
    if args.package:
        from phi_pipeline.bundle.package import build_package, packable

        from phi_pipeline.pipeline_spec.schema import load_spec

        packed, merged = packable(bundles)
        for b in merged:
            print(f"not in the package: {b} (merged layout: one model per adapter; published on its own)", file=sys.stderr)
        if packed:
            print(build_package(packed, Path(load_spec(args.spec).work_dir) / "logs"))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from phi_pipeline.pipeline import search
    from phi_pipeline.evaluate.report import format_search

    launch, executor = _scale_out(args)
    for trained in search(args.spec, args.target[0], adapter=args.adapter, trials=args.trials, echo=args.verbose,
                          launch=launch, executor=executor):
        print(format_search(trained.search))
    return 0


def _targets(value: str) -> list[str]:
    """--target cpu or --target cpu,cuda: adapters are trained once and exported per target."""
    names = [t.strip() for t in value.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown target(s) {', '.join(unknown) or value!r}; known: {', '.join(TARGETS)}")
    return list(dict.fromkeys(names))


def _cmd_eval(args: argparse.Namespace) -> int:
    from phi_pipeline.evaluate import eval_cli

    return eval_cli(
        args.bundle,
        adapter=args.adapter,
        data=args.data,
        spec=args.spec,
        cache_dir=args.cache_dir,
        onnx_only=args.onnx_only,
        out=args.out,
    )


def _cmd_configs(args: argparse.Namespace) -> int:
    from phi_pipeline.orchestration.configs import write_configs
    from phi_pipeline.pipeline import load_plan

    if args.all:
        jobs = [(spec, t) for spec in sorted(SHIPPED_SPECS.glob("*.yaml")) for t in TARGETS]
    elif args.spec:
        jobs = [(Path(args.spec), target) for target in args.target]
    else:
        raise UsageError("phi-pipeline configs", ["give a SPEC, or --all for every spec in pipelines/"])
    for spec, target in jobs:
        plan = load_plan(spec, target, args.precision)
        for path in write_configs(plan).values():
            print(path)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from phi_pipeline.runtime.generate import generate_cli

    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads", ["give a thread count >= 1"])
    return generate_cli(
        args.bundle, args.prompt, adapter=args.adapter, max_new_tokens=args.max_new_tokens, raw=args.raw, threads=args.threads
    )


def _cmd_verify(args: argparse.Namespace) -> int:
    from phi_pipeline.bundle.layout import SIGNATURE
    from phi_pipeline.bundle.staging import verify

    folder = Path(args.bundle)
    problems = verify(folder, Path(args.public_key) if args.public_key else None)
    if problems:
        print(f"{args.bundle}: verification failed", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    if args.public_key:
        signed = f", and {SIGNATURE} proves every file was signed with the key of {args.public_key}"
    elif (folder / SIGNATURE).is_file():
        signed = f" ({SIGNATURE} not checked: give --public-key)"
    else:
        signed = ""
    print(f"{args.bundle}: every file matches manifest.json and every adapter fits the model's inputs{signed}")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from phi_pipeline.bundle.layout import MANIFEST
    from phi_pipeline.bundle.staging import sign
    from phi_pipeline.bundle.signing import check_private_key

    folder = Path(args.bundle)
    problems = check_private_key(Path(args.key))
    if not (folder / MANIFEST).is_file():
        problems.append(f"{folder}: no {MANIFEST}; not a phi-pipeline bundle")
    if problems:
        raise UsageError("phi-pipeline sign", problems)
    print(sign(folder, Path(args.key)))
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from phi_pipeline.orchestration.cache import info_cli, prune_cli, verify_cli

    root = Path(args.cache_dir)
    if args.action == "info":
        return info_cli(root)
    if args.action == "verify":
        return verify_cli(root)
    return prune_cli(root, [Path(s) for s in args.spec] if args.spec else sorted(SHIPPED_SPECS.glob("*.yaml")))


def _cmd_bench(args: argparse.Namespace) -> int:
    from phi_pipeline.bench.__main__ import bench_cli

    return bench_cli(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from phi_pipeline.serve.server import serve_cli

    return serve_cli(args.bundle, host=args.host, port=args.port, threads=args.threads, api_key=args.api_key,
                     max_active=args.max_active, max_queue=args.max_queue, max_tokens=args.max_tokens,
                     engine=args.engine, prefix_cache_mb=args.prefix_cache_mb, public_key=args.public_key,
                     prefill_pacing=args.prefill_pacing, prefill_min_tokens=args.prefill_min_tokens)


def _cmd_web(args: argparse.Namespace) -> int:
    from phi_pipeline.web.site import write_site

    out = write_site(Path(args.bundle), Path(args.out))
    print(f"{out}: the page of {args.bundle} as static files. Host it over https or on localhost, with the headers in "
          f"_headers for WASM threads; e.g. `python -m http.server -d {out}` and http://localhost:8000/ (one thread)")
    return 0


def _cmd_tiny_base(args: argparse.Namespace) -> int:
    from phi_pipeline.tiny.base_model import build_tiny_base

    print(build_tiny_base(Path(args.out)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phi-pipeline",
        description="Fine-tune LoRA adapters and export a multi-adapter ONNX Runtime GenAI bundle, through Olive.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def spec_and_target(p: argparse.ArgumentParser, spec_required: bool = True) -> None:
        p.add_argument("spec", nargs=None if spec_required else "?", help="pipeline spec (pipelines/*.yaml)")
        p.add_argument(
            "--target",
            default=["cpu"],
            type=_targets,
            help=f"deployment target(s), comma-separated: {', '.join(TARGETS)} (default: cpu)",
        )
        p.add_argument("--precision", help="override the spec's export precision")

    def scale_out(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("scaling out (docs/scaling.md)")
        g.add_argument("--nproc-per-node", type=int, help="data-parallel ranks per node for each fine-tune, under "
                       "torchrun (default: the spec's training.nproc_per_node, 1)")
        g.add_argument("--nnodes", type=int, default=1, help="nodes taking part in each fine-tune (default 1)")
        g.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0 to nnodes-1; node 0 publishes")
        g.add_argument("--master-addr", help="address of node 0 (with --nnodes > 1)")
        g.add_argument("--master-port", type=int, default=29500, help="rendezvous port on node 0 (default 29500)")
        g.add_argument("--executor", choices=EXECUTORS, default="local", help="run a stage's independent Olive "
                       "workflows here one by one (local, default) or as Ray tasks (ray: pip install 'phi-pipeline[ray]')")
        g.add_argument("--ray-address", help="Ray cluster to join: auto, ray://host:port (default: a new local Ray)")

    p = sub.add_parser("run", help="run the whole pipeline and publish the bundle")
    spec_and_target(p)
    p.add_argument("-v", "--verbose", action="store_true", help="stream Olive's log to the console")
    p.add_argument(
        "--no-gate",
        action="store_true",
        help="publish even if a publish gate fails (the failures are recorded in manifest.json and report.md)",
    )
    p.add_argument(
        "--package",
        action="store_true",
        help="also assemble the targets' bundles into one ORT model package (olive generate-model-package)",
    )
    p.add_argument("--sign-key", help="sign each bundle before publishing it, with this EC private key (PEM; model-signing)")
    p.add_argument("--remeasure", action="store_true", help="export search: gate and time every variant again "
                   "instead of reading their figures from the cache (e.g. on a quieter machine)")
    p.add_argument(
        "--no-wait", action="store_true", help="exit 1 at once if another run of the same pipeline and target holds the lock"
    )
    scale_out(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("search", help="run the adapters' hyperparameter searches and print every trial (no export)")
    spec_and_target(p)
    p.add_argument("--adapter", help="search this adapter only (default: every adapter with a search block)")
    p.add_argument("--trials", type=int, help="finish this many trials (default: the spec's search.trials)")
    p.add_argument("-v", "--verbose", action="store_true", help="stream Olive's log to the console")
    scale_out(p)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("configs", help="write the Olive workflow configs to olive_configs/ and stop (a dry run)")
    spec_and_target(p, spec_required=False)
    p.add_argument("--all", action="store_true", help="every spec in pipelines/ for every target")
    p.set_defaults(func=_cmd_configs)

    p = sub.add_parser("generate", help="generate text with a published bundle (onnxruntime-genai only)")
    p.add_argument("bundle", help="bundle folder, e.g. dist/tiny-phi3/cpu")
    p.add_argument("--prompt", required=True, help="the user's text; formatted like the adapter's training data")
    p.add_argument("--adapter", help="adapter name to activate (default: none, the base model)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the adapter's format")
    p.add_argument("--threads", type=int, help="intra-op threads of the decoder (default: the bundle's genai_config.json; "
                   "CPU bundles use every core)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "eval",
        help="evaluate a bundle: task metric, perplexity and parity with PyTorch+PEFT, base vs adapters; "
        "exit 1 if a publish gate fails",
    )
    p.add_argument("bundle", help="bundle folder, e.g. dist/tiny-phi3/cpu")
    p.add_argument("--adapter", help="evaluate this adapter only (default: every adapter)")
    p.add_argument("--data", help="eval split to use instead of the adapter's own (same format; needs --adapter "
                   "when the bundle has several adapters)")
    p.add_argument("--spec", help="take data format, eval settings and gates from this spec instead of the manifest")
    p.add_argument("--cache-dir", help="phi-pipeline cache holding the PEFT adapters (default: <work_dir>/cache "
                   "of --spec, else .phi-pipeline/cache)")
    p.add_argument("--onnx-only", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--out", help="also write eval.json, report.md and charts to this folder")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("verify", help="re-hash a bundle against its manifest and check adapters fit the model")
    p.add_argument("bundle")
    p.add_argument("--public-key", help="also check the bundle's signature (model.sig) with this EC public key (PEM)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("sign", help="sign a bundle with an EC private key (OpenSSF model-signing); writes model.sig into it")
    p.add_argument("bundle")
    p.add_argument("--key", required=True, help="EC private key (PEM, P-256/P-384/P-521, unencrypted)")
    p.set_defaults(func=_cmd_sign)

    p = sub.add_parser("cache", help="the content-addressed cache: info (entries, sizes), verify (re-hash), prune")
    p.add_argument("action", choices=("info", "verify", "prune"))
    p.add_argument("--cache-dir", default=".phi-pipeline/cache", help="default: .phi-pipeline/cache")
    p.add_argument(
        "--spec",
        action="append",
        help="prune: keep what this spec's pipeline uses (repeatable; default: every spec in pipelines/)",
    )
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser("bench", help="benchmark a bundle and a larger model: speed, memory, size, adapter and pipeline costs")
    from phi_pipeline.bench.__main__ import add_arguments

    add_arguments(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("serve", help="serve a bundle with an OpenAI-compatible API; each request's model picks "
                       "the adapter (the base id: none)")
    p.add_argument("bundle", help="bundle folder, e.g. dist/tiny-phi3/cpu")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--threads", type=int, help="intra-op threads of the decoder (default: onnxruntime-genai's, one on CPU)")
    p.add_argument("--max-active", type=int, default=8,
                   help="requests decoded at once, each with its own KV cache (default 8); with the batched engine, "
                   "the largest batch of a decode step")
    p.add_argument("--engine", choices=("auto", "batched", "genai"), default="auto",
                   help="auto (default): batched (continuous batching on onnxruntime, an adapter per row) where the "
                   "bundle runs on CPU, else genai (a generator per request, round-robin)")
    p.add_argument("--max-queue", type=int, default=32,
                   help="requests waiting beyond --max-active before new ones get 429 (default 32)")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="largest max_tokens a request may ask for, and the default where the context allows (default 1024)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/* (default: $PHI_PIPELINE_API_KEY, "
                   "else none)")
    p.add_argument("--public-key", help="check the bundle's signature (model.sig) with this EC public key (PEM) "
                   "before serving adapters reloaded on SIGHUP or POST /v1/load_lora_adapter")
    p.add_argument("--prefix-cache-mb", type=int, default=1024,
                   help="batched engine: host RAM for finished requests' KV, so a prompt that repeats an earlier one's "
                   "tokens under the same adapter (a chat's next turn) prefills only what is new (default 1024; 0: off)")
    p.add_argument("--prefill-pacing", choices=("decode-step", "off"), default="decode-step",
                   help="batched engine: decode-step (default): while requests decode, a prompt goes in by runs that "
                   "take about one decode step each, so streams keep their pace (stall-free); off: 128 prompt tokens a "
                   "run, whatever waits")
    p.add_argument("--prefill-min-tokens", type=int, default=32,
                   help="batched engine, decode-step pacing: the fewest prompt tokens a run takes while others decode "
                   "(default 32, at most 128); fewer shortens the streams' longest gaps and lengthens the time to "
                   "first token (docs/serving.md)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("web", help="write a bundle's in-browser page (onnxruntime-web, an adapter per message) as static "
                       "files anyone can host; `serve` also serves it at /web/")
    p.add_argument("bundle", help="a bundle published for --target webgpu or cpu, e.g. dist/tiny-phi3/webgpu")
    p.add_argument("out", help="folder to write (new, empty, or an earlier page, which is replaced whole)")
    p.set_defaults(func=_cmd_web)

    p = sub.add_parser("tiny-base", help="build the embedded tiny Phi-3 base model (no hub access)")
    p.add_argument("out", help="output folder")
    p.set_defaults(func=_cmd_tiny_base)
    return parser


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)  # like Ctrl-C: every cleanup path runs
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        print("terminated (SIGTERM); Olive was stopped and the published bundle was left as it was", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted; the published bundle was left as it was", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
