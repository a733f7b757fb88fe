"""How many prompt tokens the batched engine prefills in a round while other requests are decoding.

GroupQueryAttention takes one prompt at a time with a past, so a prompt cannot join the decode step's call: it
goes in by its own model run between two decode steps, and every decoding client waits for that run. Stall-free
scheduling keeps the run within one decode step's time: a streaming client then waits about two steps between
tokens however long the prompts going in, and a prompt still advances every round.

The budget is found, not configured: the decode step's time (a running average, it grows with the batch) over the
recent prefill runs' seconds per token. A run's time is a fixed part (the weights read once) plus a part per
token, so seconds per token falls as runs grow; sizing the next run from the last one's rate moves the run
length toward the one whose time is a decode step (a fixed point, reached in a few rounds).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from statistics import median

SMOOTHING = 0.3
"""Weight of the newest run in the running averages."""


@dataclass
class PrefillBudget:
    chunk: int
    """The most prompt tokens in one run (EngineSettings.prefill_chunk), the whole of a round's when no one decodes."""
    floor: int = 32
    """The fewest tokens a run takes while others decode (EngineSettings.prefill_min_tokens, `serve
    --prefill-min-tokens`). A run has a fixed cost of about one one-row decode step (SmolLM2 on 2 cores: 14.5 ms
    for 1 token, 27 ms for 8, 74 ms for 32), so below this a prompt would go in mostly paying it: with one stream
    decoding in 11 ms steps, 8-token runs took a 1,500-token prompt 10 s to answer where 32-token runs take
    about 5 s."""
    paced: bool = True
    """False: every run takes `chunk` tokens (the engine before stall-free scheduling, for comparison)."""
    _decode_s: float | None = field(default=None, init=False)
    _token_s: float | None = field(default=None, init=False)

    def tokens(self, decoding: bool) -> int:
        """Prompt tokens for this round's run, `decoding`: whether any request is decoding."""
        if not (self.paced and decoding):
            return self.chunk
        if self._decode_s is None or self._token_s is None:
            return self.floor  # nothing measured yet: the smallest run, which the next rounds grow from
        return max(self.floor, min(self.chunk, int(self._decode_s / self._token_s)))

    def prefilled(self, tokens: int, seconds: float) -> None:
        self._token_s = _average(self._token_s, seconds / tokens)

    def decoded(self, seconds: float) -> None:
        self._decode_s = _average(self._decode_s, seconds)


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new


class StepTimes:
    """The engine's recent model runs, for /health: decode steps (seconds, rows) and prompt runs (seconds,
    tokens). A client's gap between tokens is a decode step, plus a prompt run in the rounds that have one: the
    chat bench compares its inter-token p95 with the decode step read here."""

    def __init__(self, keep: int = 4096):
        self._decode: collections.deque[tuple[float, int]] = collections.deque(maxlen=keep)
        self._prefill: collections.deque[tuple[float, int]] = collections.deque(maxlen=keep)

    def decoded(self, seconds: float, rows: int) -> None:
        self._decode.append((seconds, rows))

    def prefilled(self, tokens: int, seconds: float) -> None:  # PrefillBudget.prefilled's order: fed side by side
        self._prefill.append((seconds, tokens))

    def stats(self) -> dict[str, float | int | None]:
        # copied first: /health reads on the server's thread while the engine's thread appends
        decode, prefill = tuple(self._decode), tuple(self._prefill)

        def p50(runs: tuple[tuple[float, int], ...], i: int) -> float | None:
            return round(median(r[i] for r in runs), 4) if runs else None

        return {"decode_steps": len(decode), "decode_step_s_p50": p50(decode, 0),
                "decode_rows_p50": p50(decode, 1), "prefill_runs": len(prefill),
                "prefill_run_s_p50": p50(prefill, 0), "prefill_tokens_p50": p50(prefill, 1)}
