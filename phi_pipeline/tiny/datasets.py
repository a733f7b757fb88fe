"""The two shipped fine-tuning tasks, generated deterministically from closed word lists.

The machine has no hub access, so the project ships its own data. Both tasks are sized for a
~1M-parameter base model: outputs are one word or a three-word phrase, the vocabulary is closed,
and every eval row recombines words that training already shows, so a LoRA adapter can learn the
rule in a few hundred CPU steps but cannot pass eval by memorising training rows.

- tone: chat rows ``Classify the tone: <phrase>`` -> ``positive`` | ``negative`` | ``neutral``,
  balanced over labels; the label is carried by exactly one word of the phrase.
- antonyms: ``{"input": "the hot drink", "output": "the cold drink"}``; eval uses
  (adjective, noun) pairs that never occur in training.

``python -m phi_pipeline.tiny.datasets`` rewrites ``pipelines/data``; a test checks that the
committed files equal this generator's output.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "pipelines" / "data"
SEED = 1234
N_TRAIN = 320
N_EVAL = 64
TONE_PROMPT = "Classify the tone: "

TONE_WORDS: dict[str, tuple[str, ...]] = {
    "positive": (
        "wonderful", "great", "lovely", "brilliant", "delightful", "excellent", "pleasant",
        "cheerful", "amazing", "beautiful", "perfect", "charming", "fantastic", "friendly",
    ),
    "negative": (
        "terrible", "awful", "horrible", "dreadful", "boring", "nasty", "miserable",
        "rude", "ugly", "gloomy", "annoying", "broken", "painful", "disappointing",
    ),
    "neutral": (
        "square", "round", "flat", "oval", "curved", "folded", "striped",
        "plain", "pointed", "hollow", "spotted", "bent", "twisted", "dotted",
    ),
}
TONE_NOUNS = (
    "movie", "meal", "trip", "song", "book", "day", "hotel", "show", "game", "party",
    "room", "class", "phone", "coffee", "garden", "concert", "weekend", "story", "visit", "film",
)
# The tone word always fills the adjective slot; corpus.py's sibling task uses the same templates.
PHRASE_TEMPLATES = (
    "the {n} was {a}",
    "what a {a} {n}",
    "this {n} is really {a}",
    "such a {a} {n} today",
    "my {n} felt {a}",
    "our {n} looked {a}",
)

ANTONYM_PAIRS: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("tall", "short"), ("rich", "poor"), ("clean", "dirty"), ("full", "empty"), ("hard", "soft"),
    ("wet", "dry"), ("loud", "quiet"), ("new", "old"), ("strong", "weak"), ("thick", "thin"),
    ("wide", "narrow"), ("cheap", "expensive"), ("sweet", "sour"), ("smooth", "rough"),
    ("deep", "shallow"),
)
ANTONYM_NOUNS = (
    "drink", "box", "car", "room", "road", "river", "coat", "bag", "dog", "house",
    "book", "bed", "cup", "door", "street", "shirt", "chair", "bottle", "stone", "table",
)
OPPOSITE = {a: b for a, b in ANTONYM_PAIRS} | {b: a for a, b in ANTONYM_PAIRS}

Rows = list[dict]


def tone_rows(seed: int = SEED) -> tuple[Rows, Rows]:
    """Unique tone phrases, balanced over labels, split into disjoint train and eval."""
    rng = random.Random(seed)
    labels = tuple(TONE_WORDS)
    seen: set[str] = set()
    train: Rows = []
    evaluation: Rows = []
    for i, label in enumerate(labels):
        n_eval = N_EVAL // len(labels) + (i < N_EVAL % len(labels))
        n_train = N_TRAIN // len(labels) + (i < N_TRAIN % len(labels))
        rows: Rows = []
        while len(rows) < n_train + n_eval:
            phrase = rng.choice(PHRASE_TEMPLATES).format(n=rng.choice(TONE_NOUNS), a=rng.choice(TONE_WORDS[label]))
            if phrase in seen:
                continue
            seen.add(phrase)
            rows.append({"messages": [
                {"role": "user", "content": TONE_PROMPT + phrase},
                {"role": "assistant", "content": label},
            ]})
        train += rows[:n_train]
        evaluation += rows[n_train:]
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train, evaluation


def antonym_rows(seed: int = SEED) -> tuple[Rows, Rows]:
    """Swap the adjective for its opposite; eval (adjective, noun) pairs are unseen in training."""
    rng = random.Random(seed)
    pairs = sorted((adj, noun) for adj in OPPOSITE for noun in ANTONYM_NOUNS)
    rng.shuffle(pairs)
    # Every adjective and noun must occur in training, so eval only asks for new combinations.
    train_pairs = pairs[:N_TRAIN]
    eval_pairs = [p for p in pairs[N_TRAIN:]
                  if p[0] in {a for a, _ in train_pairs} and p[1] in {n for _, n in train_pairs}]
    eval_pairs = eval_pairs[:N_EVAL]

    def row(adj: str, noun: str) -> dict:
        return {"input": f"the {adj} {noun}", "output": f"the {OPPOSITE[adj]} {noun}"}

    return [row(*p) for p in train_pairs], [row(*p) for p in eval_pairs]


def all_datasets() -> dict[str, tuple[Rows, Rows]]:
    """Task name -> (train rows, eval rows)."""
    return {"tone": tone_rows(), "antonyms": antonym_rows()}


def to_jsonl(rows: Rows) -> str:
    """The exact bytes committed under pipelines/data (one compact JSON object per line)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_datasets(data_dir: Path = DATA_DIR) -> list[Path]:
    """Write ``<task>/{train,eval}.jsonl`` under ``data_dir``; returns the written paths."""
    written = []
    for task, (train, evaluation) in all_datasets().items():
        for split, rows in (("train", train), ("eval", evaluation)):
            path = data_dir / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(to_jsonl(rows), encoding="utf-8")
            written.append(path)
    return written


if __name__ == "__main__":
    for p in write_datasets():
        print(p)
