"""The in-memory BM25 index: the terms FTS5 would have made, the scores BM25 defines, and the
same answers whether built at once, grown by writes and deletes, or rebuilt at the next open."""

from __future__ import annotations

import math
import random
import re
import sqlite3
from collections import Counter

import pytest

from knowledge import DocumentInput, Embedder, KnowledgeBase, records
from knowledge.documents import DEFAULT_TENANT
from knowledge.keywords import B, K1, KeywordIndex, build, query_terms, words
from knowledge.stemming import stem
from tests.knowledge.inspection import keyword_matches, rows
from training.demo.corpus import corpus

FTS5_TOKENIZER = "porter unicode61 remove_diacritics 2"  # what keyword search ran on before the index


def fts5_terms(texts: list[str]) -> list[list[str]]:
    """FTS5's own tokens of each text, read back through fts5vocab."""
    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE VIRTUAL TABLE t USING fts5(text, tokenize='{FTS5_TOKENIZER}')")
    conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
    conn.executemany("INSERT INTO t (rowid, text) VALUES (?, ?)", enumerate(texts))
    found: list[list[tuple[int, str]]] = [[] for _ in texts]
    for term, doc, offset in conn.execute("SELECT term, doc, offset FROM v"):
        found[doc].append((offset, term))
    return [[term for _, term in sorted(tokens)] for tokens in found]


def test_stems_match_fts5_porter_on_a_large_vocabulary(embedder: Embedder):
    vocabulary = sorted({w for w in embedder.tokenizer.get_vocab() if re.fullmatch(r"[a-z]+", w)})
    vocabulary += ["caresses", "ponies", "agreed", "hopping", "filing", "happy", "relational", "hopeful", "goodness"]
    assert len(vocabulary) > 10_000
    expected = fts5_terms(vocabulary)
    wrong = [(w, e, stem(w)) for w, e in zip(vocabulary, expected, strict=True) if e != [stem(w)]]
    assert wrong == []


def test_words_match_fts5_tokens_on_mixed_text():
    texts = ["Café DÉJÀ-vu: naïve users' e-mail_address at 10:30, ümlaut façade", "The quick brown fox's JUMPS"]
    assert [[stem(w) for w in words(t)] for t in texts] == fts5_terms(texts)


def test_query_terms_drop_stopwords_unless_nothing_else_is_left():
    assert query_terms("What did the harbour authority decide about the mooring tariff?") == [
        "harbour", "author", "decid", "moor", "tariff",
    ]
    assert query_terms("to be or not to be") == ["to", "be", "or", "not"]
    assert query_terms("Opening opened OPENS") == ["open"]
    assert query_terms("?!") == []


def reference_scores(texts: dict[int, str], query: str) -> dict[int, float]:
    """BM25 straight from its definition (Lucene's idf), one chunk at a time."""
    docs = {i: Counter(stem(w) for w in words(t)) for i, t in texts.items()}
    lengths = {i: sum(c.values()) for i, c in docs.items()}
    average = sum(lengths.values()) / len(docs)
    scores: dict[int, float] = {}
    for term in query_terms(query):
        df = sum(1 for c in docs.values() if term in c)
        idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        for i, counts in docs.items():
            if term in counts:
                tf = counts[term]
                norm = K1 * (1 - B + B * lengths[i] / average)
                scores[i] = scores.get(i, 0.0) + idf * tf * (K1 + 1) / (tf + norm)
    return scores


def ranked(index: KeywordIndex, query: str) -> dict[int, float]:
    ids, scores = index.rank(query_terms(query)).top(len(index) + 1)
    return dict(zip(ids, scores, strict=True))


def assert_same(got: dict[int, float], expected: dict[int, float]) -> None:
    assert set(got) == set(expected)
    for i, score in expected.items():
        assert got[i] == pytest.approx(score, rel=1e-5)


TEXTS = {i + 1: " ".join(corpus(5, 400)[3 * i : 3 * i + 3]) for i in range(120)}
QUERIES = ["harbour authority mooring tariff", "When does the dredging contract change?", "ferry", "knots", "the"]


@pytest.mark.parametrize("query", QUERIES)
def test_scores_are_bm25(query: str):
    index = KeywordIndex()
    index.add(build(list(TEXTS), list(TEXTS.values())))
    assert_same(ranked(index, query), reference_scores(TEXTS, query))


@pytest.mark.parametrize("word", ["ferry", "knots", "tariff", "berth"])
def test_one_term_ranking_matches_fts5(word: str):
    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE VIRTUAL TABLE t USING fts5(text, tokenize='{FTS5_TOKENIZER}')")
    conn.executemany("INSERT INTO t (rowid, text) VALUES (?, ?)", TEXTS.items())
    fts = conn.execute("SELECT rowid FROM t WHERE t MATCH ? ORDER BY bm25(t)", (f'"{word}"',)).fetchall()
    index = KeywordIndex()
    index.add(build(list(TEXTS), list(TEXTS.values())))
    got = ranked(index, word)
    assert fts and set(got) == {i for (i,) in fts}
    # The idf differs (FTS5 clamps it), but with one term only tf and length order the chunks.
    in_fts_order = [got[i] for (i,) in fts]
    assert all(a >= b - 1e-9 for a, b in zip(in_fts_order, in_fts_order[1:]))


