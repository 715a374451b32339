"""Chunking with the embedder's real tokenizer: offsets, window sizes, overlap."""

from __future__ import annotations

import random
import time

import pytest

from knowledge import Chunker, Embedder

WORDS = (
    "retrieval augmented generation keeps answers current, while LoRA adapters fix tone; "
    "naïve café Übergröße — 東京 emoji 🚀 x=3.14 (see §4.2) e-mail: a.b@c.org antidisestablishmentarianism"
).split()


def sample_text(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts = []
    for i in range(words):
        parts.append(rng.choice(WORDS))
        parts.append(rng.choice([" ", " ", " ", "\n", "  ", "\n\n", "\t"]) if i % 7 else ". ")
    return "".join(parts)


@pytest.mark.parametrize(("size", "overlap"), [(200, 40), (32, 8), (16, 0)])
def test_chunks_map_back_to_the_text_and_respect_size_and_overlap(embedder: Embedder, size: int, overlap: int):
    chunker = Chunker(embedder.tokenizer, size, overlap)
    text = sample_text(1500)
    chunks = chunker.split(text)
    assert len(chunks) > 1
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert text[chunk.start : chunk.end] == chunk.text
        assert chunk.text == chunk.text.strip()
        assert 0 < chunker.count(chunk.text) <= size
    assert chunks[0].start == len(text) - len(text.lstrip())
    assert chunks[-1].end == len(text.rstrip())
    for prev, nxt in zip(chunks, chunks[1:]):
        assert prev.start < nxt.start
        assert not text[prev.end : nxt.start].strip()  # nothing but whitespace between, if anything
        shared = chunker.count(text[nxt.start : prev.end]) if nxt.start < prev.end else 0
        assert shared <= overlap
        if overlap:
            assert shared > 0


def test_windows_are_filled_and_tokens_all_covered(embedder: Embedder):
    chunker = Chunker(embedder.tokenizer, 50, 10)
    text = sample_text(3000, seed=1)
    chunks = chunker.split(text)
    # Cutting at word boundaries costs a few tokens per window, not more.
    assert all(chunker.count(c.text) >= 40 for c in chunks[:-1])
    total = chunker.count(text)
    assert sum(chunker.count(c.text) for c in chunks) >= total


def test_short_text_is_one_chunk(embedder: Embedder):
    chunks = Chunker(embedder.tokenizer, 200, 40).split("  Hello, world!\n")
    assert [(c.text, c.start, c.end) for c in chunks] == [("Hello, world!", 2, 15)]


def test_a_word_longer_than_a_window_is_cut(embedder: Embedder):
    chunker = Chunker(embedder.tokenizer, 16, 4)
    text = "start " + "x" * 300 + " end"
    chunks = chunker.split(text)
    assert chunks[0].text.startswith("start")
    assert chunks[-1].text.endswith("end")
    assert all(text[c.start : c.end] == c.text for c in chunks)


def test_overlap_must_be_smaller_than_size(embedder: Embedder):
    with pytest.raises(ValueError):
        Chunker(embedder.tokenizer, 10, 10)


def test_one_tokenizer_pass_per_document(embedder: Embedder):
    chunker = Chunker(embedder.tokenizer, 200, 40)
    text = sample_text(60_000, seed=2)  # ~400k characters
    started = time.perf_counter()
    chunks = chunker.split(text)
    elapsed = time.perf_counter() - started
    assert len(chunks) > 100
    assert elapsed < 5, f"splitting {len(text)} characters took {elapsed:.1f} s"
