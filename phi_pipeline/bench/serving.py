"""Serving: `phi-pipeline serve` on a bundle, loaded by concurrent streaming clients.

The server runs as users run it (its own process, `python -m phi_pipeline.cli serve`); the clients
are threads of this process speaking plain HTTP (stdlib), so they take no GIL time from the engine.
Each level sends the same requests (completions, streamed, a prompt of `prompt_len` tokens, exactly
`new_tokens` new tokens via min_tokens, greedy), `clients` at a time, each client sending its next
request when the last one ends (closed loop). Concurrency 1 is the requests run one after another.
Mixed: requests cycle through the base model and every adapter; the highest level is run again
once per model with every request on it, which prices the mixing. Every level resends the same prompts, so
the servers keep no prompt cache (ours `--prefix-cache-mb 0`, llama-server `cache_prompt: false`): each request
prefills its whole prompt, and what is measured is batching; the chat bench (chat.py) measures the cache.

Per level: requests/s, output tokens/s, time to first token (request sent -> first content event)
and latency (-> [DONE]), p50 and p95 over the requests. Each engine (`serve --engine`: batched, genai)
gets its own server; its levels run in `rounds` rounds, in a shuffled order each round, and every
figure is the median over the rounds with its spread (the machine's speed drifts within minutes).

Standalone: `python -m phi_pipeline.bench.serving [--size 150m] [--rounds 3]` builds the benchmark base
with random r8 and r16 adapters (bench/models.py) and writes serving.json and serving.md.
"""

from __future__ import annotations

import http.client
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from phi_pipeline.bench.machine import describe, machine
from phi_pipeline.evaluate.stats import load_average, summary

CONCURRENCY = (1, 2, 4, 8)
ENGINES = ("batched", "genai")
REQUESTS_PER_CLIENT = 2  # per level and repetition: each client sends this many requests


@dataclass(frozen=True)
class Request:
    model: str
    prompt: str
    prompt_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)
    """More body fields: how this server is told to generate exactly new_tokens, and which adapter."""


