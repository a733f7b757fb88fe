"""The multi-turn chat bench (phi_pipeline/bench/chat.py): scripted conversations from eval rows, every turn of
every client timed against a running server, the prefix cache's counters read back."""

from __future__ import annotations

import json

import httpx2

from phi_pipeline.bench.chat import Conversation, conversations, eval_rows, rounds_summary, run_chats, turn_speedups
from phi_pipeline.runtime.engine import EngineSettings
from phi_pipeline.serve.app import ServeSettings
from serve_support import CHAT_ADAPTER, TEMPLATE_ADAPTER, running

BASE = "bench-int4"


def test_eval_rows_read_chat_and_template_rows_as_user_and_reply(tmp_path):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "Extract: Ana, 30, Lima"}, {"role": "assistant", "content": '{"name": "Ana"}'}]}) + "\n")
    (tmp_path / "templ.jsonl").write_text(json.dumps({"input": "the cold house", "output": "the hot house"}) + "\n")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"adapters": [
        {"name": "extract", "prompt_format": {"type": "chat"}, "dataset": {"eval": "chat.jsonl"}},
        {"name": "antonyms", "prompt_format": {"type": "template", "prefix": "Opposite: {input}\nAnswer:"},
         "dataset": {"eval": "templ.jsonl"}}]}))
    rows = eval_rows(bundle, tmp_path)
    assert rows == {"extract": [("Extract: Ana, 30, Lima", '{"name": "Ana"}')],
                    "antonyms": [("the cold house", "the hot house")]}
    chats = conversations(["base", "extract", "antonyms"], rows, clients=4, turns=2)
    assert [c.model for c in chats] == ["base", "extract", "antonyms", "base"]
    assert chats[2].turns == (("the cold house", "the hot house"),) * 2
    assert chats[0].turns[0] == ("Extract: Ana, 30, Lima", '{"name": "Ana"}')  # the base model talks like the first


def test_chat_bench_times_every_turn_of_every_client_and_later_turns_reuse_the_conversation(random_bundle):
    turns = (("a b c", "d e"), ("f g h", "i j"), ("k l", "m n"))
    chats = [Conversation(m, turns) for m in (BASE, CHAT_ADAPTER, TEMPLATE_ADAPTER, CHAT_ADAPTER)]
    settings = ServeSettings(random_bundle, max_tokens=64, engine_kind="batched", engine=EngineSettings(max_active=4))
    with running(settings) as (url, srv):
        run = run_chats(url.removeprefix("http://"), chats, 6, lambda model: {"min_tokens": 6})
        cache = srv.engine.prefix_cache.stats()
        steps = httpx2.get(f"{url}/health").json()["steps"]
    assert run["failed"] == 0 and run["turns"] == 3 and run["output_tokens"] == 4 * 3 * 6
    assert [t["n"] for t in run["ttft_s_per_turn"]] == [4, 4, 4] and run["inter_token_s"]["n"] > 0
    # turns 2 and 3 of the three chat conversations start with the turns before them (the template adapter
    # formats the last message alone, and its fixed template head is a prefix too)
    assert cache["hits"] >= 6 and cache["reused_tokens"] > 0
    # /health's engine figures: every prompt had at least one run, every answer token after the first a step
    assert steps["prefill_runs"] >= 12 and steps["decode_steps"] >= 5 and 1 <= steps["decode_rows_p50"] <= 4
    assert 0 < steps["decode_step_s_p50"] and 1 <= steps["prefill_tokens_p50"]


def _run(ttfts: list[float], p95: float, tok_s: float, step: float | None = None) -> dict:
    run = {"ttft_s_per_turn": [{"p50": t} for t in ttfts], "inter_token_s": {"p95": p95}, "output_tok_s": tok_s}
    return run | ({"steps": {"decode_step_s_p50": step, "prefill_run_s_p50": 2 * step}} if step else {})


def test_chat_rounds_summary_takes_medians_per_turn_and_speedups_divide_them():
    servers = {"ours": [_run([0.4, 0.1], 0.09, 160, 0.03), _run([0.5, 0.3], 0.08, 170, 0.04), _run([0.3, 0.2], 0.10, 150, 0.05)],
               "no cache": [_run([0.5, 0.6], 0.09, 110), _run([0.4, 0.8], 0.09, 120), _run([0.6, 0.4], 0.09, 100)]}
    rounds = rounds_summary(servers)
    assert [t["median"] for t in rounds["ours"]["ttft_p50_s_per_turn"]] == [0.4, 0.2]
    assert rounds["ours"]["ttft_p50_s_per_turn"][1] == {"median": 0.2, "min": 0.1, "max": 0.3, "n": 3}
    assert rounds["ours"]["inter_token_p95_s"]["median"] == 0.09 and rounds["no cache"]["output_tok_s"]["median"] == 110
    assert turn_speedups(rounds, "ours", "no cache") == [1.25, 3.0]
    # each round's inter-token p95 over its own decode step: 3.0, 2.0, 2.0; only servers reporting steps have it
    assert rounds["ours"]["inter_token_p95_over_decode_step"]["median"] == 2.0
    assert rounds["ours"]["decode_step_s_p50"]["median"] == 0.04 and "decode_step_s_p50" not in rounds["no cache"]
