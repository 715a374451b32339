"""Dense, keyword and hybrid search, and metadata filters, on real Chroma, SQLite and the BM25 index."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from knowledge import DocumentInput, InvalidFilter, InvalidQuery, KnowledgeBase
from knowledge.filters import MAX_CLAUSES, MAX_CONDITIONS, MAX_DEPTH, MAX_TOTAL_VALUES, MAX_VALUES, Filter
from tests.knowledge.conftest import CHROMA_MODES, chroma_settings

DOCS = [
    DocumentInput("volcano", "Volcanic eruptions release lava, ash and sulfur dioxide into the atmosphere.",
                  {"topic": "geology", "year": 2021, "rating": 4.5, "public": True}),
    DocumentInput("sourdough", "Sourdough bread rises with a starter of wild yeast and lactobacilli.",
                  {"topic": "cooking", "year": 2019, "rating": 3, "public": False}),
    DocumentInput("tides", "Ocean tides are caused by the gravitational pull of the moon and the sun.",
                  {"topic": "geology", "year": 2023, "public": True}),
    DocumentInput("chess", "The Sicilian Defence is a chess opening that begins 1.e4 c5.",
                  {"topic": "games", "year": 2023, "rating": 5, "level": "advanced"}),
    DocumentInput("kafka", "Apache Kafka partitions a topic across brokers for throughput.",
                  {"topic": "software", "year": "2023", "rating": 4}),
]


@pytest.fixture(scope="module", params=CHROMA_MODES)
def corpus(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, embedder
) -> Iterator[KnowledgeBase]:
    """One read-only corpus per Chroma mode, shared by this module's tests."""
    settings = chroma_settings(request.param, tmp_path_factory.mktemp("corpus"), request)
    with KnowledgeBase(settings, embedder=embedder) as kb:
        kb.create_collection("corpus")
        assert all(r.status == "created" for r in kb.put_documents("corpus", DOCS))
        yield kb


@pytest.mark.parametrize("mode", ["dense", "keyword", "hybrid"])
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("lava and ash from an eruption", "volcano"),
        ("wild yeast starter bread", "sourdough"),
        ("gravitational pull of the moon", "tides"),
        ("Sicilian Defence opening", "chess"),
    ],
)
def test_each_mode_finds_the_obvious_document(corpus: KnowledgeBase, mode: str, query: str, expected: str):
    result = corpus.search("corpus", query, top_k=3, mode=mode)
    assert result.mode == mode
    assert result.hits[0].doc_id == expected
    hit = result.hits[0]
    doc = corpus.get_document("corpus", expected)
    assert doc.text[hit.start : hit.end] == hit.text
    assert hit.metadata == doc.metadata and hit.version == 1 and hit.index == 0
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)


def test_dense_finds_meaning_without_shared_words(corpus: KnowledgeBase):
    hits = corpus.search("corpus", "molten rock from a mountain", top_k=1, mode="dense").hits
    assert hits[0].doc_id == "volcano"
    assert corpus.search("corpus", "molten rock mountain", mode="keyword").hits == []


def test_timings_and_precomputed_query_embedding(corpus: KnowledgeBase):
    query = "chess opening"
    plain = corpus.search("corpus", query, mode="dense")
    assert plain.timings.embed_ms > 0 and plain.timings.dense_ms > 0 and plain.timings.search_ms > 0
    vector = corpus.embedder.encode([query])[0]
    given = corpus.search("corpus", query, mode="dense", query_embedding=vector)
    assert given.timings.embed_ms == 0
    assert [h.chunk_id for h in given.hits] == [h.chunk_id for h in plain.hits]
    assert [h.score for h in given.hits] == pytest.approx([h.score for h in plain.hits], abs=1e-5)
    with pytest.raises(InvalidQuery, match="query_embedding"):
        corpus.search("corpus", query, query_embedding=[0.1] * 3)


def test_punctuation_only_query_has_no_keyword_hits(corpus: KnowledgeBase):
    assert corpus.search("corpus", '"*(-)^: ~ _ "', mode="keyword").hits == []
    assert len(corpus.search("corpus", "?!", mode="hybrid", top_k=2).hits) == 2  # dense still answers
    # FTS5 syntax in a query is just words.
    hits = corpus.search("corpus", 'kafka" OR topic:* NOT (brokers', mode="keyword").hits
    assert hits[0].doc_id == "kafka"


