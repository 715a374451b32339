"""Keyword search: an in-memory BM25 index of one collection's chunk rows.

SQLite FTS5 computes bm25() for every row that matches any query term, so a query of common
words over 100k chunks cost ~150 ms. This index keeps, per term, numpy arrays of the chunks
holding it and how often, and scores all of a term's postings in one vectorised step: a few
milliseconds for the same query. SQLite's chunks table stays the durable copy; the index is
rebuilt from it at open and follows every commit that adds or removes chunk rows (records.py),
so it always holds exactly the committed rows: both versions of a document mid-rewrite, as
the table does, for the version map (versions.py) to choose from.

Layout, as in Lucene: immutable segments (one per batch of added chunks), merged so that there
are about log2(chunks) of them; a removal marks chunks dead in a copy of a segment's `alive`
mask, and a segment that is mostly dead is rewritten. Writers swap in a new `_State` under
the store's write lock; a search reads one `_State` reference and needs no lock.

Terms: lowercase letters and digits, diacritics removed, Porter-stemmed (the matching FTS5's
`porter unicode61 remove_diacritics 2` gave). Scores: BM25 with Lucene's idf, higher is better.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from knowledge.stemming import stem

K1 = 1.2
B = 0.75
MAX_TERMS = 64
# Letters and digits: "_" and punctuation separate words, as in FTS5's unicode61 tokenizer.
WORD = re.compile(r"[^\W_]+")
# Dropped from queries (never from the index): they match most chunks, so they cost the most
# to score and move the ranking least. A query of stopwords only keeps them all.
STOPWORDS = frozenset(
    "a about after an and are as at be been before but by can could did do does for from had has have"
    " how i if in into is it its may might no not of on or should so such than that the their then there"
    " these they this those to was were what when where which who whom why will with would".split()
)


class MissingIndex(LookupError):
    """The collection's keyword index is gone (the collection was deleted)."""


def words(text: str) -> list[str]:
    """Lowercase words of `text`, diacritics removed (before stemming)."""
    text = text.lower()
    if not text.isascii():
        text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    return WORD.findall(text)


def query_terms(query: str) -> list[str]:
    """The distinct stemmed terms a keyword search looks for, stopwords dropped unless that leaves none."""
    found = list(dict.fromkeys(words(query)))
    kept = [word for word in found if word not in STOPWORDS] or found
    return list(dict.fromkeys(stem(word) for word in kept))[:MAX_TERMS]


@dataclass(frozen=True)
class Segment:
    chunk_ids: np.ndarray  # int64, ascending; a chunk's slot is its position here
    lengths: np.ndarray  # float64 words per chunk
    vocab: dict[str, int]  # term → its row in `offsets`, rows in insertion order
    offsets: np.ndarray  # int64, len(vocab) + 1: a term's postings are [offsets[r], offsets[r + 1])
    slots: np.ndarray  # int32 chunk slot of each posting, ascending within a term
    freqs: np.ndarray  # float32 occurrences of the term in the chunk
    alive: np.ndarray | None = None  # bool per slot; None: every chunk alive
    live: int = 0

    def postings(self, term: str) -> tuple[np.ndarray, np.ndarray] | None:
        row = self.vocab.get(term)
        if row is None:
            return None
        lo, hi = self.offsets[row], self.offsets[row + 1]
        slots, freqs = self.slots[lo:hi], self.freqs[lo:hi]
        if self.alive is not None:
            keep = self.alive[slots]
            slots, freqs = slots[keep], freqs[keep]
        return (slots, freqs) if len(slots) else None

    def live_lengths(self) -> float:
        return float(self.lengths.sum() if self.alive is None else self.lengths[self.alive].sum())


