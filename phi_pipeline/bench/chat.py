"""Multi-turn chat: `clients` conversations at once, each resending its whole conversation every turn.

Each client holds one conversation with one model (clients cycle through the base model and the adapters) and
sends its turns one after another, each a streamed `/v1/chat/completions` with the conversation so far, as chat
clients do. The conversations are scripted from the adapters' eval rows (the user turns and the assistant replies
kept in the history), so every server sees the same prompts, and every answer is exactly `new_tokens` tokens
(`min_tokens` here, `ignore_eos` on llama-server), so every server decodes the same amount: what differs is how
much of each prompt a server prefills again. A text-template adapter formats only the last user message (it was
trained on single turns), so its turns do not grow.

Figures per server: time to first token per turn (p50, p95 over the clients), inter-token latency (the gaps
between a stream's content events) p50 and p95, output tokens/s over the run, and for ours the prefix cache's
counters and the engine's decode step and prompt run times from /health (the inter-token p95 against a decode
step alone). Servers: ours with the prefix cache and with `--prefix-cache-mb 0`, and llama-server on
the same model with the same adapters as GGUF LoRAs (`cache_prompt` on, its default; `lora` per request).
"""

from __future__ import annotations

import json
import string
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from phi_pipeline.bench.serving import percentiles, stream_events
from phi_pipeline.evaluate.stats import load_average, summary


@dataclass(frozen=True)
class Conversation:
    model: str
    turns: tuple[tuple[str, str], ...]
    """(user message, assistant reply kept in the history), in order."""


def eval_rows(bundle: Path, project_root: Path) -> dict[str, list[tuple[str, str]]]:
    """Each adapter's eval rows as (user message, reply): a chat row's first user and assistant messages, a
    text-template row's template field and its other field (the response)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    out = {}
    for adapter in manifest["adapters"]:
        fmt = adapter["prompt_format"]
        rows = []
        for line in (project_root / adapter["dataset"]["eval"]).read_text().splitlines():
            row = json.loads(line)
            if fmt["type"] == "chat":
                by_role = {m["role"]: m["content"] for m in reversed(row["messages"])}
                rows.append((by_role["user"], by_role["assistant"]))
            else:
                (field,) = {name for _, name, _, _ in string.Formatter().parse(fmt["prefix"]) if name}
                rows.append((row[field], next(v for k, v in row.items() if k != field)))
        out[adapter["name"]] = rows
    return out


def conversations(models: list[str], rows: dict[str, list[tuple[str, str]]], clients: int, turns: int) -> list[Conversation]:
    """Client i talks to models[i % len(models)]; its turns are that adapter's eval rows (the base model's: the
    first adapter's), each client from its own offset."""
    fallback = next(iter(rows.values()))
    out = []
    for i in range(clients):
        model = models[i % len(models)]
        pool = rows.get(model, fallback)
        out.append(Conversation(model, tuple(pool[(i * turns + t) % len(pool)] for t in range(turns))))
    return out


@dataclass
class TurnTiming:
    ttft_s: float
    gaps_s: list[float]
    tokens: int


def chat_turn(url: str, model: str, messages: list[dict[str, str]], new_tokens: int, extra: dict[str, Any]) -> TurnTiming:
    """One streamed chat completion, timed at this client."""
    body = {"model": model, "messages": messages, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    for event in stream_events(url, "/v1/chat/completions", body):
        if event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
            stamps.append(time.perf_counter())
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    if not stamps:
        raise RuntimeError(f"no content streamed for model {model}")
    # gaps between content events: a token that completes no text (part of a character) joins the next one
    return TurnTiming(stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])], tokens or len(stamps))


def run_chats(url: str, chats: list[Conversation], new_tokens: int, extra: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """Every conversation on its own thread at once; per turn and overall figures."""
    timings: list[list[TurnTiming]] = [[] for _ in chats]
    errors: list[str] = []

    def client(i: int) -> None:
        messages: list[dict[str, str]] = []
        try:
            for user, reply in chats[i].turns:
                messages.append({"role": "user", "content": user})
                timings[i].append(chat_turn(url, chats[i].model, messages, new_tokens, extra(chats[i].model)))
                messages.append({"role": "assistant", "content": reply})
        except Exception as exc:  # recorded: one failed client must not hang the run
            errors.append(f"{type(exc).__name__}: {exc}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(chats))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    turns = max(len(c.turns) for c in chats)
    done = [t for ts in timings for t in ts]
    tokens = sum(t.tokens for t in done)
    return {
        "clients": len(chats), "turns": turns, "failed": len(errors), "errors": errors[:5], "wall_s": round(wall, 3),
        "ttft_s_per_turn": [percentiles([ts[n].ttft_s for ts in timings if len(ts) > n]) for n in range(turns)],
        "inter_token_s": percentiles([g for t in done for g in t.gaps_s]),
        "output_tokens": tokens, "output_tok_s": round(tokens / wall, 2), "load_average": load_average(),
    }


def bench_chat(servers: dict[str, Callable[[], Any]], chats: list[Conversation], new_tokens: int, rounds: int) -> dict[str, Any]:
    """Each server (name -> start function returning a serving.Server) in turn: a warm-up turn, then the
    conversations `rounds` times (each round from an empty cache: the server restarts)."""
    out: dict[str, Any] = {}
    for name, start in servers.items():
        runs = []
        for _ in range(rounds):
            server = start()
            try:
                server.wait_ready()
                warm = chats[0]
                chat_turn(server.url, warm.model, [{"role": "user", "content": "Hello"}], 2, server.extra(warm.model, 2))
                run = run_chats(server.url, chats, new_tokens, lambda model, s=server: s.extra(model, new_tokens))
                health = server.health()  # ours only: llama-server's /health has neither field
                runs.append(run | {k: health[k] for k in ("prefix_cache", "steps") if k in health})
            finally:
                server.close()
        out[name] = runs
    return out


def rounds_summary(servers: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per server, over its rounds (median, min, max): each turn's TTFT p50, the inter-token p95, output tok/s;
    for ours also the inter-token p95 over the engine's decode step alone (its p50, from /health)."""
    out = {}
    for name, runs in servers.items():
        turns = len(runs[0]["ttft_s_per_turn"])
        out[name] = {
            "ttft_p50_s_per_turn": [summary([r["ttft_s_per_turn"][t]["p50"] for r in runs]) for t in range(turns)],
            "inter_token_p95_s": summary([r["inter_token_s"]["p95"] for r in runs]),
            "output_tok_s": summary([r["output_tok_s"] for r in runs], digits=1),
        }
        steps = [r for r in runs if (r.get("steps") or {}).get("decode_step_s_p50")]
        if steps:
            out[name]["inter_token_p95_over_decode_step"] = summary(
                [r["inter_token_s"]["p95"] / r["steps"]["decode_step_s_p50"] for r in steps])
            out[name]["decode_step_s_p50"] = summary([r["steps"]["decode_step_s_p50"] for r in steps])
            out[name]["prefill_run_s_p50"] = summary([r["steps"]["prefill_run_s_p50"] for r in steps
                                                      if r["steps"]["prefill_run_s_p50"] is not None])
    return out


def turn_speedups(rounds: dict[str, dict[str, Any]], ours: str, other: str) -> list[float]:
    """How many times sooner server `ours` answers first than `other`, per turn (rounds_summary's medians)."""
    pairs = zip(rounds[ours]["ttft_p50_s_per_turn"], rounds[other]["ttft_p50_s_per_turn"])
    return [round(theirs["median"] / mine["median"], 2) for mine, theirs in pairs]
