"""Search a collection: dense (Chroma), keyword (BM25, keywords.py), or both fused (hybrid).

Hybrid fuses normalised scores, not ranks: each list's scores are scaled to [0, 1] over its
candidates and summed with weights (`dense_weight`, the rest to keyword). Reciprocal rank
fusion throws the scores away, so a keyword hit far ahead of every other chunk counts no more
than a dense hit barely ahead; on bench.retrieval_bench's dev half it ranked the answer
first less often than keyword search alone, and normalised scores did not.

Every hit is checked against the version map (see versions.py), so only the version of a
document that was active when the search started is ever returned. The collection itself is
looked up inside that snapshot too, so a reindex's cut-over (reindexing.py) never deletes an
old index under a search that found it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from knowledge.documents import Metadata
from knowledge.embedding import Embedder
from knowledge.errors import InvalidQuery
from knowledge.database import Database
from knowledge.filters import Filter
from knowledge.keywords import query_terms
from knowledge.reranking import Reranker
from knowledge.records import ChunkRow, CollectionRow, RecordStore
from knowledge.vectors import VectorStore, chunk_id
from knowledge.versions import Versions

Mode = Literal["hybrid", "dense", "keyword"]
MODES = ("hybrid", "dense", "keyword")
MAX_QUERY_CHARS = 10_000
MAX_FETCH = 10_000  # most candidates one list fetches while making up for hits of other versions


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    version: int
    index: int
    start: int  # character offsets of the chunk in its document
    end: int
    text: str
    # dense: cosine similarity; keyword: BM25; hybrid: fused normalised scores, 0 to 1;
    # with a reranker: the reranker's score
    score: float
    metadata: Metadata


@dataclass(frozen=True)
class SearchTimings:
    embed_ms: float  # embedding the query (0 when the caller passed query_embedding)
    dense_ms: float
    keyword_ms: float
    rerank_ms: float  # 0 when no reranker is configured
    search_ms: float  # everything after the query embedding


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    timings: SearchTimings
    mode: Mode


# (doc_id, version, index) → score, best first
Ranked = list[tuple[tuple[str, int, int], float]]


class Searcher:
    def __init__(
        self,
        records: RecordStore,
        vectors: VectorStore,
        versions: Versions,
        embedder: Embedder,
        max_top_k: int,
        dense_weight: float,
        reranker: Reranker | None,
        rerank_depth: int,
    ):
        self._records = records
        self._vectors = vectors
        self._versions = versions
        self._embedder = embedder
        self._max_top_k = max_top_k
        self._dense_weight = dense_weight
        self._reranker = reranker
        self._rerank_depth = rerank_depth

    def check(self, query: object, top_k: object, mode: object, query_embedding: object) -> np.ndarray | None:
        """Validate the arguments before any work; returns the query embedding as float32 if given."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidQuery("query must be a non-empty string")
        if len(query) > MAX_QUERY_CHARS:
            raise InvalidQuery(f"query has {len(query)} characters, more than {MAX_QUERY_CHARS}; shorten it")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self._max_top_k:
            raise InvalidQuery(f"top_k must be an integer from 1 to {self._max_top_k}, got {top_k!r}")
        if mode not in MODES:
            raise InvalidQuery(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if query_embedding is None:
            return None
        vector = np.asarray(query_embedding, dtype=np.float32).reshape(-1)
        if vector.shape != (self._embedder.dim,) or not np.isfinite(vector).all():
            raise InvalidQuery(f"query_embedding must be {self._embedder.dim} finite numbers from the embedder")
        return vector

    def search(
        self,
        resolve: Callable[[], CollectionRow],
        query: str,
        top_k: int,
        mode: Mode,
        where: Filter | None,
        query_embedding: np.ndarray | None,
    ) -> SearchResult:
        embed_ms = 0.0
        if mode != "keyword" and query_embedding is None:
            started = time.perf_counter()
            query_embedding = self._embedder.encode([query])[0]
            embed_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        # Each list contributes this many candidates: top_k alone, or a deeper pool to fuse.
        want = top_k if mode != "hybrid" else max(2 * top_k, 20)
        keep = top_k if self._reranker is None else max(top_k, self._rerank_depth)  # hits read for the reranker
        want = max(want, keep)
        dense: Ranked = []
        keyword: Ranked = []
        dense_ms = keyword_ms = 0.0
        with self._versions.reading() as seq, self._records.reading() as conn:
            collection = resolve()
            if mode != "keyword":
                collection.chunking.require_embedder(collection.name, self._embedder.identity)
            rows = {}
            if mode != "keyword":
                t = time.perf_counter()
                dense = self._dense(seq, collection, query_embedding, want, where)
                dense_ms = (time.perf_counter() - t) * 1000
            if mode != "dense":
                t = time.perf_counter()
                keyword, rows = self._keyword(seq, collection, conn, query, want, where)
                keyword_ms = (time.perf_counter() - t) * 1000
            ranked = dense if mode == "dense" else keyword if mode == "keyword" else fuse(dense, keyword, self._dense_weight)
            hits = []
            # Read chunk rows while still inside the snapshot: the old version's rows may go once it ends.
            for key, score in ranked[:keep]:
                row = rows.get(key) or self._records.chunk(conn, collection.id, *key)
                if row is not None:
                    hits.append(
                        Hit(
                            chunk_id=chunk_id(*key), doc_id=row.doc_id, version=row.version, index=row.index,
                            start=row.start, end=row.end, text=row.text, score=score, metadata=row.metadata,
                        )
                    )
        rerank_ms = 0.0
        if self._reranker is not None and hits:
            t = time.perf_counter()
            scores = self._reranker.scores(query, [hit.text for hit in hits])
            order = sorted(range(len(hits)), key=lambda i: -scores[i])  # stable: first-stage order breaks ties
            hits = [replace(hits[i], score=float(scores[i])) for i in order]
            rerank_ms = (time.perf_counter() - t) * 1000
        timings = SearchTimings(embed_ms, dense_ms, keyword_ms, rerank_ms, (time.perf_counter() - started) * 1000)
        return SearchResult(hits[:top_k], timings, mode)

    def _dense(
        self, seq: int, collection: CollectionRow, embedding: np.ndarray, want: int, where: Filter | None
    ) -> Ranked:
        chroma_where = where.to_chroma() if where is not None else None

        def fetch(n: int) -> list[tuple[tuple[str, int, int], float]]:
            return [
                ((hit.doc_id, hit.version, hit.index), 1.0 - hit.distance)
                for hit in self._vectors.query(collection.chroma_name, embedding, n, chroma_where)
            ]

        return self._accepted(seq, collection, fetch, want)

    def _keyword(
        self, seq: int, collection: CollectionRow, conn: Database, query: str, want: int, where: Filter | None
    ) -> tuple[Ranked, dict[tuple[str, int, int], ChunkRow]]:
        terms = query_terms(query)
        if not terms:  # only punctuation: nothing to match, not an error
            return [], {}
        ranking = self._records.keywords(collection.id).rank(terms)
        sql, params = where.to_sql("c.metadata", conn.dialect) if where is not None else ("1 = 1", [])
        checked: dict[int, ChunkRow | None] = {}  # chunk row id → its row, None if filtered out or gone
        rows: dict[tuple[str, int, int], ChunkRow] = {}

        def fetch(n: int) -> list[tuple[tuple[str, int, int], float]]:
            """The best `n` chunks that pass the filter; fewer only when no more match."""
            depth = n
            while True:
                ids, scores = ranking.top(depth)
                todo = [i for i in ids if i not in checked]
                found_rows = self._records.chunks_by_id(conn, collection.id, todo, sql, params)
                checked.update((i, found_rows.get(i)) for i in todo)
                found = []
                for i, score in zip(ids, scores, strict=True):
                    row = checked[i]
                    if row is not None:
                        key = (row.doc_id, row.version, row.index)
                        rows[key] = row
                        found.append((key, score))
                # A selective filter passes few of the best chunks: look deeper, up to every match.
                if len(found) >= n or len(ids) < depth:
                    return found[:n]
                depth *= 4

        return self._accepted(seq, collection, fetch, want), rows

    def _accepted(self, seq: int, collection: CollectionRow, fetch: Callable[[int], Ranked], want: int) -> Ranked:
        """The first `want` candidates of the versions visible at `seq`, fetching deeper while
        other versions' chunks (of documents mid-rewrite) crowd them out."""
        n = max(2 * want, 20)
        while True:
            found = fetch(n)
            visible = self._versions.visible(seq, collection.id, {key[0] for key, _ in found})
            accepted = [(key, score) for key, score in found if visible.get(key[0]) == key[1]]
            if len(accepted) >= want or len(found) < n or n >= MAX_FETCH:
                return accepted[:want]
            n = min(4 * n, MAX_FETCH)


def fuse(dense: Ranked, keyword: Ranked, dense_weight: float) -> Ranked:
    """Weighted sum of each list's min-max normalised scores; a chunk missing from a list gets 0
    there. Ties go to the better dense rank, then keyword rank, so the order is deterministic."""
    fused: dict[tuple[str, int, int], float] = {}
    order: dict[tuple[str, int, int], int] = {}
    for ranked, weight in ((dense, dense_weight), (keyword, 1.0 - dense_weight)):
        if not ranked:
            continue
        high, low = ranked[0][1], ranked[-1][1]
        spread = high - low
        for key, score in ranked:
            # One candidate, or all equal: each is its list's best.
            scaled = (score - low) / spread if spread > 0 else 1.0
            fused[key] = fused.get(key, 0.0) + weight * scaled
            order.setdefault(key, len(order))
    return sorted(fused.items(), key=lambda item: (-item[1], order[item[0]]))
