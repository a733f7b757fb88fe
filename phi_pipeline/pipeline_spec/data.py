"""Reading and checking an adapter's data before any training starts.

Sources: a local JSON Lines file, a local JSON file holding an array of examples (optionally nested
under `field`), or a Hugging Face hub dataset split. Every problem of every split is collected (file,
line or array index, field), at most a handful of rows per file and problem, so one run tells the user
everything to fix. The same readers give evaluation its prompts and references, and cut the seeded
validation split out of the training rows.

Pure apart from reading files: `datasets` is imported only for hub sources.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi_pipeline.pipeline_spec.schema import DataSpec, template_fields

CHAT_ROLES = ("system", "user", "assistant")
SHOW_ROWS = 5
"""Rows named per file and problem before '... and N more'."""


@dataclass(frozen=True)
class Example:
    """One row as the model sees it: a prompt to complete and the reference answer."""

    line: int
    """Where the row is in its source: line (JSON Lines), array index (JSON) or row number (hub)."""
    prompt: str | list[dict[str, str]]
    """Text before the answer (template data) or the chat messages before the answer (chat data)."""
    reference: str


@dataclass
class Rows:
    """The parsed rows of one split and how their positions are named ("line", "index" or "row")."""

    unit: str
    items: list[tuple[int, Any]]

    def where(self, nums: list[int]) -> str:
        shown = ", ".join(str(n) for n in nums[:SHOW_ROWS])
        more = f" ... and {len(nums) - SHOW_ROWS} more" if len(nums) > SHOW_ROWS else ""
        plural = {"line": "lines", "index": "indices", "row": "rows"}[self.unit] if len(nums) > 1 else self.unit
        return f"{plural} {shown}{more}"


def _decode(path: Path, problems: list[str]) -> str | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        problems.append(f"{path}: file not found")
        return None
    except OSError as exc:
        problems.append(f"{path}: cannot read it ({exc.strerror or exc})")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        problems.append(
            f"{path}: line {line} is not valid UTF-8 (byte {raw[exc.start]:#04x} at column {column}); "
            "save the file as UTF-8"
        )
        return None


def read_file_rows(path: Path, problems: list[str], field: str | None = None) -> Rows:
    """The rows of a local file: a JSON document holding an array (at `field` when given), else JSON Lines,
    as Hugging Face's json loader reads them."""
    text = _decode(path, problems)
    if text is None:
        return Rows("line", [])
    start = text.lstrip()[:1]
    if field is not None or start == "[":
        return _array_rows(path, text, field, problems)
    rows, bad = Rows("line", []), {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.items.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            bad.setdefault(n, f"{exc.msg} at column {exc.colno}")
    if bad:
        nums = list(bad)
        first = bad[nums[0]] if len(nums) == 1 else f"line {nums[0]}: {bad[nums[0]]}"
        problems.append(f"{path}: invalid JSON on {rows.where(nums)} ({first})")
    if not rows.items and not problems:
        problems.append(f"{path}: the file has no examples")
    return rows


def _array_rows(path: Path, text: str, field: str | None, problems: list[str]) -> Rows:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.append(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})")
        return Rows("index", [])
    if field is not None:
        if not isinstance(doc, dict) or field not in doc:
            keys = f" (its keys: {', '.join(map(str, list(doc)[:10]))})" if isinstance(doc, dict) else ""
            problems.append(f"{path}: data.field {field!r} names no key of the top-level JSON object{keys}")
            return Rows("index", [])
        doc = doc[field]
    if not isinstance(doc, list):
        where = f"key {field!r}" if field else "the file"
        problems.append(f"{path}: {where} must hold a JSON array of examples, found {type(doc).__name__}")
        return Rows("index", [])
    if not doc:
        problems.append(f"{path}: the file has no examples")
    return Rows("index", list(enumerate(doc)))


