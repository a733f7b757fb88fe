"""What a long prompt does to a client already streaming: stall-free prefill pacing against none.

`python bench/prefill_stall.py [BUNDLE] [--reps 2]` (default dist/smollm2/cpu, built by
`make finetune-and-export PIPELINE=pipelines/smollm2.yaml`). For each setting of `serve --prefill-pacing`, in
this process on the batched engine (prefix cache off, so each rep prefills the whole prompt): one client streams
300 tokens with the first adapter; once it has 30, a second client sends this repository's README (its first
6,000 characters) to the second adapter. Per rep: the streaming client's median gap between tokens before the
long prompt came and while it went in, its longest gap, and the long prompt's time to its first token. Written
to bench/prefill-stall.json and printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rep(oa, adapters: list[str], long_text: str) -> dict[str, float]:
    stamps: list[float] = []

    def stream() -> None:
        events = oa.chat.completions.create(model=adapters[0], messages=[{"role": "user", "content": "Write about the sea."}],
                                            max_tokens=300, temperature=0, stream=True, extra_body={"min_tokens": 300})
        stamps.extend(time.perf_counter() for ev in events if ev.choices and ev.choices[0].delta.content)

    def content_times(events) -> list[float]:
        return [time.perf_counter() for ev in events if ev.choices and ev.choices[0].delta.content]

    streaming = threading.Thread(target=stream)
    streaming.start()
    while len(stamps) < 30 and streaming.is_alive():
        time.sleep(0.005)
    sent = time.perf_counter()
    seen = content_times(oa.chat.completions.create(
        model=adapters[1], messages=[{"role": "user", "content": long_text}], max_tokens=4, temperature=0,
        stream=True, extra_body={"min_tokens": 4}))
    streaming.join()
    first = seen[0]
    gaps = [(a, b - a) for a, b in zip(stamps, stamps[1:])]
    during = [g for a, g in gaps if sent <= a <= first]
    before = [g for a, g in gaps if a < sent]
    return {"long_prompt_ttft_s": round(first - sent, 3), "stream_gap_p50_before_s": round(statistics.median(before), 4),
            "stream_gap_p50_during_s": round(statistics.median(during), 4), "stream_gap_max_during_s": round(max(during), 4)}


def main() -> int:
    from openai import OpenAI

    from phi_pipeline.bench.machine import machine
    from phi_pipeline.runtime.engine import EngineSettings
    from phi_pipeline.serve.app import ServeSettings
    from phi_pipeline.serve.server import running

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, nargs="?", default=ROOT / "dist/smollm2/cpu")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/prefill-stall.json")
    args = parser.parse_args()
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    adapters = [a["name"] for a in manifest["adapters"]][:2]
    long_text = (ROOT / "README.md").read_text()[:6000]
    result = {"bundle": str(args.bundle), "machine": machine(), "adapters": adapters, "runs": {}}
    for pacing in ("decode-step", "off"):
        settings = ServeSettings(args.bundle, max_tokens=400, engine_kind="batched",
                                 engine=EngineSettings(pace_prefill=pacing == "decode-step", prefix_cache_bytes=0))
        with running(settings) as (url, _):
            oa = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
            result["runs"][pacing] = runs = [rep(oa, adapters, long_text) for _ in range(args.reps)]
        for r in runs:
            print(f"--prefill-pacing {pacing:11s} long prompt TTFT {r['long_prompt_ttft_s']:.2f} s; stream gap p50 "
                  f"{r['stream_gap_p50_before_s'] * 1000:.0f} ms before, {r['stream_gap_p50_during_s'] * 1000:.0f} ms during, "
                  f"longest {r['stream_gap_max_during_s'] * 1000:.0f} ms")
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
