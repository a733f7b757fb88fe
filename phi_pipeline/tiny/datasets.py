"""The shipped fine-tuning tasks, generated deterministically from closed word lists.

The machine has no hub access, so the project ships its own data. Both tasks are sized for the
~1M-parameter tiny base (see base_model.py) and Olive's LoRA recipe (loss on the whole text, a
few hundred steps on CPU). What such a model can learn was measured, not guessed:

- Few distinct key words. With 14 words per tone label the adapter stayed at chance after 160
  steps; with 6 it reached ~97-100% eval accuracy. Each key word must recur often in 320 rows.
- The tone word ends the phrase. The answer position then reads it through the ``<|end|>``
  token right after it; with the word mid-phrase a tiny adapter finds no route to it.
- Antonyms copy determiner and noun (the corpus' copy and one-word-edit requests teach the base
  to), so their sets stay small too.

Eval rows are never training rows and recombine words that training shows: new (noun, template)
pairs for tone, new (adjective, noun) pairs for antonyms, so eval cannot be passed by memorising.

- tone: chat rows ``Classify the tone: <phrase>`` -> ``positive`` | ``negative`` | ``neutral``,
  balanced over labels.
- antonyms: ``{"input": "the hot drink", "output": "the cold drink"}``.
- extract (for the real smollm2 base, which can follow such a request but not the exact format):
  chat rows ``Extract name, age and city as JSON: <sentence>`` -> ``{"name": ..., "age": ..., "city": ...}``
  (compact, keys in that order; the ``json_fields`` metric scores each field). Eval rows use names and
  cities that no training row has, so only the skill transfers, not the values.

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
    "positive": ("wonderful", "great", "lovely", "brilliant", "excellent", "amazing"),
    "negative": ("terrible", "awful", "horrible", "boring", "nasty", "dreadful"),
    "neutral": ("square", "round", "flat", "wooden", "metal", "plain"),
}
TONE_NOUNS = (
    "movie", "meal", "trip", "song", "book", "day", "hotel", "show", "game", "party",
    "room", "class", "phone", "coffee", "garden", "concert", "weekend", "story", "visit", "film",
)
# {a} (the word that decides the label) always comes last; corpus.py reuses these templates.
PHRASE_TEMPLATES = (
    "the {n} was {a}",
    "this {n} is really {a}",
    "my {n} felt {a}",
    "our {n} looked {a}",
    "that {n} seemed {a}",
    "the {n} is so {a}",
)

ANTONYM_PAIRS: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("tall", "short"), ("rich", "poor"), ("clean", "dirty"), ("full", "empty"), ("hard", "soft"),
)
ANTONYM_NOUNS = ("drink", "box", "car", "room", "road", "river", "coat", "bag", "dog", "house", "book", "bed")
ANTONYM_DETERMINERS = ("the", "my")
OPPOSITE = {a: b for a, b in ANTONYM_PAIRS} | {b: a for a, b in ANTONYM_PAIRS}

EXTRACT_PROMPT = "Extract name, age and city as JSON: "
FIRST_NAMES = (
    "Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Lucas", "Mei", "Ivan",
    "Sara", "David", "Amara", "Noah", "Elena", "Kofi", "Hana", "Pedro", "Nina", "Yusuf", "Clara", "Raj",
)
LAST_NAMES = (
    "Lopez", "Smith", "Tanaka", "Haddad", "Fischer", "Silva", "Patel", "Brown", "Khan", "Martin", "Chen",
    "Petrov", "Jensen", "Cohen", "Okafor", "Walker", "Rossi", "Mensah", "Sato", "Costa", "Novak", "Demir",
)
CITIES = (
    "Lyon", "Boston", "Osaka", "Cairo", "Munich", "Lisbon", "Pune", "Denver", "Lahore", "Quebec", "Taipei",
    "Kazan", "Oslo", "Haifa", "Lagos", "Leeds", "Turin", "Accra", "Kyoto", "Porto", "Prague", "Izmir",
    "Dublin", "Perth", "Nairobi", "Seville", "Bergen", "Austin",
)
# Names and cities from index EXTRACT_EVAL_FROM on appear only in eval rows.
EXTRACT_EVAL_FROM = {"first": 18, "last": 17, "city": 22}
EXTRACT_TEMPLATES = (
    "{name}, {age}, lives in {city}.",
    "Meet {name} from {city}, who is {age} years old.",
    "{name} ({age}) just moved to {city}.",
    "Our new customer is {name}, aged {age}, based in {city}.",
    "{city} resident {name} turned {age} this year.",
    "At {age}, {name} opened a bakery in {city}.",
    "Please ship the order to {name} in {city}; the buyer is {age}.",
    "{name} is a {age}-year-old nurse working in {city}.",
)

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
    """Swap the adjective for its opposite; eval (adjective, noun) pairs never occur in training."""
    rng = random.Random(seed)
    pairs = [(adj, noun) for adj in sorted(OPPOSITE) for noun in ANTONYM_NOUNS]
    rng.shuffle(pairs)
    eval_pairs, train_pairs = pairs[:N_EVAL], pairs[N_EVAL:]
    train = [(det, adj, noun) for adj, noun in train_pairs for det in ANTONYM_DETERMINERS]
    rng.shuffle(train)
    evaluation = [(rng.choice(ANTONYM_DETERMINERS), adj, noun) for adj, noun in eval_pairs]

    def row(det: str, adj: str, noun: str) -> dict:
        return {"input": f"{det} {adj} {noun}", "output": f"{det} {OPPOSITE[adj]} {noun}"}

    return [row(*t) for t in train[:N_TRAIN]], [row(*t) for t in evaluation]


def extract_rows(seed: int = SEED) -> tuple[Rows, Rows]:
    """Sentences about a person -> their name, age and city as compact JSON; eval people are unseen."""
    rng = random.Random(seed)

    def rows(n: int, held_out: bool) -> Rows:
        def pick(words: tuple[str, ...], key: str) -> str:
            cut = EXTRACT_EVAL_FROM[key]
            return rng.choice(words[cut:] if held_out else words[:cut])

        out: Rows = []
        for _ in range(n):
            name = f"{pick(FIRST_NAMES, 'first')} {pick(LAST_NAMES, 'last')}"
            age, city = rng.randint(18, 79), pick(CITIES, "city")
            sentence = rng.choice(EXTRACT_TEMPLATES).format(name=name, age=age, city=city)
            answer = json.dumps({"name": name, "age": age, "city": city})
            out.append({"messages": [
                {"role": "user", "content": EXTRACT_PROMPT + sentence},
                {"role": "assistant", "content": answer},
            ]})
        return out

    return rows(N_TRAIN, held_out=False), rows(N_EVAL, held_out=True)


def all_datasets() -> dict[str, tuple[Rows, Rows]]:
    """Task name -> (train rows, eval rows)."""
    return {"tone": tone_rows(), "antonyms": antonym_rows(), "extract": extract_rows()}


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
