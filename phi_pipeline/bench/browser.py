"""The in-browser page's speed against the Python runtime, same bundle, same machine, same prompts.

`python -m phi_pipeline.bench.browser BUNDLE [--rounds 5] [--prompt-tokens 64,512] [--new-tokens 64]
[--screenshot docs/browser.png]` (`make bench-browser`). The page runs in headless chromium on the WASM backend (the threads it gets when
served cross-origin isolated, as `phi-pipeline serve` does); the Python runtime is onnxruntime-genai on the
CPU execution provider with as many threads. Each round times, on both, for the base model and the first
adapter: the first token (a prompt of N tokens, prefill plus one token) and the decode (tokens/s over
`--new-tokens` tokens, the end token ignored so both decode the same count). Medians over the rounds, the
page's figures as ratios of the Python runtime's, the CPU and its instruction sets recorded; written to
bench/browser.json and printed. `--screenshot`: the page after a chat with each of the first two adapters, one
message each from its eval split (read relative to the working directory), as the README shows it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from phi_pipeline.bench.machine import describe, machine
from phi_pipeline.web.browser import CHROMIUM

def prompt_ids(bm: Any, n: int) -> list[int]:
    """`n` token ids of plain English (this module's docstring, repeated), the same on both runtimes."""
    ids = bm.encode(__doc__)
    return (ids * (n // len(ids) + 1))[:n]


def python_round(bm: Any, ids: list[int], adapter: str | None, new_tokens: int) -> tuple[float, float]:
    """(first token ms, decode tokens/s) on onnxruntime-genai."""
    t0 = time.perf_counter()
    generation = bm.start(ids, adapter, new_tokens, min_new_tokens=new_tokens)
    generation.feed()
    generation.step()
    first = time.perf_counter()
    while not generation.done:
        generation.step()
    end = time.perf_counter()
    return (first - t0) * 1000, (len(generation.new_tokens) - 1) / (end - first)


def page_round(page: Any, ids: list[int], adapter: str | None, new_tokens: int) -> tuple[float, float]:
    out = page.evaluate("([ids, a, n]) => phi.generateIds(ids, a, n, {ignoreEos: true})", [ids, adapter, new_tokens])
    assert len(out["tokens"]) == new_tokens, out
    return out["firstTokenMs"], out["tokensPerSecond"]


def screenshot(page: Any, bundle: Path, path: Path) -> None:
    """Chat with each of the first two adapters in the page, one eval-row message each; save the page as `path`."""
    from phi_pipeline.bench.chat import eval_rows

    for n, (adapter, rows) in enumerate(list(eval_rows(bundle, Path.cwd()).items())[:2], start=1):
        page.select_option("#adapter", adapter)
        page.fill("#prompt", rows[0][0])
        page.click("#send")
        page.wait_for_selector(f".assistant:nth-of-type({2 * n})[data-state=done]", timeout=120_000)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.locator("body").screenshot(path=str(path))


def run(bundle: Path, rounds: int, prompt_tokens: list[int], new_tokens: int, shot: Path | None = None) -> dict[str, Any]:
    from phi_pipeline.runtime.genai import BundleModel
    from phi_pipeline.serve.app import ServeSettings
    from phi_pipeline.serve.server import running
    from phi_pipeline.web.browser import web_page

    manifest = json.loads((bundle / "manifest.json").read_text())
    context = json.loads((bundle / "genai_config.json").read_text())["model"]["context_length"]
    if max(prompt_tokens) + new_tokens > context:
        raise SystemExit(f"--prompt-tokens {max(prompt_tokens)} + --new-tokens {new_tokens} exceed the model's context of "
                         f"{context} tokens ({bundle}/genai_config.json)")
    adapter = next(a["name"] for a in manifest["adapters"] if "file" in a)
    # the server only hands out the page's files; its own engine loads before the rounds, then idles
    with running(ServeSettings(bundle, engine_kind="genai")) as (url, _), web_page(url + "/web/") as page:
        if page.get_attribute("body", "data-state") != "ready":
            raise RuntimeError(f"the page failed: {page.text_content('#status')}")
        backend, threads = page.evaluate("[phi.backend, phi.threads]")
        bm = BundleModel(bundle, threads=threads)
        samples: dict[str, dict[str, list[float]]] = {}
        for r in range(rounds):
            for n in prompt_tokens:
                ids = prompt_ids(bm, n)
                for model in (None, adapter):
                    for side, measure in (("page", page_round), ("python", python_round)):
                        first, decode = measure(page if side == "page" else bm, ids, model, new_tokens)
                        cell = samples.setdefault(f"{model or 'base'} p{n}", {})
                        cell.setdefault(f"{side}_first_token_ms", []).append(first)
                        cell.setdefault(f"{side}_decode_tok_s", []).append(decode)
            print(f"round {r + 1}/{rounds} done", file=sys.stderr)
        chromium = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip()
        if shot is not None:
            screenshot(page, bundle, shot)
    results = {}
    for key, cell in samples.items():
        med = {k: statistics.median(v) for k, v in cell.items()}
        med["first_token_speed_ratio"] = med["python_first_token_ms"] / med["page_first_token_ms"]
        med["decode_ratio"] = med["page_decode_tok_s"] / med["python_decode_tok_s"]
        results[key] = {k: round(v, 3) for k, v in med.items()}
    return {
        "bundle": str(bundle), "pipeline": manifest["pipeline"], "target": manifest["target"],
        "precision": manifest["precision"], "machine": machine(), "browser": chromium,
        "page_backend": backend, "threads": threads, "rounds": rounds, "new_tokens": new_tokens,
        "python_runtime": "onnxruntime-genai, CPUExecutionProvider", "results": results,
    }


def table(report: dict[str, Any]) -> str:
    lines = ["| model, prompt | page first token (ms) | Python first token (ms) | speed ratio | page decode (tok/s) | "
             "Python decode (tok/s) | ratio |", "|---|---|---|---|---|---|---|"]
    for key, r in report["results"].items():
        lines.append(f"| {key} | {r['page_first_token_ms']:.0f} | {r['python_first_token_ms']:.0f} | "
                     f"{r['first_token_speed_ratio']:.2f}x | {r['page_decode_tok_s']:.1f} | {r['python_decode_tok_s']:.1f} | "
                     f"{r['decode_ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phi_pipeline.bench.browser", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="a bundle with a web graph (published for --target webgpu or cpu)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, medians reported (default 5)")
    parser.add_argument("--prompt-tokens", default="64,512", help="prompt lengths, comma-separated (default 64,512)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per run (default 64)")
    parser.add_argument("--out", type=Path, default=Path("bench/browser.json"), help="where the figures go")
    parser.add_argument("--screenshot", type=Path, help="also save the page after a chat with two adapters here (PNG)")
    args = parser.parse_args(argv)
    report = run(args.bundle, args.rounds, [int(n) for n in args.prompt_tokens.split(",")], args.new_tokens, args.screenshot)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['pipeline']} {report['target']} {report['precision']}: page on {report['page_backend']} "
          f"({report['threads']} threads, {report['browser']}) vs the Python runtime; {describe(report['machine'])}; medians of {report['rounds']} rounds")
    print(table(report))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
