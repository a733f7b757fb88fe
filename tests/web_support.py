"""Driving the in-browser page (phi_pipeline/web) from tests: Debian's chromium through Playwright, and the
Python runtime's greedy answers on a bundle's eval rows to hold the page's against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Every row of one task through the page: the prompt formatted and tokenized there, greedy ids with the
# adapter and without it (the base model on the adapter's prompts, as the evaluation runs it).
ANSWER_ROWS = """async ({adapter, rows, maxNewTokens}) => {
  const out = [];
  for (const prompt of rows) {
    const tuned = await phi.answer({adapter, formatAs: adapter, prompt, maxNewTokens});
    const base = await phi.answer({adapter: null, formatAs: adapter, prompt, maxNewTokens});
    out.push({promptIds: tuned.promptIds, adapter: tuned.tokens, base: base.tokens});
  }
  return out;
}"""


@dataclass(frozen=True)
class Row:
    task: str
    line: int
    prompt: Any
    prompt_ids: list[int]
    adapter: list[int]
    base: list[int]


class PythonAnswers:
    """Every eval row of every adapter through the Python runtime (onnxruntime-genai, as the gates ran it).
    Eval files are read relative to the working directory."""

    def __init__(self, bundle: Path):
        import json

        from phi_pipeline.evaluate.tasks import tasks_from_manifest
        from phi_pipeline.runtime.genai import BundleModel

        self.model = bm = BundleModel(bundle)
        self.rows: list[Row] = []
        self.max_new: dict[str, int] = {}
        for task in tasks_from_manifest(json.loads((bundle / "manifest.json").read_text())):
            self.max_new[task.adapter] = n = task.eval.max_new_tokens
            for ex in task.examples():
                ids = bm.encode(bm.prompt_for(ex.prompt, task.adapter))
                self.rows.append(Row(task.adapter, ex.line, ex.prompt, ids,
                                     bm.generate_ids(ids, task.adapter, n), bm.generate_ids(ids, None, n)))

    def differences(self, page) -> list[Difference]:
        """Each row where the page's prompt ids or greedy ids differ from the Python runtime's, with both
        runtimes' logit gaps between the two tokens at the first that differs; [] if all are equal."""
        found = []
        for task, n in self.max_new.items():
            mine = [r for r in self.rows if r.task == task]
            theirs = page.evaluate(ANSWER_ROWS, {"adapter": task, "rows": [r.prompt for r in mine], "maxNewTokens": n})
            for row, got in zip(mine, theirs):
                if got["promptIds"] != row.prompt_ids:
                    found.append(Difference(row, "prompt", got["promptIds"], row.prompt_ids))
                    continue
                for which, adapter in (("adapter", task), ("base", None)):
                    want, have = getattr(row, which), got[which]
                    if have == want:
                        continue
                    k = next(i for i, (a, b) in enumerate(zip(have + [-1], want + [-1])) if a != b)
                    gaps = None
                    if k < len(have) and k < len(want):
                        prefix = row.prompt_ids + want[:k]
                        page_logits = page.evaluate("([ids, a]) => phi.nextLogits(ids, a)", [prefix, adapter])
                        python_logits = self.model.logits(prefix, adapter, len(prefix) - 1)[-1]
                        gaps = (page_logits[have[k]] - page_logits[want[k]],
                                float(python_logits[want[k]] - python_logits[have[k]]))
                    found.append(Difference(row, which, have, want, k, gaps))
        return found


@dataclass(frozen=True)
class Difference:
    row: Row
    which: str
    """prompt (the prompt's token ids), adapter or base (the greedy answer's)"""
    page: list[int]
    python: list[int]
    at: int | None = None
    gaps: tuple[float, float] | None = None
    """at token `at`: how far each runtime prefers its own token over the other's, in its logits"""

    def __str__(self) -> str:
        gaps = f"; logit gaps page {self.gaps[0]:.4g}, python {self.gaps[1]:.4g} at token {self.at}" if self.gaps else ""
        return f"{self.row.task} line {self.row.line} ({self.which}): page {self.page} python {self.python}{gaps}"
