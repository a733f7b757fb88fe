"""Reading and checking an adapter's JSON Lines data before any training starts.

Every problem of every file is collected (file, line numbers, field) so one run tells the user
everything to fix. The same readers give evaluation its prompts and references.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi_pipeline.spec import DataSpec, template_fields

CHAT_ROLES = ("system", "user", "assistant")
_SHOW_LINES = 5


@dataclass(frozen=True)
class Example:
    """One row as the model sees it: a prompt to complete and the reference answer."""

    line: int
    prompt: str | list[dict[str, str]]
    """Text before the answer (template data) or the chat messages before the answer (chat data)."""
    reference: str


def _lines(nums: list[int]) -> str:
    shown = ", ".join(str(n) for n in nums[:_SHOW_LINES])
    more = f" and {len(nums) - _SHOW_LINES} more" if len(nums) > _SHOW_LINES else ""
    return f"line{'s' if len(nums) > 1 else ''} {shown}{more}"


def read_jsonl(path: Path, problems: list[str]) -> list[tuple[int, Any]]:
    """(line number, parsed row) for every non-blank line; problems get one entry per bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(f"{path}: file not found")
        return []
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: cannot read it as UTF-8 text ({exc})")
        return []
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{n}: invalid JSON ({exc.msg} at column {exc.colno})")
    if not rows and not problems:
        problems.append(f"{path}: the file has no examples")
    return rows


def _check_chat(path: Path, rows: list[tuple[int, Any]], field: str, problems: list[str]) -> None:
    missing, bad_roles, bad_shape, no_answer = [], [], [], []
    for n, row in rows:
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
        problems.append(f"{path}: field {field!r} missing on {_lines(missing)}")
    if bad_shape:
        problems.append(f"{path}: {field!r} must be a list of {{role, content}} objects on {_lines(bad_shape)}")
    if bad_roles:
        problems.append(f"{path}: roles must be one of {', '.join(CHAT_ROLES)} on {_lines(bad_roles)}")
    if no_answer:
        problems.append(
            f"{path}: a chat must have a user message and end with the assistant's answer on {_lines(no_answer)}"
        )


def _check_template(path: Path, rows: list[tuple[int, Any]], template: str, problems: list[str]) -> None:
    not_object = [n for n, row in rows if not isinstance(row, dict)]
    if not_object:
        problems.append(f"{path}: each line must be a JSON object on {_lines(not_object)}")
    for name in dict.fromkeys(template_fields(template)):
        missing = [n for n, row in rows if isinstance(row, dict) and name not in row]
        if missing:
            problems.append(f"{path}: field {name!r} used by text_template is missing on {_lines(missing)}")


def check_data(data: DataSpec, where: str) -> list[str]:
    """Every problem with an adapter's train and eval files, each prefixed with the spec location."""
    problems: list[str] = []
    for split in ("train", "eval"):
        path = Path(getattr(data, split))
        found: list[str] = []
        rows = read_jsonl(path, found)
        if rows:
            if data.messages_field:
                _check_chat(path, rows, data.messages_field, found)
            else:
                _check_template(path, rows, data.text_template or "", found)
        problems.extend(f"{where}.{split}: {p}" for p in found)
    return problems


def load_examples(path: Path, data: DataSpec) -> list[Example]:
    """Prompt/reference pairs of a split that check_data accepted."""
    problems: list[str] = []
    rows = read_jsonl(path, problems)
    if problems:
        raise ValueError("; ".join(problems))
    out = []
    for n, row in rows:
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
