"""bench/real_peer.py's arithmetic on recorded rounds (the bench itself needs llama.cpp and the SmolLM2 bundle)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_peer():
    spec = importlib.util.spec_from_file_location("real_peer", ROOT / "bench" / "real_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rounds(*tok_s: float) -> list[dict]:
    return [{"64": {"decode_tok_s": t, "ttft_s": 0.1}} for t in tok_s]


def test_adapter_costs_are_each_runtimes_share_and_milliseconds_against_itself_per_round(real_peer):
    q = real_peer.LORA_QUANT
    rounds = {"bundle int4": _rounds(100, 125), "bundle int4 + adapter": _rounds(80, 100),
              f"llama.cpp {q} (llama-completion)": _rounds(50, 50),
              f"llama.cpp {q} + adapter (llama-completion)": _rounds(40, 25)}
    costs = real_peer.adapter_costs(rounds, [64])
    assert costs["decode_share_bundle@64"]["median"] == pytest.approx(0.2)  # 1 - 80/100 and 1 - 100/125
    assert costs["ms_per_token_bundle@64"]["min"] == pytest.approx(2.0)  # 12.5 - 10 ms and 10 - 8 ms
    assert costs["ms_per_token_bundle@64"]["max"] == pytest.approx(2.5)
    assert costs["decode_share_llama.cpp@64"]["max"] == pytest.approx(0.5)
    assert costs["ms_per_token_llama.cpp@64"]["median"] == pytest.approx(12.5)  # (5 + 20) / 2