def read_hub_rows(data: DataSpec, split: str, problems: list[str]) -> Rows:
    """A hub split's rows, loaded through `datasets` (from its local cache when offline)."""
    import datasets

    datasets.disable_progress_bar()
    try:
        ds = datasets.load_dataset(data.hub, data.subset, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; each is reported, not raised
        offline = any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = (
            "; it is not in the local Hugging Face datasets cache and HF_HUB_OFFLINE=1: load it once while online"
            if offline
            else ""
        )
        problems.append(f"hub dataset {data.hub!r} split {split!r}: cannot load it ({type(exc).__name__}: {exc}){hint}")
        return Rows("row", [])
    if len(ds) == 0:
        problems.append(f"hub dataset {data.hub!r} split {split!r}: no examples")
    return Rows("row", list(enumerate(ds)))


def split_rows(data: DataSpec, split: str, problems: list[str]) -> Rows:
    """The rows of one of the spec's splits (train, validation, eval), wherever they come from."""
    if data.hub is not None:
        return read_hub_rows(data, getattr(data, f"{split}_split"), problems)
    return read_file_rows(Path(getattr(data, split)), problems, data.field)


def _check_chat(rows: Rows, field: str, problems: list[str]) -> None:
    missing, bad_roles, bad_shape, no_answer = [], [], [], []
    for n, row in rows.items:
        messages = row.get(field) if isinstance(row, dict) else None
        if messages is None:
            missing.append(n)
            continue
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in messages
        ):
            bad_shape.append(n)
            continue
        if any(m["role"] not in CHAT_ROLES for m in messages):
            bad_roles.append(n)
        elif messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
            no_answer.append(n)
    if missing:
        problems.append(f"field {field!r} missing on {rows.where(missing)}")
    if bad_shape:
        problems.append(f"{field!r} must be a list of {{role, content}} objects on {rows.where(bad_shape)}")
    if bad_roles:
        problems.append(f"roles must be one of {', '.join(CHAT_ROLES)} on {rows.where(bad_roles)}")
    if no_answer:
        problems.append(f"a chat must have a user message and end with the assistant's answer on {rows.where(no_answer)}")


def _check_template(rows: Rows, template: str, problems: list[str]) -> None:
    not_object = [n for n, row in rows.items if not isinstance(row, dict)]
    if not_object:
        problems.append(f"each example must be a JSON object on {rows.where(not_object)}")
    for name in dict.fromkeys(template_fields(template)):
        missing = [n for n, row in rows.items if isinstance(row, dict) and name not in row]
        if missing:
            problems.append(f"field {name!r} used by text_template is missing on {rows.where(missing)}")


def check_rows(data: DataSpec, rows: Rows) -> list[str]:
    """What is wrong with the rows of one split for this data format."""
    problems: list[str] = []
    if data.messages_field:
        _check_chat(rows, data.messages_field, problems)
    else:
        _check_template(rows, data.text_template or "", problems)
    return problems


def _source_name(data: DataSpec, split: str) -> str:
    return getattr(data, split) if data.hub is None else f"{data.hub}:{getattr(data, f'{split}_split')}"


def named_splits(data: DataSpec) -> tuple[str, ...]:
    """The splits the spec names a source for."""
    has_validation = (data.validation if data.hub is None else data.validation_split) is not None
    return ("train", "validation", "eval") if has_validation else ("train", "eval")


def check_data(data: DataSpec, where: str, seed: int = 0) -> list[str]:
    """Every problem with an adapter's splits, each prefixed with the spec location."""
    problems: list[str] = []
    for split in named_splits(data):
        found: list[str] = []
        rows = split_rows(data, split, found)
        if rows.items:
            prefix = f"{_source_name(data, split)}: "
            found += [prefix + p for p in check_rows(data, rows)]
            if split == "train" and data.held_out_fraction and data.hub is None:
                try:
                    validation_indices(len(rows.items), data.held_out_fraction, seed)
                except ValueError as exc:
                    found.append(prefix + str(exc))
        problems.extend(f"{where}.{split}: {p}" for p in found)
    return problems


def validation_indices(n_rows: int, fraction: float, seed: int) -> list[int]:
    """Positions (0-based, sorted) of the training rows held out for validation, chosen with `seed`."""
    k = max(1, round(n_rows * fraction))
    if n_rows - k < 1:
        raise ValueError(
            f"{n_rows} training row(s) cannot give up {fraction:g} of them for validation; add rows, name a "
            "validation file, or set data.validation_fraction: 0"
        )
    return sorted(random.Random(seed).sample(range(n_rows), k))


def load_examples(data: DataSpec, split: str = "eval", path: Path | None = None) -> list[Example]:
    """Prompt/reference pairs of a split that check_data accepted (`path`: a local file instead)."""
    problems: list[str] = []
    rows = read_file_rows(path, problems, data.field) if path is not None else split_rows(data, split, problems)
    if not problems:
        problems = check_rows(data, rows)
    if problems:
        raise ValueError("; ".join(problems))
    out = []
    for n, row in rows.items:
        if data.messages_field:
            messages = row[data.messages_field]
            out.append(Example(n, messages[:-1], messages[-1]["content"]))
        else:
            prompt = prompt_prefix(data.text_template or "", data.response_field or "").format(**row)
            out.append(Example(n, prompt, str(row[data.response_field])))
    return out


def prompt_prefix(template: str, response_field: str) -> str:
    """The part of a text template before the answer placeholder: what generation starts from.

    Trailing spaces are left for the answer: BPE and SentencePiece tokenizers fold a word's leading
    space into its first token, so a prompt ending in a bare space never occurs in training.
    """
    return template[: template.rindex("{" + response_field + "}")].rstrip(" ")