def test_top_k_limits_hits(corpus: KnowledgeBase):
    for mode in ("dense", "keyword", "hybrid"):
        assert len(corpus.search("corpus", "the a of", top_k=2, mode=mode).hits) <= 2
    assert len(corpus.search("corpus", "anything at all", top_k=5, mode="dense").hits) == 5


# Each filter with the documents it must keep; the same answer from Chroma and from SQLite.
FILTERS = [
    ({"topic": "geology"}, {"volcano", "tides"}),
    ({"topic": {"$eq": "games"}}, {"chess"}),
    ({"topic": {"$ne": "geology"}}, {"sourdough", "chess", "kafka"}),
    ({"year": 2023}, {"tides", "chess"}),  # the string "2023" is not the number 2023
    ({"year": "2023"}, {"kafka"}),
    ({"year": {"$gte": 2021}}, {"volcano", "tides", "chess"}),
    ({"year": {"$lt": 2021.5}}, {"volcano", "sourdough"}),
    ({"rating": {"$gt": 3.9}}, {"volcano", "chess", "kafka"}),
    ({"rating": {"$lte": 3}}, {"sourdough"}),
    ({"rating": {"$in": [3, 4.5]}}, {"sourdough", "volcano"}),
    ({"rating": {"$gte": 4.5}}, {"volcano", "chess"}),  # Chroma alone would take 4 >= 4.5 (truncation)
    ({"rating": {"$eq": 4.5}}, {"volcano"}),
    ({"rating": {"$ne": 4.5}}, {"sourdough", "tides", "chess", "kafka"}),
    ({"rating": {"$nin": [4, 5]}}, {"volcano", "sourdough", "tides"}),  # missing field: not in the list
    ({"public": True}, {"volcano", "tides"}),
    ({"public": False}, {"sourdough"}),
    ({"public": {"$ne": True}}, {"sourdough", "chess", "kafka"}),
    ({"level": {"$in": ["advanced", "expert"]}}, {"chess"}),
    ({"topic": "geology", "year": 2023}, {"tides"}),
    ({"$and": [{"topic": "geology"}, {"public": True}, {"year": {"$gt": 2022}}]}, {"tides"}),
    ({"$or": [{"topic": "cooking"}, {"rating": 5}]}, {"sourdough", "chess"}),
    ({"$or": [{"$and": [{"topic": "geology"}, {"year": 2021}]}, {"level": "advanced"}]}, {"volcano", "chess"}),
    ({"$and": [{"topic": "software"}]}, {"kafka"}),
    ({"nothing": "here"}, set()),
]


@pytest.mark.parametrize(("where", "expected"), FILTERS, ids=[str(i) for i in range(len(FILTERS))])
def test_filters_mean_the_same_in_chroma_and_sqlite(corpus: KnowledgeBase, where: dict, expected: set[str]):
    # Every document has "the" or "a"... so keyword search sees them all (a query of stopwords only
    # keeps them); dense sees all with top_k 20.
    query = "the a of and into by with that"
    for mode in ("dense", "keyword", "hybrid"):
        found = {h.doc_id for h in corpus.search("corpus", query, top_k=20, mode=mode, filter=where).hits}
        assert found == expected, mode


def test_filter_still_fills_top_k(kb: KnowledgeBase):
    # The filtered documents rank last for the query; top_k must still be filled with them.
    kb.create_collection("many")
    items = [DocumentInput(f"match-{i}", f"Harbour storm report number {i}.", {"keep": False}) for i in range(40)]
    items += [DocumentInput(f"other-{i}", f"Quarterly tax filing reminder {i}.", {"keep": True}) for i in range(5)]
    kb.put_documents("many", items)
    for mode in ("dense", "keyword", "hybrid"):
        query = "harbour storm report tax"
        hits = kb.search("many", query, top_k=5, mode=mode, filter={"keep": True}).hits
        assert sorted(h.doc_id for h in hits) == [f"other-{i}" for i in range(5)], mode