@dataclass(frozen=True)
class Outcome:
    ttft_s: float
    latency_s: float
    completion_tokens: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(bundle: Path, length: int, count: int) -> list[tuple[str, int]]:
    """`count` different texts of about `length` tokens of the bundle's tokenizer, made of its own
    word tokens (so any tokenizer knows them), with their exact token counts."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    special = set(tok.get_added_tokens_decoder())
    words = sorted(i for i in tok.get_vocab().values() if i not in special and tok.decode([i]).strip().isalpha())
    out = []
    for i in range(count):
        ids = [words[(i * 7 + j * 13) % len(words)] for j in range(2 * length)]
        cut = tok.encode(tok.decode(ids), add_special_tokens=False).ids[:length]
        text = tok.decode(cut)
        out.append((text, len(tok.encode(text, add_special_tokens=False).ids)))
    return out


class Server:
    """`phi-pipeline serve BUNDLE` in a subprocess, ready when /health says so."""

    def __init__(self, bundle: Path, threads: int | None, max_active: int, max_tokens: int, log: Path,
                 engine: str = "auto", extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "phi_pipeline.cli", "serve", str(bundle), "--port", str(self.port),
                "--max-active", str(max_active), "--max-queue", str(4 * max_active), "--max-tokens", str(max_tokens),
                "--engine", engine, *extra_args]
        if threads:
            args += ["--threads", str(threads)]
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        self.log = log

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; log {self.log}:\n"
                                   f"{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready after {timeout} s; log {self.log}")

    def models(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://{self.url}/v1/models", timeout=30) as resp:
            return json.loads(resp.read())["data"]

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.url}/health", timeout=30) as resp:
            return json.loads(resp.read())

    def extra(self, model: str, new_tokens: int) -> dict[str, Any]:
        return {"min_tokens": new_tokens}  # exactly new_tokens: end-of-text is ignored before

    def close(self) -> None:
        self.proc.terminate()  # SIGTERM: the server drains, then exits
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def stream_events(url: str, route: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """POST `body` to `route` of the server at `url` (host:port) and yield each server-sent event as it arrives,
    until [DONE]; an HTTP error or an error event raises RuntimeError."""
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    try:
        conn.request("POST", route, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            yield event
    finally:
        conn.close()


def send(url: str, request: Request, new_tokens: int) -> Outcome:
    """One streamed completion; times measured at this client."""
    body = {"model": request.model, "prompt": request.prompt, "max_tokens": new_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **request.extra}
    start = time.perf_counter()
    first = None
    tokens = events = 0
    for event in stream_events(url, "/v1/completions", body):
        if event["choices"]:
            events += 1
            if event["choices"][0]["text"] and first is None:
                first = time.perf_counter()
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    # a server that sends no usage (llama-server without include_usage): one event per token
    return Outcome((first or end) - start, end - start, tokens or events)


def run_level(url: str, requests: list[Request], clients: int, new_tokens: int) -> dict[str, Any]:
    """`requests` sent by `clients` threads, each taking the next request when its last one ends."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    errors: list[str] = []
    lock = threading.Lock()
    todo = iter(range(len(requests)))

    def client() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                outcomes[i] = send(url, requests[i], new_tokens)
            except Exception as exc:  # recorded: one failed request must not hang the level
                errors.append(f"{type(exc).__name__}: {exc}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done = [o for o in outcomes if o is not None]
    tokens = sum(o.completion_tokens for o in done)
    return {
        "clients": clients,
        "requests": len(requests),
        "failed": len(errors),
        "errors": errors[:5],
        "wall_s": round(wall, 4),
        "output_tokens": tokens,
        "requests_per_s": round(len(done) / wall, 3),
        "output_tok_s": round(tokens / wall, 2),
        "ttft_s": percentiles([o.ttft_s for o in done]),
        "latency_s": percentiles([o.latency_s for o in done]),
        "load_average": load_average(),
    }


class LlamaServer(Server):
    """llama-server in a subprocess: the same base as GGUF, every adapter as a GGUF LoRA loaded at scale 0,
    each request naming its own (`lora` per request, llama-server's own API)."""

    def __init__(self, peer: "PeerServer", slots: int, log: Path, prompt_cache: bool):
        self.peer = peer
        self.prompt_cache = prompt_cache
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        args = [str(peer.tool), "-m", str(peer.model), "--host", "127.0.0.1", "--port", str(self.port),
                "-np", str(slots), "-c", str(slots * peer.ctx_per_slot), "-t", str(peer.threads), "-tb", str(peer.threads),
                "--lora-init-without-apply", "--jinja"]  # --jinja: the GGUF's own chat template (the chat bench)
        for gguf in peer.loras.values():
            args += ["--lora", str(gguf)]
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        self.log = log

    def models(self) -> list[dict[str, Any]]:
        return [{"id": self.peer.base_name}, *({"id": name} for name in self.peer.loras)]

    def extra(self, model: str, new_tokens: int) -> dict[str, Any]:
        scales = [{"id": i, "scale": 1.0 if name == model else 0.0} for i, name in enumerate(self.peer.loras)]
        return {"ignore_eos": True, "lora": scales, "cache_prompt": self.prompt_cache}


@dataclass(frozen=True)
class PeerServer:
    """How to start llama-server on the benchmark model (the serving bench's peer rows)."""

    tool: Path
    model: Path
    loras: dict[str, Path]
    """adapter name -> GGUF LoRA, in --lora order (a request's `lora` ids)"""
    base_name: str
    threads: int
    ctx_per_slot: int
    name: str = "llama-server"

    def start(self, slots: int, log: Path, prompt_cache: bool = True) -> LlamaServer:
        """prompt_cache: llama-server's `cache_prompt` on every request (its default: on)."""
        return LlamaServer(self, slots, log, prompt_cache)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "n": 0}
    if len(values) == 1:
        return {"p50": round(values[0], 4), "p95": round(values[0], 4), "n": 1}
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    return {"p50": round(statistics.median(values), 4), "p95": round(cuts[18], 4), "n": len(values)}


