"""The multi-turn chat bench (phi_pipeline/bench/chat.py): scripted conversations from eval rows, every turn of
every client timed against a running server, the prefix cache's counters read back."""

from __future__ import annotations

import json

from phi_pipeline.bench.chat import Conversation, conversations, eval_rows, run_chats
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
    assert run["failed"] == 0 and run["turns"] == 3 and run["output_tokens"] == 4 * 3 * 6
    assert [t["n"] for t in run["ttft_s_per_turn"]] == [4, 4, 4] and run["inter_token_s"]["n"] > 0
    # turns 2 and 3 of the three chat conversations start with the turns before them (the template adapter
    # formats the last message alone, and its fixed template head is a prefix too)
    assert cache["hits"] >= 6 and cache["reused_tokens"] > 0
