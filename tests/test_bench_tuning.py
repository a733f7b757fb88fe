"""bench/tuning.py: the variants tried against llama.cpp, their pairing with the shipped bundle and
their computed verdicts."""

from __future__ import annotations

import json

import pytest

from phi_pipeline.bench import report, tuning
from phi_pipeline.evaluate import speed


def _round(decode: float, ttft: float) -> dict:
    return {"64": {"decode_tok_s": decode, "ttft_s": ttft}, "512": {"decode_tok_s": decode / 2, "ttft_s": 8 * ttft}}


def _shipped(tmp_path):
    (tmp_path / "genai_config.json").write_text(json.dumps(
        {"model": {"decoder": {"session_options": {"intra_op_num_threads": 0, "log_id": "x"}}}}))
    return tmp_path


@pytest.mark.parametrize(("ratios", "expected"), [
    (([1.1] * 9 + [0.9], [1.05] * 10), "faster"),
    (([1.1] * 10, [1.01] * 10), "no measurable change"),  # one prompt length within the noise
    (([1.2] * 7 + [0.9] * 3, [1.2] * 10), "no measurable change"),  # a median that 3 rounds of 10 contradict
    (([0.9] * 10, [0.96] * 8 + [1.1] * 2), "slower"),
    (([], [1.1]), "not measured"),
])
def test_variant_verdict_needs_every_prompt_length_beyond_the_noise_in_most_rounds(ratios, expected):
    assert speed.verdict([list(r) for r in ratios]) == expected


def test_variants_run_on_the_shipped_session_options_and_export_only_what_they_change(tmp_path):
    shipped = _shipped(tmp_path)
    exported, merged = [], []
    variants = (
        tuning.Variant("block 128", "b", export={"int4_block_size": 128}),
        tuning.Variant("no spinning", "s", session={"session.intra_op.allow_spinning": "0"}),
        tuning.Variant("no LoRA inputs", "m", merged=True),
    )
    tuned = tuning.prepare(shipped, lambda v: exported.append(v.name) or tmp_path / tuning.slug(v),
                           lambda: merged.append(1) or tmp_path / "merged", variants)
    assert exported == ["block 128"] and merged == [1]
    assert [t.model.name for t in tuned] == ["block-128", shipped.name, "merged"]
    assert tuned[1].session_options == {"intra_op_num_threads": 0, "log_id": "x", "session.intra_op.allow_spinning": "0"}
    assert all(t.session_options["intra_op_num_threads"] == 0 for t in tuned)


def test_tried_ratios_pair_each_variant_with_the_shipped_bundle_of_the_same_round(tmp_path):
    variant = tuning.Variant("block 128", "block size 128", export={"int4_block_size": 128})
    tuned = [tuning.TunedModel(variant, tmp_path, {})]
    # round 1: the machine is busy (everything at half speed); the variant is 10 % faster in both rounds
    rounds = {"bundle int4": [_round(100, 0.1), _round(200, 0.05)],
              "llama.cpp Q4_0": [_round(110, 0.08), _round(220, 0.04)],
              tuning.row_name(variant): [_round(110, 0.1), _round(220, 0.05)]}
    [row] = tuning.summarize(tuned, rounds, "bundle int4", "llama.cpp Q4_0", {"block 128": 50}, (64, 512))
    assert row["decode_vs_shipped"]["64"] == {"median": 1.1, "min": 1.1, "max": 1.1, "n": 2}
    assert row["decode_vs_llama_q4_0"]["512"]["median"] == 1.0
    assert row["first_token_speed_vs_shipped"]["64"]["median"] == 1.0
    assert row["verdict"] == "faster" and row["size_bytes"] == 50  # faster in both rounds, by 10 %
    assert row["faster_than_shipped_in"] == {"64": "2/2", "512": "2/2"}
    table = report.tried_table([row], ["64", "512"])
    assert table[2].startswith("| block 128 | block size 128 |") and "(2/2 faster)" in table[2]


def test_every_variant_but_the_control_changes_one_thing_and_has_a_distinct_folder():
    assert tuning.VARIANTS[0] is tuning.CONTROL
    assert not (tuning.CONTROL.export or tuning.CONTROL.session or tuning.CONTROL.merged)
    for v in tuning.VARIANTS[1:]:
        assert sum((bool(v.export), bool(v.session), v.merged)) == 1, v
    assert len({tuning.slug(v) for v in tuning.VARIANTS}) == len(tuning.VARIANTS)


def test_export_variants_name_real_export_options():
    from phi_pipeline.pipeline_spec.schema import ExportSpec

    for v in tuning.VARIANTS:
        if v.export:
            ExportSpec(**v.export)  # extra="forbid": a misspelt option fails here
