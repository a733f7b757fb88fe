"""Generated pretraining text for the tiny base model.

The base must be a real (tiny) language model that knows the datasets' words, Phi-3's chat
format and plain "Question/Answer" text, yet must not already solve the two tasks, so that
fine-tuning has something to show. It never asks for the tone of a phrase or for a phrase with
its opposite adjective (the built base scores 0% on both).

Measured at this size: a base pretrained only on prose and unrelated requests could not be
LoRA-tuned to either task in a few hundred steps (the adapter kept answering one label). Two
things made the tasks learnable, and the corpus supplies them the way a real LM's pretraining
would, through *other* requests:

- The label words must already be plausible answers. Otherwise the base puts ~14 nats against
  "positive" after ``<|assistant|>`` and a rank-8 adapter spends its steps just reaching them.
  Facts answer with them: the charge of a proton/electron/neutron, the sign of a number.
- Routes from the answer to the phrase: ``Classify the topic: <phrase>`` (colour | size |
  temperature, read from the last word of the tone task's own templates) and
  ``Repeat: <phrase>`` in chat and in ``Question: ...\nAnswer: ...`` text, whose copy offsets
  are those of the antonym template ``Opposite: {input}\nAnswer: {output}``.

- Copying with an edit: ``Repeat:`` over random word strings (copying that grammar cannot guess)
  and one-word edits of a phrase (change its colour, replace its noun or first word, drop the
  adjective, swap two words), also as ``<instruction>: <phrase>\nAnswer: <phrase>`` text. Without
  them the antonyms adapter flipped the adjective but lost the noun ("my tall room" -> "my small
  car", exact match 0.08); with them it copies determiner and noun (exact match 0.92 at r=16).

Nouns and adjectives come from one shared pool in every template, so predictions stay broad in
new combinations instead of memorising template-specific word lists.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from phi_pipeline.tiny.datasets import ANTONYM_NOUNS, ANTONYM_PAIRS, PHRASE_TEMPLATES, TONE_NOUNS, TONE_WORDS

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
DETERMINERS = ("the", "my", "your", "this", "that", "his", "her", "our")
LABEL_WORDS = ("positive", "negative", "neutral")
SYSTEM_PROMPT = "You are a helpful assistant."
# Facts whose answers are the tone labels, so those words are ordinary answers to the base.
CHARGES = {"proton": "positive", "electron": "negative", "neutron": "neutral"}
# The sibling classification: labels follow the adjective, as tone labels do.
TOPICS: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "size": ("big", "small", "tall", "short", "wide", "narrow", "thick", "thin"),
    "temperature": ("hot", "cold", "warm", "cool", "icy", "frozen", "boiling", "chilly"),
}
NOUNS = tuple(dict.fromkeys(ANTONYM_NOUNS + TONE_NOUNS + tuple(ANIMALS) + PLACES))
ADJECTIVES = tuple(dict.fromkeys(
    [w for pair in ANTONYM_PAIRS for w in pair]
    + [w for words in TONE_WORDS.values() for w in words]
    + [w for words in TOPICS.values() for w in words]
))


def chat(user: str, assistant: str, system: str | None = None) -> str:
    """One exchange in Phi-3's chat format, exactly as the tokenizer's chat template renders it."""
    text = f"<|system|>\n{system}<|end|>\n" if system else ""
    return text + f"<|user|>\n{user}<|end|>\n<|assistant|>\n{assistant}<|end|>\n"


def _plural(noun: str) -> str:
    return f"{noun}es" if noun.endswith(("x", "ch")) else f"{noun}s"


def _phrase(rng: random.Random) -> str:
    return f"{rng.choice(DETERMINERS)} {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"


def _prose(rng: random.Random) -> str:
    """One sentence of narrative English over the shared vocabulary."""
    a, b = rng.sample(rng.choice(ANTONYM_PAIRS), 2)
    n1, n2 = rng.sample(NOUNS, 2)
    t1, t2 = rng.sample(TONE_WORDS[rng.choice(tuple(TONE_WORDS))], 2)
    who, place, phrase = rng.choice(PEOPLE), rng.choice(PLACES), _phrase(rng)
    templates = (
        f"the {n1} was {a}, but the {n2} was {b}.",
        f"it is not {a}, it is {b}.",
        f"the opposite of {a} is {b}.",
        f"{who} said the {n1} was {t1} and the {n2} was {t2}.",
        f"the {n1} was {t1}, and the {n2} was {t2} too.",
        f"{who} did not like the tone of the {n1}.",
        f"{who} found {phrase} near the {place}. {phrase} was still there on {rng.choice(DAYS)}.",
        f"on {rng.choice(DAYS)} {who} went to the {place} with {phrase}.",
        f"the {rng.choice(tuple(ANIMALS))} sat on the {rng.choice(ADJECTIVES)} {n2} in the {place}.",
        f"the answer was {rng.choice(LABEL_WORDS)}, so {who} wrote it down.",
        f"there are {rng.choice(NUMBERS[2:])} {_plural(n1)} in the {place}.",
    )
    return rng.choice(templates)


ALL_WORDS = tuple(dict.fromkeys(NOUNS + ADJECTIVES + COLOURS + NUMBERS + DAYS + DETERMINERS))


def _words(rng: random.Random) -> str:
    """2-6 words drawn from the whole vocabulary: copying them needs attention to the text, not grammar."""
    return " ".join(rng.choice(ALL_WORDS) for _ in range(rng.randint(2, 6)))


def _edit(rng: random.Random) -> tuple[str, str]:
    """Copy a phrase with one word changed: the skill a phrase-rewriting adapter builds on."""
    det, adj, noun = rng.choice(DETERMINERS), rng.choice(ADJECTIVES), rng.choice(NOUNS)
    colour, other = rng.sample(COLOURS, 2)
    det2 = rng.choice([d for d in DETERMINERS if d != det])
    noun2 = rng.choice([n for n in NOUNS if n != noun])
    makers: tuple[Callable[[], tuple[str, str]], ...] = (
        lambda: (f"Change the colour: {det} {colour} {noun}", f"{det} {other} {noun}"),
        lambda: (f"Change the colour to {other}: {det} {colour} {noun}", f"{det} {other} {noun}"),
        lambda: (f"Replace the noun with {noun2}: {det} {adj} {noun}", f"{det} {adj} {noun2}"),
        lambda: (f"Replace the first word with {det2}: {det} {adj} {noun}", f"{det2} {adj} {noun}"),
        lambda: (f"Drop the adjective: {det} {adj} {noun}", f"{det} {noun}"),
        lambda: (f"Swap the words: {adj} {noun}", f"{noun} {adj}"),
    )
    return rng.choice(makers)()


def _request(rng: random.Random) -> tuple[str, str]:
    """One general request and its answer (never one of the fine-tuning tasks)."""
    phrase, words = _phrase(rng), _words(rng)
    topic = rng.choice(tuple(TOPICS))
    topical = rng.choice(PHRASE_TEMPLATES).format(n=rng.choice(NOUNS), a=rng.choice(TOPICS[topic]))
    noun, animal = rng.choice(NOUNS), rng.choice(tuple(ANIMALS))
    particle, sign = rng.choice(tuple(CHARGES)), rng.choice(("", "minus "))
    x, y, day, count = rng.randrange(0, 11), rng.randrange(0, 10), rng.randrange(7), rng.randrange(2, 8)
    makers: tuple[Callable[[], tuple[str, str]], ...] = (
        lambda: (f"Repeat: {phrase}", phrase),
        lambda: (f"Repeat: {phrase}", phrase),
        lambda: (f"Repeat: {words}", words),
        lambda: (f"Repeat: {words}", words),
        lambda: _edit(rng),
        lambda: _edit(rng),
        lambda: _edit(rng),
        lambda: (f"Say it again: {phrase}", phrase),
        lambda: (f"Classify the topic: {topical}", topic),
        lambda: (f"Classify the topic: {topical}", topic),
        lambda: (f"What is {NUMBERS[x]} plus {NUMBERS[y]}?", NUMBERS[x + y]),
        lambda: (f"What day comes after {DAYS[day]}?", DAYS[(day + 1) % 7]),
        lambda: (f"Count to {NUMBERS[count]}.", " ".join(NUMBERS[1:count + 1])),
        lambda: (f"What sound does a {animal} make?", ANIMALS[animal]),
        lambda: (f"What is the plural of {noun}?", _plural(noun)),
        lambda: ("Name a colour.", rng.choice(COLOURS)),
        lambda: (f"What is the charge of a {particle}?", CHARGES[particle]),
        lambda: (f"What is the sign of {sign}{NUMBERS[x + 1]}?", "negative" if sign else "positive"),
        lambda: ("Say hello.", "hello!"),
    )
    return rng.choice(makers)()


def _document(rng: random.Random) -> str:
    """Prose (1-3 sentences), a chat of 1-2 turns (sometimes with a system prompt), or Question/Answer text."""
    kind = rng.random()
    if kind < 0.3:
        return " ".join(_prose(rng) for _ in range(rng.randint(1, 3)))
    if kind < 0.8:
        system = SYSTEM_PROMPT if rng.random() < 0.2 else None
        turns = [_request(rng) for _ in range(rng.randint(1, 2))]
        return chat(*turns[0], system=system) + "".join(chat(*t) for t in turns[1:])
    if kind < 0.9:
        return "Question: {}\nAnswer: {}".format(*_request(rng))
    # Instruction and phrase on one line, "Answer:" on the next: the layout of text-template tasks.
    return "{}\nAnswer: {}".format(*_edit(rng))


def corpus_documents(seed: int = 0, n_docs: int = 16000) -> list[str]:
    """``n_docs`` documents drawn from a ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [_document(rng) for _ in range(n_docs)]
