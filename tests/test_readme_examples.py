"""Every output the documentation and the model card show is what the default bundle really prints (greedy).

Lines of README.md and docs/*.md of the form ``phi-pipeline generate dist/tiny-phi3/cpu ... # -> <output>``
are run through the CLI against the ``tiny_bundle`` fixture (the shipped tiny pipeline, built once per
session), those on ``dist/smollm2/cpu`` against ``real_bundle`` (the real-weights pipeline); the model card's
Python snippet is executed in the tiny bundle's folder.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BUNDLE = "dist/tiny-phi3/cpu"
# A shown bundle path -> the session fixture that builds it, and the adapters its spec ships.
BUNDLES = {BUNDLE: ("tiny_bundle", {"tone", "antonyms"}), "dist/smollm2/cpu": ("real_bundle", {"tone", "antonyms", "extract"})}
SHOWN = "# -> "


@dataclass(frozen=True)
class Example:
    line: int
    argv: list[str]
    output: str
    page: str = "README.md"


def shown_examples(text: str, page: str = "README.md") -> list[Example]:
    """`phi-pipeline` command lines that show their output after a `# -> ` comment."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        command, sep, output = line.partition(SHOWN)
        if sep and command.lstrip().startswith("phi-pipeline "):
            found.append(Example(n, shlex.split(command)[1:], output.strip(), page))
    return found


def documented_examples() -> list[Example]:
    """The shown examples of README.md and every docs/*.md page."""
    return [e for path in DOC_PAGES for e in shown_examples(path.read_text(), path.relative_to(ROOT).as_posix())]


def test_shown_examples_are_parsed_with_command_and_output():
    text = 'x\n  phi-pipeline generate dist/tiny-phi3/cpu --adapter a --prompt "the hot drink"   # -> the cold drink\n'
    text += "phi-pipeline verify dist/tiny-phi3/cpu     # re-hash every file\n"
    assert shown_examples(text) == [
        Example(2, ["generate", BUNDLE, "--adapter", "a", "--prompt", "the hot drink"], "the cold drink")
    ]


def test_readme_shows_an_output_for_each_shipped_adapter_and_the_base_of_each_bundle():
    examples = [e for e in documented_examples() if e.argv[0] == "generate"]
    assert all(e.argv[1] in BUNDLES and e.output for e in examples)
    for bundle, (_, shipped) in BUNDLES.items():
        shown = {e.argv[e.argv.index("--adapter") + 1] if "--adapter" in e.argv else None
                 for e in examples if e.argv[1] == bundle}
        assert shown == shipped | {None}, bundle


@pytest.mark.slow
@pytest.mark.parametrize("example", documented_examples(), ids=lambda e: f"{e.page}:{e.line}")
def test_readme_example_prints_the_output_it_shows(example, request, capsys):
    from phi_pipeline.cli import main

    shown = next((a for a in example.argv if a in BUNDLES), BUNDLE)
    bundle = request.getfixturevalue(BUNDLES[shown][0])
    argv = [str(bundle) if a == shown else a for a in example.argv]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == example.output, f"{example.page}:{example.line}: {shlex.join(example.argv)}"


def _card_snippet(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 1, "the model card has one Python example"
    return blocks[0]


@pytest.mark.slow
def test_model_card_snippet_runs_and_prints_what_generate_prints(tiny_bundle, capsys):
    from phi_pipeline.cli import main

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    first = manifest["adapters"][0]
    row = json.loads(Path(tiny_bundle.parents[2] / first["dataset"]["eval"]).read_text().splitlines()[0])
    user_text, answer = row["messages"][0]["content"], row["messages"][-1]["content"]  # the first adapter is chat
    snippet = _card_snippet((tiny_bundle / "README.md").read_text())
    assert snippet.count('"..."') == 1, "the card's prompt placeholder"
    # The card prints prompt and answer, special tokens dropped; run it as a user would, in the bundle folder.
    printed = subprocess.run(
        [sys.executable, "-c", snippet.replace('"..."', json.dumps(user_text))],
        cwd=tiny_bundle, capture_output=True, text=True, check=True,
    ).stdout
    assert main(["generate", str(tiny_bundle), "--adapter", first["name"], "--prompt", user_text]) == 0
    generated = capsys.readouterr().out.strip()
    assert generated == answer
    assert printed.strip().endswith(generated), printed
