"""General-domain sentences built from templates and common English words: unlabeled text for distillation.

Why: a calibration set from one domain (e.g. code docstrings) teaches a student that domain's vocabulary and
phrasing; the augmentations of ``augment.py`` only rearrange those words or draw tokenizer-vocabulary words at
random (word salad). Sentences with everyday words in everyday grammar (statements, questions, requests, in
several tenses) cover what a deployed encoder mostly sees, and the teacher labels them like any other sample.

The word lists and templates are written for this module (no corpus copied); the evaluation and development
sets of the issue-13 benchmark were never read to write them, and a test checks none of their sentences comes
out. Deterministic for a seed.
"""
from __future__ import annotations

import random

PEOPLE = ["my sister", "my brother", "our neighbour", "the teacher", "a young woman", "an old man", "the doctor",
          "my friend", "the children", "the manager", "a tourist", "the driver", "her father", "his mother",
          "the students", "a little girl", "the waiter", "my boss", "the farmer", "a police officer", "the nurse",
          "our team", "the baby", "my grandparents", "a stranger", "the chef", "the pilot", "my roommate"]
NAMES = ["Anna", "Tom", "Maria", "James", "Sara", "David", "Emma", "Lucas", "Mia", "Omar", "Lena", "Paul", "Yuki",
         "Carlos", "Nina", "Ben", "Fatima", "Leo", "Grace", "Ivan"]
THINGS = ["the car", "a new phone", "the keys", "a cup of coffee", "the groceries", "an umbrella", "the laptop",
          "a birthday cake", "the tickets", "a letter", "the window", "a bicycle", "the dishes", "a book",
          "the garden", "a sandwich", "the report", "a jacket", "the lights", "a map", "the door", "some flowers",
          "the bill", "a photo", "the package", "a glass of water", "the homework", "a guitar", "the medicine",
          "a pair of shoes", "the newspaper", "a basket of apples", "the television", "a warm blanket"]
PLACES = ["the park", "the kitchen", "the station", "the beach", "the office", "the supermarket", "the hospital",
          "the library", "the airport", "the school", "the restaurant", "the city centre", "the mountains",
          "the museum", "the bakery", "the gym", "the river", "a small village", "the hotel", "the market",
          "the bus stop", "the cinema", "the garage", "the playground", "the bank", "the forest"]
TIMES = ["this morning", "yesterday", "last week", "tonight", "on Sunday", "after lunch", "every day",
         "in the evening", "tomorrow", "next month", "at noon", "before dinner", "last summer", "in winter",
         "on the weekend", "early today", "two days ago", "soon"]
ADJECTIVES = ["quiet", "busy", "cold", "warm", "expensive", "cheap", "beautiful", "crowded", "empty", "old", "new",
              "broken", "delicious", "tired", "happy", "angry", "bright", "dark", "noisy", "clean", "dirty",
              "small", "huge", "strange", "friendly", "late", "slow", "fast", "wet", "comfortable"]
# (base, past, -ing) of verbs that take an object
VERBS = [("buy", "bought", "buying"), ("find", "found", "finding"), ("carry", "carried", "carrying"),
         ("fix", "fixed", "fixing"), ("clean", "cleaned", "cleaning"), ("open", "opened", "opening"),
         ("lose", "lost", "losing"), ("sell", "sold", "selling"), ("wash", "washed", "washing"),
         ("bring", "brought", "bringing"), ("order", "ordered", "ordering"), ("paint", "painted", "painting"),
         ("borrow", "borrowed", "borrowing"), ("check", "checked", "checking"), ("pack", "packed", "packing"),
         ("share", "shared", "sharing"), ("forget", "forgot", "forgetting"), ("return", "returned", "returning"),
         ("drop", "dropped", "dropping"), ("need", "needed", "needing"), ("cook", "cooked", "cooking"),
         ("watch", "watched", "watching"), ("read", "read", "reading"), ("send", "sent", "sending")]
# (base, past, -ing) of verbs of motion, followed by "to <place>"
MOVES = [("walk", "walked", "walking"), ("drive", "drove", "driving"), ("run", "ran", "running"),
         ("go", "went", "going"), ("travel", "travelled", "travelling"), ("hurry", "hurried", "hurrying"),
         ("return", "returned", "returning"), ("cycle", "cycled", "cycling")]
FEELINGS = ["worried about", "excited about", "tired of", "surprised by", "happy with", "annoyed by",
            "curious about", "proud of", "afraid of", "bored with"]
WEATHER = ["It is raining", "The sun is shining", "It was very windy", "It snowed all night", "The sky is grey",
           "It is too hot", "A storm is coming", "The fog was thick"]

TEMPLATES = [
    "{Person} {past} {thing} at {place} {time}.",
    "{Person} is {ing} {thing} in {place}.",
    "{Name} {move_past} to {place} {time}.",
    "Can you {base} {thing} {time}?",
    "Could you help me {base} {thing}?",
    "Where did you {base} {thing}?",
    "Why is {place} so {adj} {time}?",
    "{Person} was {feeling} {thing}.",
    "{Weather}, so we stayed at {place}.",
    "{Name} and {person} {move_past} to {place} together.",
    "I think {thing} is too {adj}.",
    "{Time}, {person} {past} {thing}.",
    "Please {base} {thing} when you get to {place}.",
    "Have you ever been to {place}?",
    "{Name} says {place} is {adj} {time}.",
    "We are {move_ing} to {place} {time}.",
    "Do not forget to {base} {thing}.",
    "{Person} will {base} {thing} {time}.",
    "The {adj} room at {place} smelled of coffee.",
    "How much does {thing} cost at {place}?",
    "{Name} looked {adj} after {move_ing} to {place}.",
    "If it rains {time}, {person} will {base} {thing}.",
]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


class SentenceMaker:
    """Draws templated everyday sentences; one seeded generator, so a seed gives the same sentences."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def sentence(self) -> str:
        rng = self.rng
        verb, move = rng.choice(VERBS), rng.choice(MOVES)
        time = rng.choice(TIMES)
        person = rng.choice(PEOPLE)
        fields = {"person": rng.choice(PEOPLE), "Person": _cap(person), "Name": rng.choice(NAMES),
                  "thing": rng.choice(THINGS), "place": rng.choice(PLACES), "time": time,
                  "Time": _cap(time), "adj": rng.choice(ADJECTIVES), "base": verb[0], "past": verb[1],
                  "ing": verb[2], "move_past": move[1], "move_ing": move[2], "feeling": rng.choice(FEELINGS),
                  "Weather": rng.choice(WEATHER)}
        return rng.choice(TEMPLATES).format(**fields)

    def batch(self, n: int) -> list[str]:
        return [self.sentence() for _ in range(n)]
