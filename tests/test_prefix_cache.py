"""The batched engine's prefix cache (runtime/prefix_cache.py): lookups by token prefix with the adapter in the
key, LRU eviction under a byte budget, and a chat's later turns answered the same with and without it."""

from __future__ import annotations

import httpx2
import numpy as np
import pytest

from phi_pipeline.runtime.engine import EngineSettings
from phi_pipeline.runtime.prefix_cache import PrefixCache
from phi_pipeline.serve.app import ServeSettings
from serve_support import CHAT_ADAPTER, client, running

BASE = "bench-int4"  # the random bundle's pipeline name


def _kv(tokens: int, layers: int = 2) -> tuple[list[tuple[np.ndarray, np.ndarray]]]:
    """One segment: KV of `tokens` positions whose values say which position they are."""
    pos = np.arange(tokens, dtype=np.float32)[None, :, None] * np.ones((1, 1, 4), np.float32)
    return ([(pos.copy(), -pos) for _ in range(layers)],)


def test_lookup_finds_the_longest_prefix_under_the_same_adapter_only():
    cache = PrefixCache(1 << 20)
    cache.store("tone", [1, 2, 3, 4], _kv(4))
    cache.store("tone", [1, 2, 9], _kv(3))
    cache.store(None, [1, 2, 3, 4, 5, 6], _kv(6))
    reused, entry = cache.lookup("tone", [1, 2, 3, 4, 7, 8])
    assert reused == 4 and entry.tokens.tolist() == [1, 2, 3, 4]
    assert cache.lookup("antonyms", [1, 2, 3, 4, 7, 8]) == (0, None)  # a LoRA changes every layer's K/V
    assert cache.lookup(None, [1, 2, 3, 4, 5, 6])[0] == 5  # one token is always left to prefill
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 1 and cache.stats()["reused_tokens"] == 9


def test_store_evicts_least_recently_used_entries_past_the_budget():
    one = sum(k.nbytes + v.nbytes for k, v in _kv(4)[0])
    cache = PrefixCache(2 * one)
    cache.store(None, [1, 1, 1, 1], _kv(4))
    cache.store(None, [2, 2, 2, 2], _kv(4))
    cache.lookup(None, [1, 1, 1, 1, 5])  # [1...] is now the most recently used
    cache.store(None, [3, 3, 3, 3], _kv(4))
    assert len(cache) == 2 and cache.bytes == 2 * one
    assert cache.lookup(None, [2, 2, 2, 2, 5]) == (0, None)
    assert cache.lookup(None, [1, 1, 1, 1, 5])[0] == 4 and cache.lookup(None, [3, 3, 3, 3, 5])[0] == 4
    cache.store(None, list(range(100)), _kv(100))  # larger than the whole budget: not kept, nothing evicted
    assert len(cache) == 2


def test_a_longer_conversation_replaces_the_entry_it_extends():
    cache = PrefixCache(1 << 20)
    cache.store(None, [1, 2, 3], _kv(3))
    cache.store("tone", [1, 2, 3], _kv(3))
    cache.store(None, [1, 2, 3, 4, 5], _kv(5))
    assert len(cache) == 2 and cache.lookup(None, [1, 2, 3, 4, 5, 6])[0] == 5


def _conversation(oa, model: str, turns: list[str]) -> list[str]:
    """Greedy answers of a chat whose every turn resends the whole conversation, as chat clients do."""
    messages, answers = [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        reply = oa.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12)
        answers.append(reply.choices[0].message.content)
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


@pytest.mark.parametrize("model", [BASE, CHAT_ADAPTER])
def test_later_turns_reuse_the_conversation_and_answer_as_without_the_cache(random_bundle, model):
    turns = ["a b c", "d e f g", "h i"]
    answers = {}
    for budget in (0, 64 << 20):
        settings = ServeSettings(random_bundle, max_tokens=64, engine_kind="batched",
                                 engine=EngineSettings(prefix_cache_bytes=budget))
        with running(settings) as (url, srv):
            answers[budget] = _conversation(client(url), model, turns)
            health = httpx2.get(f"{url}/health").json()
            if budget:
                # turns 2 and 3 start with the turns before them; another adapter's entries never match
                assert health["prefix_cache"]["hits"] == 2 and health["prefix_cache"]["reused_tokens"] > 0
                if model == CHAT_ADAPTER:  # turn 2 restored turn 1's whole entry and kept it as its first segment
                    assert max(len(e.kv) for e in srv.engine.prefix_cache._entries.values()) == 2
                assert _conversation(client(url), BASE if model != BASE else CHAT_ADAPTER, turns[:1])
                assert httpx2.get(f"{url}/health").json()["prefix_cache"]["hits"] == 2
            else:
                assert "prefix_cache" not in health and srv.engine.prefix_cache is None
    assert answers[64 << 20] == answers[0]
