"""Stall-free scheduling in the batched engine: a prompt going in while others decode takes runs of about one
decode step (phi_pipeline/runtime/scheduling.py), between decode steps, and changes no answer."""

from __future__ import annotations

import time

import pytest

from phi_pipeline.runtime.engine import EngineSettings
from phi_pipeline.runtime.scheduling import PrefillBudget, StepTimes
from phi_pipeline.serve.app import ServeSettings
from serve_support import CHAT_ADAPTER, TEMPLATE_ADAPTER, client, pace, running


def _run(budget: PrefillBudget, decode_s: float, fixed_s: float, per_token_s: float, rounds: int) -> list[int]:
    """Rounds of a machine where a prompt run takes fixed_s + per_token_s * tokens: the run lengths chosen."""
    chosen = []
    for _ in range(rounds):
        n = budget.tokens(decoding=True)
        chosen.append(n)
        budget.prefilled(n, fixed_s + per_token_s * n)
        budget.decoded(decode_s)
    return chosen


def test_prefill_budget_takes_the_whole_chunk_when_no_one_decodes():
    budget = PrefillBudget(chunk=128)
    budget.prefilled(8, 0.5)
    budget.decoded(0.001)
    assert budget.tokens(decoding=False) == 128


def test_prefill_budget_runs_settle_at_one_decode_steps_time():
    # a run costs 5 ms plus 0.5 ms a token; a decode step 20 ms: 30 tokens fill one step
    chosen = _run(PrefillBudget(chunk=128, floor=8), decode_s=0.020, fixed_s=0.005, per_token_s=0.0005, rounds=20)
    assert chosen[0] == 8  # nothing measured yet: the smallest run
    assert all(abs(n - 30) <= 2 for n in chosen[-5:]), chosen
    assert 0.005 + 0.0005 * chosen[-1] <= 0.020 * 1.1


def test_prefill_budget_stays_within_floor_and_chunk():
    assert set(_run(PrefillBudget(chunk=64), decode_s=1.0, fixed_s=0.0, per_token_s=0.001, rounds=10)[3:]) == {64}
    assert set(_run(PrefillBudget(chunk=64, floor=4), decode_s=0.001, fixed_s=0.01, per_token_s=0.01, rounds=10)) == {4}


def test_engine_takes_its_prefill_floor_from_the_settings():
    from phi_pipeline.runtime.engine import BatchedEngine

    engine = BatchedEngine(lambda: None, lambda: None, EngineSettings(prefill_min_tokens=8))
    assert engine.prefill_budget.floor == 8 and BatchedEngine(lambda: None, lambda: None).prefill_budget.floor == 32


def test_prefill_budget_unpaced_always_takes_the_chunk():
    assert set(_run(PrefillBudget(chunk=128, paced=False), 0.02, 0.005, 0.0005, rounds=5)) == {128}


def test_step_times_report_medians_of_the_recent_runs_only():
    times = StepTimes(keep=3)
    assert times.stats()["decode_step_s_p50"] is None and times.stats()["prefill_runs"] == 0
    for seconds, rows in ((9.0, 1), (0.02, 8), (0.03, 8), (0.04, 6)):  # the first falls out of the window
        times.decoded(seconds, rows)
    times.prefilled(32, 0.05)
    stats = times.stats()
    assert stats["decode_steps"] == 3 and stats["decode_step_s_p50"] == 0.03 and stats["decode_rows_p50"] == 8
    assert stats["prefill_run_s_p50"] == 0.05 and stats["prefill_tokens_p50"] == 32