def every_id_spoken(bundle: Path, out: Path) -> Path:
    """A view of `bundle` (links to its files) whose tokenizer names every id of the model's vocabulary.

    The benchmark base borrows a small tokenizer for a 32064-row vocabulary, and with random weights most
    ids it generates are ones that tokenizer lacks: they decode to no text, so a stream would show its first
    text late and time to first token would measure nothing. Each missing id becomes a plain added token
    (" t<id>"), so every generated token streams a piece of text, as a real model's do.
    """
    vocab = json.loads((bundle / "genai_config.json").read_text())["model"]["vocab_size"]
    tokenizer = json.loads((bundle / "tokenizer.json").read_text())
    known = set(tokenizer["model"]["vocab"].values()) | {t["id"] for t in tokenizer.get("added_tokens", [])}
    tokenizer.setdefault("added_tokens", []).extend(
        {"id": i, "content": f" t{i}", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": False}
        for i in range(vocab) if i not in known
    )
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in bundle.iterdir():
        if f.name != "tokenizer.json":
            (out / f.name).symlink_to(f.resolve())
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    return out


def bench_serving(
    bundle: Path, scratch: Path, *, threads: int | None, prompt_len: int, new_tokens: int, reps: int = 1,
    concurrency: tuple[int, ...] = CONCURRENCY, engines: tuple[str, ...] = ENGINES, rounds: int = 1, seed: int = 0,
    peer: "PeerServer | None" = None,
) -> dict[str, Any]:
    """Per engine (and the peer, if given): every concurrency level with mixed models in `rounds` shuffled
    rounds, then the highest level with one model at a time, on a view of `bundle` whose tokenizer names
    every id (every_id_spoken)."""
    top = max(concurrency)
    bundle = every_id_spoken(bundle, scratch / "bundle")
    texts = prompts(bundle, prompt_len, REQUESTS_PER_CLIENT * top * reps)
    order = random.Random(seed)
    out: dict[str, Any] = {
        "bundle": str(bundle), "every_id_spoken": True, "threads": threads or "default", "prompt_cache": False,
        "prompt_tokens": sorted({n for _, n in texts}), "new_tokens": new_tokens, "rounds": rounds, "engines": {},
    }
    for engine in [*engines, *([peer.name] if peer else [])]:
        log = scratch / f"serve-{engine}.log"
        if peer and engine == peer.name:
            server: Any = peer.start(top, log, prompt_cache=False)
        else:
            server = Server(bundle, threads, max_active=top, max_tokens=new_tokens, log=log, engine=engine,
                            extra_args=("--prefix-cache-mb", "0"))
        try:
            server.wait_ready()
            models = [m["id"] for m in server.models()]
            mixed = [Request(models[i % len(models)], t, n, server.extra(models[i % len(models)], new_tokens))
                     for i, (t, n) in enumerate(texts)]
            warm = mixed[0]  # warm-up: first-request allocations are not served to users twice
            send(server.url, replace(warm, extra=server.extra(warm.model, 2)), 2)
            runs: dict[str, list[dict[str, Any]]] = {str(c): [] for c in concurrency}
            for _ in range(rounds):
                for clients in order.sample(list(concurrency), len(concurrency)):
                    runs[str(clients)].append(run_level(server.url, mixed, clients, new_tokens))
            singles = {m: run_level(server.url, [Request(m, r.prompt, r.prompt_tokens, server.extra(m, new_tokens))
                                                  for r in mixed], top, new_tokens)
                       for m in models}
            prompt_cache = server.health().get("prefix_cache")  # ours says when it has one; llama-server never
        finally:
            server.close()
        levels = {k: _median_run(v) for k, v in runs.items()}
        base = runs[str(min(concurrency))]
        out["models"] = models
        out["engines"][engine] = {
            "mixed": levels,
            "one_model": singles,
            # per round: this level's output tokens/s over the same round's one-client level
            "speedup_vs_sequential": {
                k: summary([r["output_tok_s"] / b["output_tok_s"] for r, b in zip(v, base) if b["output_tok_s"]], digits=3)
                for k, v in runs.items()
            },
            "mixing_cost": mixing_cost(levels[str(top)], list(singles.values())),
            "prefix_cache": prompt_cache,
        }
    return out


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One level over its rounds: the round of median output tokens/s, with every round's spread beside it."""
    ranked = sorted(runs, key=lambda r: r["output_tok_s"])
    median = dict(ranked[(len(ranked) - 1) // 2])
    median["output_tok_s_rounds"] = summary([r["output_tok_s"] for r in runs], digits=2)
    median["ttft_p95_s_rounds"] = summary([r["ttft_s"]["p95"] for r in runs if r["ttft_s"]["p95"] is not None])
    median["failed"] = sum(r["failed"] for r in runs)
    return median


def mixing_cost(mixed: dict[str, Any], singles: list[dict[str, Any]]) -> float | None:
    """Output tokens/s lost by mixing models at one level: 1 - mixed / unmixed, where unmixed is what
    the same share of requests per model would give run apart (time adds: the harmonic mean)."""
    rates = [s["output_tok_s"] for s in singles]
    if not mixed["output_tok_s"] or not all(rates):
        return None
    unmixed = len(rates) / sum(1 / r for r in rates)
    return round(1 - mixed["output_tok_s"] / unmixed, 4)


def report_lines(s: dict[str, Any]) -> list[str]:
    """The report's serving section (report.py calls it)."""
    if "error" in s:
        return ["Failed:", "", "```", s["error"].rstrip(), "```", ""]

    def ms(p: dict[str, Any], key: str) -> str:
        return "-" if p[key] is None else f"{1000 * p[key]:.0f}"

    def spread(x: dict[str, Any], scale: float = 1, digits: int = 1) -> str:
        return f"{scale * x['median']:.{digits}f} [{scale * x['min']:.{digits}f}-{scale * x['max']:.{digits}f}]"

    header = ["engine", "requests, clients", "requests/s", "output tok/s [rounds min-max]", "vs 1 client [min-max]",
              "TTFT p50 ms", "TTFT p95 ms [min-max]", "latency p50 ms", "latency p95 ms", "failed"]
    rows = []
    for engine, e in s["engines"].items():
        for k, v in e["mixed"].items():
            up = e["speedup_vs_sequential"][k]
            rows.append([engine, f"mixed, {k}", v["requests"], f"{v['requests_per_s']:.2f}", spread(v["output_tok_s_rounds"]),
                         f"{spread(up, digits=2)}x" if up["n"] else "-", ms(v["ttft_s"], "p50"),
                         spread(v["ttft_p95_s_rounds"], 1000, 0) if v["ttft_p95_s_rounds"]["n"] else "-",
                         ms(v["latency_s"], "p50"), ms(v["latency_s"], "p95"), v["failed"]])
        for model, one in e["one_model"].items():
            rows.append([engine, f"{model} only, {one['clients']}", one["requests"], f"{one['requests_per_s']:.2f}",
                         f"{one['output_tok_s']:.1f}", "", ms(one["ttft_s"], "p50"), ms(one["ttft_s"], "p95"),
                         ms(one["latency_s"], "p50"), ms(one["latency_s"], "p95"), one["failed"]])
    lines = [
        f"`phi-pipeline serve` on `{s['bundle']}` (models {', '.join(s['models'])}; decoder threads {s['threads']}"
        f"{'; a view of the benchmark bundle whose tokenizer names every id, so every token streams text' if s.get('every_id_spoken') else ''}), "
        f"streamed completions of {s['prompt_tokens']} prompt tokens and exactly {s['new_tokens']} new ones, greedy; "
        "clients send their next request when the last one ends. Mixed: requests cycle through the base model and "
        f"every adapter. Clients 1 = the same requests one after another. {s['rounds']} round(s) per engine, levels "
        "in a shuffled order each round; each mixed row is the round of median output tok/s, with the rounds' spread."
        f"{'' if s.get('prompt_cache', True) else ' No prompt cache on any server: every request prefills its whole prompt.'}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
        "",
    ]
    steps = s.get("batched_steps")
    if steps:
        cells = ", ".join(f"batch {b}: {v['median']:.1f} ms ({steps['decode_tok_s'][b]['median']:.0f} tok/s)"
                          for b, v in steps["decode_step_ms"].items())
        lines += [f"The batched engine's decode step in-process (no HTTP, rows of mixed adapters): {cells}; a 64-token "
                  f"prefill {steps['prefill_ms']['median']:.1f} ms (medians of {steps['prefill_ms']['n']} rounds).", ""]
        for b, prof in steps.get("profile", {}).items():
            ops = ", ".join(f"{g} {v['ms_per_step']:.2f} ms ({100 * v['share']:.0f} %)" for g, v in list(prof["by_op"].items())[:6])
            lines += [f"Kernel time per decode step at batch {b} (onnxruntime profiler): {prof['kernel_ms_per_step']:.2f} ms of "
                      f"{prof['run_ms_per_step']:.2f} ms a run; {ops}.", ""]
    for engine, e in s["engines"].items():
        if e["mixing_cost"] is not None:
            top = max(e["mixed"], key=int)
            lines += [f"Cost of mixing ({engine}) at {top} clients: {100 * e['mixing_cost']:.1f}% fewer output tokens/s "
                      "mixed than the same requests would give with each model's share run apart (from the one-model "
                      "rows; negative: mixing was faster).", ""]
    return lines


def serving_bundle(size: str, work: Path) -> Path:
    """The benchmark base of `size` with random r8 and r16 adapters as an int4 bundle (built once under `work`)."""
    from phi_pipeline.bench.models import SIZES, build_bench_base, export_bundle, make_random_adapter
    from phi_pipeline.bench.options import ADAPTER_RANKS
    from phi_pipeline.tiny.base_model import train_tokenizer

    arch = SIZES[size]
    tokenizer = work / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        train_tokenizer(min(arch.vocab_size, 1024)).save_pretrained(tokenizer)
    base = work / "base"
    if not (base / "config.json").is_file():
        build_bench_base(base, arch, tokenizer)
    bundle = work / "serving-int4" / "dist"
    if not (bundle / "manifest.json").is_file():
        peft = {n: make_random_adapter(base, work / "adapters" / n, r=r, seed=r, target_modules=arch.target_modules)
                for n, r in ADAPTER_RANKS.items()}
        exported = export_bundle(base, peft, ADAPTER_RANKS, "int4", work / "serving-int4" / "export")
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.copytree(exported.bundle, bundle)
    return bundle


def llama_server(work: Path, bundle: Path, tokens: int) -> PeerServer:
    """llama-server (built once) on serving_bundle's base at Q4_0 with its adapters as GGUF LoRAs."""
    import os

    from phi_pipeline.bench import peer as llama

    project = Path(".")
    home = llama.build(work.parent, llama.pinned_version(project), lambda m: sys.stderr.write(m + "\n"))
    names = [a["name"] for a in json.loads((bundle / "manifest.json").read_text())["adapters"]]
    adapters = {n: work / "adapters" / n / "adapter" for n in names}
    gguf = work / "gguf"
    models = llama.convert(home, work / "base", adapters[names[0]], gguf, lambda m: sys.stderr.write(m + "\n"))
    loras = {names[0]: models.lora}
    for name in names[1:]:
        out = gguf / f"lora-{name}-f32.gguf"
        loras[name] = out if out.is_file() else llama.convert_lora(home, gguf / "hf", adapters[name], out)
    base_name = json.loads((bundle / "manifest.json").read_text())["pipeline"]
    # twice the tokens a request needs: llama.cpp's tokenizer (trained for the GGUF) splits the text otherwise
    return PeerServer(home.tool("llama-server"), models.gguf[llama.LORA_QUANT], loras, base_name,
                      os.cpu_count() or 1, 2 * tokens)


def _decoder(bundle: Path, max_batch: int, kv_len: int, **session_options: object) -> tuple[Any, list[str | None]]:
    """The bundle's batched decoder with every adapter, and the adapters rows cycle through (None: the base)."""
    from phi_pipeline.runtime.batched import BatchedDecoder

    adapters = json.loads((bundle / "manifest.json").read_text())["adapters"]
    decoder = BatchedDecoder(bundle, {a["name"]: bundle / a["file"] for a in adapters}, max_batch=max_batch,
                             kv_len=kv_len, session_options=session_options)
    return decoder, [None, *(a["name"] for a in adapters)]


def _fill(decoder: Any, names: list[str | None], batch: int, ids: list[int]) -> list[str | None]:
    """Prefill rows 0..batch-1 with `ids`, row i with adapter names[i % len(names)]; the rows' adapters."""
    rows = [names[i % len(names)] for i in range(batch)]
    for row, adapter in enumerate(rows):
        decoder.prefill(ids, 0, adapter, row)
    return rows


def step_times(bundle: Path, batches: tuple[int, ...] = CONCURRENCY, prompt_len: int = 64, steps: int = 30,
               rounds: int = 3) -> dict[str, Any]:
    """What limits batched serving: ms per decode step of the batched engine's decoder at each batch size
    (rows of mixed adapters), and per 64-token prefill, in this process (no HTTP), `rounds` interleaved rounds."""
    decoder, names = _decoder(bundle, max(batches), prompt_len + steps + 8)
    ids = list(range(100, 100 + prompt_len))
    times: dict[str, list[float]] = {"prefill": [], **{str(b): [] for b in batches}}
    for _ in range(rounds):
        for b in batches:
            start = time.perf_counter()
            rows = _fill(decoder, names, b, ids)
            times["prefill"].append((time.perf_counter() - start) / b)
            decoder.decode([5] * b, [prompt_len] * b, rows)  # warm-up of this batch's LoRA inputs
            start = time.perf_counter()
            for s in range(steps):
                decoder.decode([5] * b, [prompt_len + 1 + s] * b, rows)
            times[str(b)].append((time.perf_counter() - start) / steps)
    return {"prefill_ms": summary([1000 * x for x in times["prefill"]], digits=2),
            "decode_step_ms": {str(b): summary([1000 * x for x in times[str(b)]], digits=2) for b in batches},
            "decode_tok_s": {str(b): summary([b / x for x in times[str(b)]], digits=1) for b in batches},
            "profile": {str(b): step_profile(bundle, b, prompt_len, steps) for b in (min(batches), max(batches))}}


def step_profile(bundle: Path, batch: int, prompt_len: int = 64, steps: int = 30) -> dict[str, Any]:
    """Kernel time per decode step by operator (LoRA nodes apart) at one batch size, rows of mixed adapters:
    onnxruntime's profiler over `steps` steps (adapter_costs' aggregation)."""
    import tempfile

    from phi_pipeline.bench.adapter_costs import _aggregate

    with tempfile.TemporaryDirectory() as tmp:
        decoder, names = _decoder(bundle, batch, prompt_len + steps + 8, enable_profiling=True,
                                  profile_file_prefix=f"{tmp}/step")
        rows = _fill(decoder, names, batch, list(range(100, 100 + prompt_len)))
        for s in range(steps):
            decoder.decode([5] * batch, [prompt_len + s] * batch, rows)
        trace = Path(decoder.session.end_profiling())
        return _aggregate(json.loads(trace.read_text()), steps)


def main(argv: list[str] | None = None) -> int:
    """Build the benchmark base with random adapters, serve it with each engine, write serving.json/.md."""
    import argparse

    from phi_pipeline.bench.models import SIZES

    p = argparse.ArgumentParser(prog="python -m phi_pipeline.bench.serving", description=main.__doc__)
    p.add_argument("--size", default="150m", choices=list(SIZES))
    p.add_argument("--rounds", type=int, default=3, help="rounds of every level per engine (default 3)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated (default batched,genai)")
    p.add_argument("--peer", choices=["llama.cpp"], help="also llama-server on the same model and adapters "
                   "(built from the pinned llama.cpp source, as make bench-peer does)")
    p.add_argument("--work-dir", type=Path, default=Path(".phi-pipeline/bench"))
    p.add_argument("--out", type=Path, default=Path("bench"))
    args = p.parse_args(argv)
    host = machine()
    work = args.work_dir / args.size
    bundle = serving_bundle(args.size, work)
    peer = llama_server(work, bundle, args.prompt_len + args.new_tokens) if args.peer else None
    result = bench_serving(bundle, work / "runs" / "serving", threads=None, prompt_len=args.prompt_len,
                           new_tokens=args.new_tokens, engines=tuple(args.engines.split(",")), rounds=args.rounds,
                           peer=peer)
    result["batched_steps"] = step_times(bundle)
    command = " ".join(["python -m phi_pipeline.bench.serving", *(argv or sys.argv[1:])])
    result |= {"size": args.size, "machine": host, "load_average_end": load_average(), "command": command}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n".join(["# Serving benchmark", "", f"Command: `{command}` on {describe(host)}.", "",
                      *report_lines(result)])
    (args.out / "serving.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