def nested(where: dict, depth: int) -> dict:
    return where if depth == 0 else {"$and": [nested(where, depth - 1)]}


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ({"topic": {"$regex": "geo"}}, "unknown operator"),
        ({"$not": {"topic": "x"}}, "unknown operator"),
        ({"$and": []}, "list of 1 to"),
        ({"$or": {"topic": "x"}}, "list of 1 to"),
        ({"_doc_id": "volcano"}, "reserved"),
        ({"year": {"$gt": "2020"}}, "numbers only"),
        ({"year": {"$gt": True}}, "numbers only"),
        ({"year": {"$in": []}}, "list of 1 to"),
        ({"year": {"$in": [2020, "2021"]}}, "mixes value types"),
        ({"year": {"$eq": None}}, "null"),
        ({"year": None}, "null"),
        ({"year": [2020, 2021]}, "use \\$in"),
        ({"year": {"$eq": {"a": 1}}}, "null and nested"),
        ({"year": {"$gt": 1, "$lt": 3}}, "exactly one operator"),
        ({"year": {}}, "exactly one operator"),
        ({"bad key": 1}, "not a valid metadata field"),
        ("topic = geology", "non-empty object"),
        ([{"topic": "geology"}], "non-empty object"),
        (nested({"a": 1}, 10), "deeper"),
        ({f"k{i}": 1 for i in range(MAX_CLAUSES + 1)}, "keys, more than"),
        ({f"k{i}": 1 for i in range(12_000)}, "keys, more than"),  # once crashed the whole process
        ({"$or": [{f"a{i}": 1, f"b{i}": 2, f"c{i}": 3} for i in range(22)]}, "conditions in all"),
        ({"$and": [{f"k{i}": {"$in": list(range(MAX_VALUES))}} for i in range(3)]}, "values in all"),
        ({"topic": "x" * 2049}, "longer than"),
        ({"topic": {"$in": ["x" * 2049]}}, "longer than"),
    ],
)
def test_invalid_filters_are_refused(corpus: KnowledgeBase, where, message):
    with pytest.raises(InvalidFilter, match=message):
        corpus.search("corpus", "volcano", filter=where)


def _deepest() -> dict:
    where: dict = {"year": {"$gte": 0}}
    for _ in range(MAX_DEPTH):
        where = {"$or": [where, {"topic": "none"}]}
    return where


# The largest filters of each shape the validator accepts: each must run in Chroma and in
# SQLite alike (past these limits SQLite refused "Expression tree is too large", and Chroma
# failed or crashed), and mean the same in both.
@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (_deepest(), {"volcano", "sourdough", "tides", "chess"}),
        ({f"k{i}": {"$nin": [f"v{j}" for j in range(8)]} for i in range(MAX_CLAUSES)}, {d.doc_id for d in DOCS}),
        ({"$or": [{f"a{i}": {"$ne": "x"}, f"b{i}": {"$nin": list(range(6))}} for i in range(MAX_CONDITIONS // 2)]},
         {d.doc_id for d in DOCS}),
        ({"$and": [{"year": {"$nin": list(range(MAX_VALUES))}}, {"rating": {"$nin": list(range(MAX_VALUES))}},
                   {"level": {"$nin": [str(i) for i in range(MAX_TOTAL_VALUES - 2 * MAX_VALUES)]}}]},
         {"volcano", "tides"}),
        ({"topic": {"$in": ["geology", *("x" * 2048 for _ in range(MAX_VALUES - 1))]}}, {"volcano", "tides"}),
    ],
    ids=["deepest", "widest-object", "most-conditions", "most-values", "longest-strings"],
)
def test_largest_accepted_filters_run_everywhere(corpus: KnowledgeBase, where: dict, expected: set[str]):
    query = "volcanic bread tides chess kafka"
    for mode in ("dense", "keyword", "hybrid"):
        unfiltered = {h.doc_id for h in corpus.search("corpus", query, top_k=20, mode=mode).hits}
        found = {h.doc_id for h in corpus.search("corpus", query, top_k=20, mode=mode, filter=where).hits}
        assert found == expected & unfiltered, mode


def test_empty_filter_means_none():
    assert Filter.parse({}) is None and Filter.parse(None) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query": ""}, "non-empty"),
        ({"query": "   "}, "non-empty"),
        ({"query": None}, "non-empty"),
        ({"query": "x" * 10_001}, "shorten"),
        ({"query": "ok", "top_k": 0}, "top_k"),
        ({"query": "ok", "top_k": 101}, "top_k"),
        ({"query": "ok", "top_k": "5"}, "top_k"),
        ({"query": "ok", "mode": "fuzzy"}, "mode"),
    ],
)
def test_invalid_queries_are_refused(corpus: KnowledgeBase, kwargs, message):
    with pytest.raises(InvalidQuery, match=message):
        corpus.search("corpus", **kwargs)