@pytest.mark.parametrize("paced", [True, False])
def test_long_prompt_goes_in_between_decode_steps_and_answers_the_same(random_bundle, monkeypatch, paced):
    """A 300-token prompt arrives while a stream decodes: paced, its runs stay short and a decode step follows
    each; the answers are what each request gets alone."""
    from phi_pipeline.runtime.batched import BatchedDecoder

    calls: list[tuple[str, int]] = []
    real_prefill, real_decode = BatchedDecoder.prefill, BatchedDecoder.decode

    def prefill(self, ids, start, adapter, row):
        calls.append(("prefill", len(ids)))
        time.sleep(0.0002 * len(ids))  # a prompt token costs 0.2 ms: a 10 ms decode step fits about 50
        return real_prefill(self, ids, start, adapter, row)

    def decode(self, tokens, lengths, adapters):
        calls.append(("decode", len(tokens)))
        return real_decode(self, tokens, lengths, adapters)

    monkeypatch.setattr(BatchedDecoder, "prefill", prefill)
    monkeypatch.setattr(BatchedDecoder, "decode", decode)
    pace(monkeypatch, 0.01)  # a decode step of at least 10 ms: a short prompt run fits in one
    prompt = " ".join("abcdefgh"[i % 8] for i in range(300))
    settings = ServeSettings(random_bundle, max_tokens=400, engine=EngineSettings(pace_prefill=paced, prefix_cache_bytes=0),
                             engine_kind="batched")  # no cache: the second time, the prompt goes in whole again
    with running(settings) as (url, _):
        oa = client(url)
        alone = oa.completions.create(model=TEMPLATE_ADAPTER, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
        stream = iter(oa.completions.create(model=CHAT_ADAPTER, prompt="a", max_tokens=400, temperature=0, stream=True,
                                            extra_body={"min_tokens": 400}))
        next(stream)
        calls.clear()
        long = oa.completions.create(model=TEMPLATE_ADAPTER, prompt=prompt, max_tokens=8, temperature=0)
        assert long.choices[0].text == alone
        assert sum(1 for _ in stream) > 8
    n = long.usage.prompt_tokens
    runs = [k for kind, k in calls if kind == "prefill"]
    assert sum(runs) == n
    if paced:  # short runs, each between two decode steps of the stream
        assert max(runs) < 128 and len(runs) > -(-n // 128)
        at = [i for i, c in enumerate(calls) if c[0] == "prefill"]
        window = calls[at[0] : at[-1] + 1]
        assert not any(a[0] == b[0] == "prefill" for a, b in zip(window, window[1:]))  # never two runs in a row
    else:
        assert runs == [128] * (n // 128) + ([n % 128] if n % 128 else [])


def test_prompt_going_in_when_a_row_leaves_joins_below_it_and_answers_the_same(random_bundle, monkeypatch):
    """A prompt is written to the row past the decoding ones; a request that leaves meanwhile (here cancelled
    after the prompt's first run) shrinks the batch, so the prompt's row moves down when it joins: its answer
    and the stream still running are what each gets alone."""
    from phi_pipeline.runtime.batched import BatchedDecoder
    from phi_pipeline.runtime.engine import BatchedEngine

    moves: list[tuple[int, int]] = []
    real_move, real_round = BatchedDecoder.move, BatchedEngine._round

    def move(self, src, dst, length):
        moves.append((src, dst))
        return real_move(self, src, dst, length)

    def round_(self):  # the short stream's client goes away once the prompt has had a run
        if self._prefilling is not None and self._prefilling.fed and len(self._rows) == 2:
            self._rows[1].handle.cancel()
        return real_round(self)

    monkeypatch.setattr(BatchedDecoder, "move", move)
    monkeypatch.setattr(BatchedEngine, "_round", round_)
    pace(monkeypatch, 0.01)
    prompt = " ".join("abcdefgh"[i % 8] for i in range(300))
    settings = ServeSettings(random_bundle, max_tokens=400, engine=EngineSettings(prefill_chunk=64, prefix_cache_bytes=0),
                             engine_kind="batched")
    with running(settings) as (url, _):
        oa = client(url)
        alone = oa.completions.create(model=TEMPLATE_ADAPTER, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
        kept_alone = oa.completions.create(model=CHAT_ADAPTER, prompt="a", max_tokens=40, temperature=0,
                                           extra_body={"min_tokens": 40}).choices[0].text
        kept = oa.completions.create(model=CHAT_ADAPTER, prompt="a", max_tokens=40, temperature=0, stream=True,
                                     extra_body={"min_tokens": 40})
        pieces = [next(iter(kept)).choices[0].text]
        short = iter(oa.completions.create(model=CHAT_ADAPTER, prompt="b", max_tokens=400, temperature=0,
                                           stream=True, extra_body={"min_tokens": 400}))
        next(short)
        long = oa.completions.create(model=TEMPLATE_ADAPTER, prompt=prompt, max_tokens=8, temperature=0)
        pieces += [c.choices[0].text for c in kept if c.choices]
    assert moves == [(2, 1)]
    assert long.choices[0].text == alone
    assert "".join(pieces) == kept_alone
