"""Dense, keyword and hybrid search, and metadata filters, on real Chroma, SQLite or PostgreSQL, and the
BM25 index."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from knowledge import DocumentInput, InvalidFilter, InvalidQuery, KnowledgeBase
from knowledge.filters import MAX_CLAUSES, MAX_CONDITIONS, MAX_DEPTH, MAX_TOTAL_VALUES, MAX_VALUES, Filter
from knowledge.search import fuse
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


# Each filter with the documents it must keep; the same answer from Chroma and from the SQL side (SQLite
# embedded, PostgreSQL scaled out).
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
def test_filters_mean_the_same_in_chroma_and_sql(corpus: KnowledgeBase, where: dict, expected: set[str]):
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


# Hybrid fusion: normalised scores, weighted


def _key(name: str) -> tuple[str, int, int]:
    return (name, 1, 0)


def test_fusion_keeps_a_clear_keyword_winner_ahead_of_a_narrow_dense_one():
    # "exact" is far ahead in keyword scores and a close third in dense; "near" is a close
    # first in dense and a distant second in keyword. Fusing ranks throws the margins away
    # and puts "near" first; normalised scores keep "exact" first.
    dense = [(_key("near"), 0.61), (_key("mid"), 0.605), (_key("exact"), 0.60), (_key("other"), 0.20)]
    keyword = [(_key("exact"), 14.0), (_key("near"), 3.0), (_key("other"), 2.9), (_key("mid"), 2.5)]
    ranks: dict = {}
    for ranked in (dense, keyword):
        for rank, (key, _) in enumerate(ranked, 1):
            ranks[key] = ranks.get(key, 0) + 1 / (60 + rank)
    assert max(ranks, key=ranks.get) == _key("near")  # reciprocal rank fusion, k = 60
    fused = fuse(dense, keyword, 0.5)
    assert [key[0] for key, _ in fused] == ["exact", "near", "mid", "other"]
    assert fused[0][1] == pytest.approx(0.5 * (0.60 - 0.20) / 0.41 + 0.5)
    assert all(0 <= score <= 1 for _, score in fused)


def test_fusion_weights_move_the_ranking_to_one_list_and_handle_edges():
    dense = [(_key("a"), 0.9), (_key("b"), 0.5)]
    keyword = [(_key("b"), 9.0), (_key("c"), 1.0)]
    assert dict(fuse(dense, keyword, 1.0)) == {_key("a"): 1.0, _key("b"): 0.0, _key("c"): 0.0}
    assert dict(fuse(dense, keyword, 0.0)) == {_key("b"): 1.0, _key("a"): 0.0, _key("c"): 0.0}
    assert fuse([], [], 0.5) == []
    assert fuse([], keyword, 0.5) == [(_key("b"), 0.5), (_key("c"), 0.0)]
    # A list of equal scores counts each candidate as its best; ties keep the dense order.
    assert fuse([(_key("x"), 0.3), (_key("y"), 0.3)], [], 0.5) == [(_key("x"), 0.5), (_key("y"), 0.5)]


def test_hybrid_scores_are_fused_on_the_real_stores(corpus: KnowledgeBase):
    dense = corpus.search("corpus", "moon tides gravitational", top_k=5, mode="dense").hits
    keyword = corpus.search("corpus", "moon tides gravitational", top_k=5, mode="keyword").hits
    hybrid = corpus.search("corpus", "moon tides gravitational", top_k=5, mode="hybrid").hits
    assert hybrid[0].doc_id == dense[0].doc_id == keyword[0].doc_id == "tides"
    assert hybrid[0].score == pytest.approx(1.0)  # best in both lists
    assert {h.doc_id for h in hybrid} == {h.doc_id for h in dense} | {h.doc_id for h in keyword}


def test_each_chunk_is_embedded_with_its_documents_title(chroma_mode, tmp_path, request, embedder):
    # A chunk that never names its subject is found by a query about the subject when the
    # title says it; with the title context off, the same text is just a number list.
    text = "Use a larger number to keep more of them. The default is ten."
    docs = [DocumentInput("backups", text, {"title": "Numbered backup files kept by logrotate"}),
            DocumentInput("filler", "Trains leave the station every ten minutes.", {"title": "Timetable"})]
    query = "how many rotated log backups are kept"
    ranks = {}
    for key in ("title", ""):
        settings = chroma_settings(chroma_mode, tmp_path / (key or "none"), request, embed_title_key=key)
        with KnowledgeBase(settings, embedder=embedder) as base:
            base.create_collection("docs")
            base.put_documents("docs", docs)
            hits = base.search("docs", query, top_k=2, mode="dense").hits
            assert hits[0].text in (text, docs[1].text)  # the stored text never carries the title
            ranks[key] = {h.doc_id: h.score for h in hits}
    assert ranks["title"]["backups"] > ranks["title"]["filler"]
    assert ranks["title"]["backups"] > ranks[""]["backups"] + 0.1


class WordReranker:
    """The test reranker: a passage scores how many times it says `word`. Real cross-encoder
    weights are not packaged here; this one stands behind the same interface."""

    def __init__(self, word: str):
        self.word, self.calls = word, []

    def scores(self, query: str, passages):
        self.calls.append((query, list(passages)))
        return [passage.lower().count(self.word) for passage in passages]


@pytest.mark.parametrize("mode", ["dense", "keyword", "hybrid"])
def test_a_reranker_reorders_the_first_stages_best_candidates(make_settings, embedder, mode: str):
    docs = [DocumentInput(f"d{i}", f"Ocean tides and the moon, note {i}." + " moon" * (i == 3)) for i in range(5)]
    docs.append(DocumentInput("far", "Bread dough rises with yeast; the moon moon moon moon."))
    with KnowledgeBase(make_settings(), embedder=embedder) as base:  # the first stage alone
        base.create_collection("docs")
        base.put_documents("docs", docs)
        plain = base.search("docs", "ocean tides note", top_k=5, mode=mode).hits
    reranker = WordReranker("moon")
    with KnowledgeBase(make_settings(rerank_depth=5), embedder=embedder, reranker=reranker) as base:
        result = base.search("docs", "ocean tides note", top_k=2, mode=mode)
    query, passages = reranker.calls[-1]
    assert query == "ocean tides note"
    assert passages == [hit.text for hit in plain]  # the first stage's five best, in order
    assert result.hits[0].doc_id == max(plain, key=lambda hit: hit.text.count("moon")).doc_id == "d3"
    assert [hit.score for hit in result.hits] == [2, 1]
    # "far" says moon most of all but is not among the first stage's five: never promoted.
    assert "far" not in {hit.doc_id for hit in plain} | {hit.doc_id for hit in result.hits}
    assert result.timings.rerank_ms > 0 and len(result.hits) == 2


def test_the_settings_reranker_is_a_cross_encoder_read_from_disk(make_settings, embedder, tmp_path):
    # No cross-encoder weights are packaged: build a tiny random one locally, with the
    # embedder's tokenizer, only to show the path from LORAG_RERANKER_PATH to the scores.
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from knowledge.embedding import default_model_path
    from knowledge.reranking import CrossEncoderReranker

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "ce")
    tokenizer.save_pretrained(tmp_path / "ce")
    with KnowledgeBase(make_settings(reranker_path=tmp_path / "ce"), embedder=embedder) as base:
        base.create_collection("docs")
        base.put_documents("docs", DOCS)
        hits = base.search("docs", "chess opening", top_k=5, mode="hybrid").hits
    expected = CrossEncoderReranker(tmp_path / "ce").scores("chess opening", [hit.text for hit in hits])
    assert [hit.score for hit in hits] == pytest.approx(expected, abs=1e-5)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    with pytest.raises(FileNotFoundError, match="LORAG_RERANKER_PATH"):
        CrossEncoderReranker(tmp_path / "missing")


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_a_dense_weight_outside_0_to_1_is_refused(weight: float):
    from pydantic import ValidationError

    from knowledge import KnowledgeSettings

    with pytest.raises(ValidationError, match="hybrid_dense_weight"):
        KnowledgeSettings(_env_file=None, hybrid_dense_weight=weight)
