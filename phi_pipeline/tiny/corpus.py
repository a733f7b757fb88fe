"""Generated pretraining text for the tiny base model.

The base must be a real (tiny) language model that knows the datasets' words, Phi-3's chat
format and plain "Question/Answer" text, yet must not already solve the two tasks, so that
fine-tuning has something to show. So the corpus uses the tasks' vocabulary in ordinary prose
(sentences that contrast opposite adjectives or group words of the same tone, as real text
would) and answers *other* requests (repeat, arithmetic, next day, plurals, ...). It never
asks to classify a tone or to rewrite a phrase with its opposite.

Pretraining sees each document about once: with a corpus this small, repeated epochs make a
~1M-parameter model memorise answers instead of learning to copy and look up words from its
context, which is the skill both fine-tuning tasks build on. Copy requests are therefore common.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from phi_pipeline.tiny.datasets import (
    ANTONYM_NOUNS, ANTONYM_PAIRS, DETERMINERS, OPPOSITE, TONE_NOUNS, TONE_VERBS, TONE_WORDS,
)

NUMBERS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "brown", "pink")
ANIMALS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "bird": "tweet"}
PEOPLE = ("anna", "ben", "the teacher", "my friend", "the children", "our neighbour", "tom", "lucy")
PLACES = ("park", "market", "school", "beach", "station", "kitchen", "library", "garden")
LABEL_WORDS = ("positive", "negative", "neutral")
SYSTEM_PROMPT = "You are a helpful assistant."
ALL_NOUNS = ANTONYM_NOUNS + TONE_NOUNS
ALL_ADJECTIVES = tuple(OPPOSITE) + tuple(w for words in TONE_WORDS.values() for w in words) + COLOURS


def chat(user: str, assistant: str, system: str | None = None) -> str:
    """One exchange in Phi-3's chat format, exactly as the tokenizer's chat template renders it."""
    text = f"<|system|>\n{system}<|end|>\n" if system else ""
    return text + f"<|user|>\n{user}<|end|>\n<|assistant|>\n{assistant}<|end|>\n"


def _plural(noun: str) -> str:
    return f"{noun}es" if noun.endswith(("x", "ch")) else f"{noun}s"


def _phrase(rng: random.Random) -> str:
    """A determiner-adjective-noun phrase over the whole vocabulary."""
    return f"{rng.choice(DETERMINERS)} {rng.choice(ALL_ADJECTIVES)} {rng.choice(ALL_NOUNS)}"


def _prose(rng: random.Random) -> str:
    """One sentence of narrative English over the datasets' words."""
    a, b = rng.sample(rng.choice(ANTONYM_PAIRS), 2)
    n1, n2 = rng.sample(ANTONYM_NOUNS, 2)
    tone = rng.choice(tuple(TONE_WORDS))
    t1, t2 = rng.sample(TONE_WORDS[tone], 2)
    tn1, tn2 = rng.sample(TONE_NOUNS, 2)
    who, place, det = rng.choice(PEOPLE), rng.choice(PLACES), rng.choice(DETERMINERS)
    phrase = _phrase(rng)
    templates = (
        f"the {n1} was {a}, but the {n2} was {b}.",
        f"{det} {n1} is {b} and {det} {n2} is {a}.",
        f"the opposite of {a} is {b}.",
        f"it is not {a}, it is {b}.",
        f"{who} found {phrase} near the {place}. {phrase} was still there on {rng.choice(DAYS)}.",
        f"{det} {b} {n1} is next to the {rng.choice(COLOURS)} {n2}.",
        f"{who} said the {tn1} was {t1} and the {tn2} was {t2}.",
        f"the {tn1} was {t1}, and the {tn2} was {t2} too.",
        f"{who} will {rng.choice(TONE_VERBS[tone])} the {t1} {tn1}.",
        f"on {rng.choice(DAYS)} {who} went to the {place} with {phrase}.",
        f"the {rng.choice(tuple(ANIMALS))} sat on the {a} {n2} in the {place}.",
        f"the answer was {rng.choice(LABEL_WORDS)}, so {who} wrote it down.",
        f"there are {rng.choice(NUMBERS[2:])} {_plural(n1)} and {rng.choice(NUMBERS[2:])} {_plural(tn1)} "
        f"in the {place}.",
    )
    return rng.choice(templates)


def _request(rng: random.Random) -> tuple[str, str]:
    """One general request and its answer (never one of the fine-tuning tasks)."""
    phrase = _phrase(rng)
    noun = rng.choice(ALL_NOUNS)
    x, y = rng.randrange(0, 11), rng.randrange(0, 10)
    day = rng.randrange(len(DAYS))
    animal = rng.choice(tuple(ANIMALS))
    count = rng.randrange(2, 8)
    makers: tuple[Callable[[], tuple[str, str]], ...] = (
        lambda: (f"Repeat: {phrase}", phrase),
        lambda: (f"Repeat: {phrase}", phrase),
        lambda: (f"Say it again: {phrase}", phrase),
        lambda: (f"What is {NUMBERS[x]} plus {NUMBERS[y]}?", NUMBERS[x + y]),
        lambda: (f"What day comes after {DAYS[day]}?", DAYS[(day + 1) % 7]),
        lambda: (f"Count to {NUMBERS[count]}.", " ".join(NUMBERS[1:count + 1])),
        lambda: (f"What sound does a {animal} make?", ANIMALS[animal]),
        lambda: (f"What is the plural of {noun}?", _plural(noun)),
        lambda: ("Name a colour.", rng.choice(COLOURS)),
        lambda: ("Say hello.", "hello!"),
    )
    return rng.choice(makers)()


def _document(rng: random.Random) -> str:
    """A prose paragraph, a chat of 1-2 turns (sometimes with a system prompt) or Question/Answer text."""
    kind = rng.random()
    if kind < 0.4:
        return " ".join(_prose(rng) for _ in range(rng.randint(1, 3)))
    if kind < 0.85:
        system = SYSTEM_PROMPT if rng.random() < 0.2 else None
        turns = [_request(rng) for _ in range(rng.randint(1, 2))]
        return chat(*turns[0], system=system) + "".join(chat(*t) for t in turns[1:])
    return "Question: {}\nAnswer: {}".format(*_request(rng))


def corpus_documents(seed: int = 0, n_docs: int = 16000) -> list[str]:
    """``n_docs`` documents drawn from a ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [_document(rng) for _ in range(n_docs)]