def build(chunk_ids: Sequence[int], texts: Sequence[str]) -> Segment:
    """A segment of these chunks, tokenised."""
    given = np.asarray(chunk_ids, dtype=np.int64)
    order = np.argsort(given, kind="stable")
    ids = given[order]
    vocab: dict[str, int] = {}
    tokens: list[int] = []
    lengths = np.zeros(len(ids), dtype=np.float64)
    for slot, i in enumerate(order.tolist()):
        found = words(texts[i])
        lengths[slot] = len(found)
        # stem() is cached: each distinct word is stemmed once per process, not once per use.
        tokens.extend([vocab.setdefault(stem(word), len(vocab)) for word in found])
    terms = np.asarray(tokens, dtype=np.int64)
    slots = np.repeat(np.arange(len(ids), dtype=np.int64), lengths.astype(np.int64))
    # One key per (term, chunk): unique() sorts by term, then chunk, and counts occurrences.
    keys, counts = np.unique(terms * max(len(ids), 1) + slots, return_counts=True)
    return _pack(ids, lengths, vocab, keys // max(len(ids), 1), keys % max(len(ids), 1), counts)


def merge(segments: Sequence[Segment]) -> Segment:
    """One segment holding the live chunks of these."""
    vocab: dict[str, int] = {}
    ids, lengths, terms, chunks, freqs = [], [], [], [], []
    for seg in segments:
        remap = np.asarray([vocab.setdefault(term, len(vocab)) for term in seg.vocab], dtype=np.int64)
        rows = np.repeat(np.arange(len(seg.vocab), dtype=np.int64), np.diff(seg.offsets))
        keep = slice(None) if seg.alive is None else seg.alive[seg.slots]
        terms.append(remap[rows[keep]])
        chunks.append(seg.chunk_ids[seg.slots[keep]])
        freqs.append(seg.freqs[keep])
        ids.append(seg.chunk_ids if seg.alive is None else seg.chunk_ids[seg.alive])
        lengths.append(seg.lengths if seg.alive is None else seg.lengths[seg.alive])
    all_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    order = np.argsort(all_ids, kind="stable")
    all_ids = all_ids[order]
    all_lengths = np.concatenate(lengths)[order] if lengths else np.zeros(0)
    all_terms = np.concatenate(terms) if terms else np.zeros(0, dtype=np.int64)
    all_slots = np.searchsorted(all_ids, np.concatenate(chunks)) if chunks else np.zeros(0, dtype=np.int64)
    sort = np.lexsort((all_slots, all_terms))
    all_freqs = np.concatenate(freqs)[sort] if freqs else np.zeros(0, dtype=np.float32)
    return _pack(all_ids, all_lengths, vocab, all_terms[sort], all_slots[sort], all_freqs)


def _pack(ids, lengths, vocab, terms, slots, freqs) -> Segment:
    """`terms`, `slots`, `freqs`: one entry per posting, sorted by term row, then slot."""
    offsets = np.zeros(len(vocab) + 1, dtype=np.int64)
    np.cumsum(np.bincount(terms, minlength=len(vocab)), out=offsets[1:])
    return Segment(
        ids, lengths, vocab, offsets, slots.astype(np.int32), freqs.astype(np.float32), None, len(ids)
    )


@dataclass(frozen=True)
class _State:
    segments: tuple[Segment, ...] = ()
    chunks: int = 0  # live chunks
    words: float = 0.0  # their total length


class Ranking:
    """Every chunk matching a query, with its score; `top` ranks them."""

    def __init__(self, chunk_ids: np.ndarray, scores: np.ndarray):
        self.chunk_ids, self.scores = chunk_ids, scores

    def __len__(self) -> int:
        return len(self.chunk_ids)

    def top(self, n: int) -> tuple[list[int], list[float]]:
        """The best `n` (chunk id, score), best first; ties by chunk id, so deterministic."""
        if n <= 0:
            return [], []
        if n < len(self.scores):
            pick = np.argpartition(-self.scores, n - 1)[:n]
        else:
            pick = np.arange(len(self.scores))
        pick = pick[np.lexsort((self.chunk_ids[pick], -self.scores[pick]))]
        return self.chunk_ids[pick].tolist(), self.scores[pick].tolist()


class KeywordIndex:
    """One collection's index. Writes (`add`, `remove`) must be serialised by the caller."""

    def __init__(self):
        self._state = _State()

    def __len__(self) -> int:
        return self._state.chunks

    def footprint(self) -> tuple[int, int]:
        """(postings, bytes of every segment's arrays): the index's memory, less its term dictionaries."""
        segments = self._state.segments
        arrays = [a for s in segments for a in (s.chunk_ids, s.lengths, s.offsets, s.slots, s.freqs, s.alive)
                  if a is not None]
        return sum(len(s.slots) for s in segments), sum(a.nbytes for a in arrays)

    def add(self, segment: Segment) -> None:
        """Add a segment from `build` (built before the write lock, swapped in after the commit)."""
        if not len(segment.chunk_ids):
            return
        state = self._state
        segments = [*state.segments, segment]
        # Merge like a binary counter: while the newest segment is at least half as big as the
        # one before it. Every chunk is then merged about log2(chunks) times in all.
        while len(segments) >= 2 and segments[-2].live < 2 * segments[-1].live:
            segments[-2:] = [merge(segments[-2:])]
        self._state = _State(tuple(segments), state.chunks + segment.live, state.words + segment.live_lengths())

    def remove(self, chunk_ids: Sequence[int]) -> None:
        if not len(chunk_ids):
            return
        ids = np.asarray(chunk_ids, dtype=np.int64)
        state = self._state
        segments, chunks, total = [], state.chunks, state.words
        for seg in state.segments:
            at = np.minimum(np.searchsorted(seg.chunk_ids, ids), len(seg.chunk_ids) - 1)
            hit = at[seg.chunk_ids[at] == ids]
            alive = np.ones(len(seg.chunk_ids), dtype=bool) if seg.alive is None else seg.alive.copy()
            hit = hit[alive[hit]]
            if not len(hit):
                segments.append(seg)
                continue
            alive[hit] = False
            chunks -= len(hit)
            total -= float(seg.lengths[hit].sum())
            seg = replace(seg, alive=alive, live=seg.live - len(hit))
            if seg.live == 0:
                continue
            # A mostly dead segment costs scoring time for nothing: rewrite it with its live chunks.
            segments.append(merge([seg]) if 2 * seg.live < len(seg.chunk_ids) else seg)
        self._state = _State(tuple(segments), chunks, max(total, 0.0))

    def rank(self, terms: Sequence[str]) -> Ranking:
        """Every live chunk holding at least one of `terms`, scored by BM25."""
        state = self._state  # one consistent snapshot; writers replace it, never change it
        if not state.chunks or not terms:
            return Ranking(np.zeros(0, dtype=np.int64), np.zeros(0))
        postings = [[seg.postings(term) for seg in state.segments] for term in terms]
        idfs = []
        for per_segment in postings:
            df = sum(len(found[0]) for found in per_segment if found is not None)
            idfs.append(math.log(1 + (state.chunks - df + 0.5) / (df + 0.5)))
        average = state.words / state.chunks or 1.0
        ids, scores = [], []
        for s, seg in enumerate(state.segments):
            acc = None
            norm = K1 * (1 - B + B * seg.lengths / average)
            for per_segment, idf in zip(postings, idfs, strict=True):
                found = per_segment[s]
                if found is None:
                    continue
                slots, freqs = found
                if acc is None:
                    acc = np.zeros(len(seg.chunk_ids))
                # Slots are distinct within one term's postings, so fancy-index += is exact.
                acc[slots] += idf * freqs * (K1 + 1) / (freqs + norm[slots])
            if acc is not None:
                matched = np.flatnonzero(acc)
                ids.append(seg.chunk_ids[matched])
                scores.append(acc[matched])
        if not ids:
            return Ranking(np.zeros(0, dtype=np.int64), np.zeros(0))
        return Ranking(np.concatenate(ids), np.concatenate(scores))
