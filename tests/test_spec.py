"""Spec validation: good specs load, bad ones list every problem with its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from phi_pipeline.errors import UsageError
from phi_pipeline.pipeline_spec.schema import load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
name: demo
base_model:
  name_or_path: models/base
lora:
  r: 4
training:
  max_steps: 10
adapters:
  - name: first
    data: {train: a.jsonl, eval: b.jsonl, messages_field: messages}
  - name: second
    data: {train: c.jsonl, eval: d.jsonl, text_template: "Q: {q}\\nA: {a}", response_field: a}
    lora: {r: 16}
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(UsageError) as info:
        parse_spec(text, source="spec.yaml")
    return info.value.problems


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spec_loads(path):
    spec = load_spec(path)
    assert spec.adapters and spec.name == path.stem


def test_adapter_inherits_top_level_blocks_key_by_key():
    spec = parse_spec(GOOD)
    first, second = spec.adapters
    assert (first.lora.r, second.lora.r) == (4, 16)
    assert first.training.max_steps == second.training.max_steps == 10
    assert second.lora.alpha == 16.0  # model default where neither block sets it


def test_spec_errors_are_all_reported_at_once_with_lines():
    bad = """\
name: demo
base_model:
  name_or_path: m
  colour: blue
lora:
  r: 0
training:
  max_steps: -3
adapters:
  - name: ../evil
    data: {train: a.jsonl, eval: b.jsonl, messages_field: messages}
  - name: ok
    data: {train: a.jsonl, eval: b.jsonl, messages_field: messages}
  - name: ok
    data: {train: a.jsonl, eval: b.jsonl, messages_field: messages}
"""
    problems = problems_of(bad)
    text = "\n".join(problems)
    assert "line 4, base_model.colour: unknown key" in text
    assert "line 6, lora.r: Input should be greater than or equal to 1" in text
    assert "line 8, training.max_steps: Input should be greater than or equal to 1" in text
    assert "line 10, adapters.0.name: adapter name '../evil' is not a safe file name" in text
    assert "adapter names must be unique; repeated: ok" in text
    # inherited errors are reported once, at the top-level block, not again per adapter
    assert sum(".lora.r:" in p or p.startswith("line 6, lora.r:") for p in problems) == 1
    assert len(problems) == 5


def test_adapter_name_with_path_separator_is_refused():
    text = GOOD.replace("name: first", "name: sub/dir")
    assert any("adapters.0.name" in p and "not a safe file name" in p for p in problems_of(text))


def test_template_must_end_with_response_field():
    text = GOOD.replace('"Q: {q}\\nA: {a}"', '"Q: {q} A: {a} end"')
    (problem,) = problems_of(text)
    assert "adapters.1.data" in problem and "nothing may follow {a}" in problem


def test_data_needs_exactly_one_format():
    text = GOOD.replace(", messages_field: messages}", "}")
    (problem,) = problems_of(text)
    assert "set exactly one of text_template" in problem


def test_max_steps_and_epochs_together_are_refused():
    text = GOOD.replace("max_steps: 10", "max_steps: 10\n  epochs: 2")
    assert any("set max_steps or epochs, not both" in p for p in problems_of(text))


def test_invalid_yaml_names_the_line():
    (problem,) = problems_of("name: demo\nadapters: [\n  - x: : y\n")
    assert problem.startswith("line ") and "not valid YAML" in problem


def test_missing_spec_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert "cannot read the spec" in info.value.problems[0]
