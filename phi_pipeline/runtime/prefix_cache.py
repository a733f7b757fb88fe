"""The batched engine's prefix cache: finished requests' KV rows in host RAM, found again by token prefix.

A chat client sends the whole conversation every turn, so turn N starts with the token ids of turns 1..N-1 as
the server formatted and generated them. When a request leaves the batch its keys and values are kept here
under its adapter and token ids; a new request whose ids begin with a kept entry's copies that KV into the
row its prompt goes into and prefills only the rest. As in llama-server's `cache_prompt` and vLLM's automatic
prefix caching:
- matching is on token ids, not text;
- the adapter is part of the key: a LoRA changes every layer's keys and values (llama.cpp #26207 is the bug
  of leaving it out);
- entries are evicted least recently used once their bytes pass the budget.

An entry is a list of segments, each the KV of consecutive positions. A request that restored a whole entry
leaves the same segments plus one copy of its own new positions (a chat turn's suffix and answer), not a copy
of the whole conversation: copying 300 positions of SmolLM2 took 7-15 ms of the round the request left in.
The entry it extends goes at the same time, so the shared segments are counted once.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Sequence

import numpy as np

KV = list[tuple[np.ndarray, np.ndarray]]
"""Per layer (keys, values), each [kv_heads, tokens, head_size]."""
Segments = tuple[KV, ...]
"""KV of consecutive positions, in order: together, an entry's positions 0..len(tokens)-1."""


def positions(segment: KV) -> int:
    return segment[0][0].shape[1]


@dataclass(frozen=True)
class Entry:
    adapter: str | None
    tokens: np.ndarray
    """int64 ids whose keys and values `kv` holds, in order."""
    kv: Segments

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for segment in self.kv for k, v in segment)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading ids `a` and `b` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """Entries by recency (oldest first) within `budget_bytes`; hit and reuse counters for /health."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self._next = 0
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, adapter: str | None, ids: Sequence[int]) -> tuple[int, Entry | None]:
        """The longest kept prefix of `ids` under `adapter`: (tokens to reuse, entry), or (0, None). At most
        len(ids) - 1 tokens are reused: the last one is fed again, its logits choose the first new token."""
        query = np.asarray(ids, np.int64)
        best, best_len = None, 0
        for key, entry in self._entries.items():
            if entry.adapter == adapter:
                n = min(common_prefix(entry.tokens, query), len(query) - 1)
                if n > best_len:
                    best, best_len = key, n
        if best is None:
            self.misses += 1
            return 0, None
        self._entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += best_len
        return best_len, self._entries[best]

    def store(self, adapter: str | None, tokens: Sequence[int], kv: Segments) -> None:
        """Keep a finished request's KV; entries it extends (same adapter, their ids a prefix of its) go."""
        entry = Entry(adapter, np.asarray(tokens, np.int64), kv)
        if not len(entry.tokens) or entry.nbytes > self.budget_bytes:
            return
        for key, old in list(self._entries.items()):
            if old.adapter == adapter and common_prefix(old.tokens, entry.tokens) == len(old.tokens):
                self._drop(key)
        self._entries[self._next] = entry
        self._next += 1
        self.bytes += entry.nbytes
        while self.bytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))

    def drop_adapter(self, adapter: str) -> None:
        """Forget every entry of an adapter version that is no longer served."""
        for key in [k for k, e in self._entries.items() if e.adapter == adapter]:
            self._drop(key)

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).nbytes

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.bytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "misses": self.misses, "reused_tokens": self.reused_tokens}
