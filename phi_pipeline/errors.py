"""Error types the CLI maps to exit codes."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user (spec, data, arguments): exit code 2.

    Carries every problem found, so the user fixes them in one pass instead of one per run.
    """

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        head = f"{self.source}: {n} problem{'s' if n != 1 else ''}"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


class PipelineError(Exception):
    """A stage failed (Olive error, missing output, failed check): exit code 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (children stopped, staging cleaned, dist/ untouched): exit code 143."""
