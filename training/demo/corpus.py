"""Synthetic text of the demo domain (the fictional port city of Calder Bay).

The tokenizer is trained on it, so the vocabulary fits the domain the demo
adapters and knowledge base talk about. Deterministic for a given seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

SUBJECTS = [
    "The harbour authority", "The ferry operator", "The city council", "The port tribunal",
    "The customs office", "The pilot service", "The dock workers' union", "The water board",
]
VERBS = [
    "approved", "suspended", "amended", "published", "reviewed", "extended", "revoked", "confirmed",
]
OBJECTS = [
    "the mooring tariff", "the night ferry timetable", "the berth allocation rules",
    "the cargo inspection schedule", "the harbour speed limit", "the pilotage fee",
    "the storm warning procedure", "the dredging contract",
]
WHENS = [
    "on Monday", "last week", "in March", "after the spring tides", "before the audit",
    "with immediate effect", "for the winter season", "until further notice",
]
DETAILS = [
    "The fee is {n} crowns per metre.", "The limit is {n} knots inside the breakwater.",
    "Ferries now leave every {n} minutes.", "Inspections take {n} hours on average.",
    "The contract runs for {n} months.", "Berth {n} is reserved for tankers.",
]
QUESTIONS = [
    "What did {s} decide about {o}?", "When does {o} change?", "Who {v} {o}?",
    "Summarise the latest notice on {o}.",
]


def sentences(seed: int) -> Iterator[str]:
    """Endless deterministic stream of domain sentences, questions and answers."""
    rng = random.Random(seed)
    while True:
        s, v, o, w = (rng.choice(x) for x in (SUBJECTS, VERBS, OBJECTS, WHENS))
        detail = rng.choice(DETAILS).format(n=rng.randint(2, 400))
        yield f"{s} {v} {o} {w}. {detail}"
        yield rng.choice(QUESTIONS).format(s=s.lower(), v=v, o=o)


def corpus(seed: int, lines: int) -> list[str]:
    stream = sentences(seed)
    return [next(stream) for _ in range(lines)]