def test_writes_and_removals_give_what_a_fresh_build_gives():
    rng = random.Random(3)
    index = KeywordIndex()
    live: dict[int, str] = {}
    next_id = 1
    for step in range(60):
        # Batches of varied sizes (merges), removals from old and new segments (dead masks,
        # rewrites of mostly dead segments, whole segments gone).
        batch = {next_id + k: TEXTS[rng.randrange(1, 121)] for k in range(rng.choice([1, 2, 5, 17, 40]))}
        next_id += len(batch)
        index.add(build(list(batch), list(batch.values())))
        live.update(batch)
        gone = rng.sample(sorted(live), k=min(len(live), rng.choice([0, 1, 3, 20])))
        index.remove(gone + [10**9])  # an id it never held is ignored
        for i in gone:
            del live[i]
        if step % 10 == 9:
            assert len(index) == len(live)
            for query in QUERIES:
                assert_same(ranked(index, query), reference_scores(live, query))
    index.remove(list(live))
    assert len(index) == 0 and ranked(index, "ferry") == {}


def test_top_orders_by_score_then_chunk_id():
    index = KeywordIndex()
    index.add(build([7, 3, 5, 1], ["ferry ferry", "ferry", "ferry", "ferry ferry"]))
    assert index.rank(["ferri"]).top(3)[0] == [1, 7, 3]
    assert index.rank(["ferri"]).top(10)[0] == [1, 7, 3, 5]


DOCS = [DocumentInput(f"d{i}", " ".join(corpus(11, 200)[4 * i : 4 * i + 4]), {"n": i}) for i in range(40)]


def keyword_hits(kb: KnowledgeBase, query: str, **kwargs) -> list[tuple[str, int, int, float]]:
    hits = kb.search("docs", query, top_k=10, mode="keyword", **kwargs).hits
    return [(h.doc_id, h.version, h.index, round(h.score, 6)) for h in hits]


def test_rewrites_and_deletes_keep_the_index_in_step_and_reopening_rebuilds_it(make_settings, embedder: Embedder,
                                                                              monkeypatch):
    settings = make_settings()
    queries = ["mooring tariff", "ferry timetable knots", "dredging contract months", "ZEBRA"]
    with KnowledgeBase(settings, embedder=embedder) as kb:
        kb.create_collection("docs")
        kb.put_documents("docs", DOCS)
        kb.put_document("docs", "d3", "The zebra crossing by the ferry terminal was repainted.")
        kb.delete_document("docs", "d5")
        assert keyword_matches(kb, "docs", "zebra") == [("d3", 2)]
        assert all(doc_id != "d5" for doc_id, _ in keyword_matches(kb, "docs", "the"))
        # Exactly the chunk rows SQLite holds: no stale version, no deleted document.
        stored = sorted(rows(kb, "SELECT doc_id, version FROM chunks"))
        assert keyword_matches(kb, "docs", "the a of") == sorted(set(stored), key=repr)
        before = {q: keyword_hits(kb, q) for q in queries}
        assert before["ZEBRA"][0][:2] == ("d3", 2)
    with KnowledgeBase(settings, embedder=embedder) as kb:
        assert {q: keyword_hits(kb, q) for q in queries} == before
    monkeypatch.setattr(records, "REBUILD_BATCH", 2)  # rebuilt in many segments, merged as writes merge them
    with KnowledgeBase(settings, embedder=embedder) as kb:
        assert len(kb.records.keywords(kb.records.collection("default", "docs").id)._state.segments) > 1
        assert {q: keyword_hits(kb, q) for q in queries} == before


@pytest.mark.parametrize("chroma_mode", ["persistent"])  # an older lorag's store: SQLite only
def test_opening_drops_the_old_fts5_tables(make_settings, embedder: Embedder, chroma_mode):
    settings = make_settings()
    with KnowledgeBase(settings, embedder=embedder) as kb:
        kb.create_collection("docs")
        kb.put_document("docs", "d", "Ferries leave every ten minutes.")
        cid = kb.records.collection(DEFAULT_TENANT, "docs").id
    with sqlite3.connect(settings.database_path) as conn:  # as the FTS5 version left it: no migrations recorded
        conn.execute(f"CREATE VIRTUAL TABLE fts_{cid} USING fts5(text, content='chunks', content_rowid='id')")
        conn.execute("DROP TABLE schema_migrations")
    with KnowledgeBase(settings, embedder=embedder) as kb:
        with sqlite3.connect(settings.database_path) as conn:
            names = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'fts%'")]
        assert names == []
        assert [h.doc_id for h in kb.search("docs", "ferries", mode="keyword").hits] == ["d"]


def test_a_selective_filter_looks_deeper_than_the_best_matches(kb: KnowledgeBase):
    # 300 chunks outrank the 3 that pass the filter; keyword search must still reach those 3.
    kb.create_collection("docs")
    items = [DocumentInput(f"loud-{i}", "ferry ferry ferry timetable", {"keep": False}) for i in range(300)]
    items += [DocumentInput(f"quiet-{i}", f"A long note {i} that mentions the ferry once.", {"keep": True})
              for i in range(3)]
    kb.put_documents("docs", items)
    hits = kb.search("docs", "ferry timetable", top_k=5, mode="keyword", filter={"keep": True}).hits
    assert sorted(h.doc_id for h in hits) == ["quiet-0", "quiet-1", "quiet-2"]
