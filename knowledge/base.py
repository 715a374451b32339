"""The knowledge base: collections of versioned documents, searchable by meaning and by keyword.

Every collection belongs to a tenant, and a name is looked up only among the caller's tenant's
collections: another tenant's is indistinguishable from one that does not exist.

Synchronous and thread-safe: the service calls it from worker threads. Heavy to open (the
embedder, Chroma), so open one per process and share it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np

from knowledge.chunking import Chunking
from knowledge.database import Database
from knowledge.documents import (
    DEFAULT_TENANT,
    CollectionInfo,
    Document,
    DocumentInfo,
    DocumentInput,
    Metadata,
    WriteResult,
    check_collection_name,
    check_doc_id,
    check_metadata,
)
from knowledge.embedding import Embedder
from knowledge.errors import (
    CollectionExists,
    CollectionNotFound,
    DocumentNotFound,
    InvalidChunking,
    InvalidQuery,
    KnowledgeError,
)
from knowledge.filters import Filter
from knowledge.ingestion import Ingestion
from knowledge.keywords import MissingIndex
from knowledge.parsing import extract_text
from knowledge.pdf_reading import PdfExtractor, PdfLimits
from knowledge.records import CollectionRow, DocumentRow, RecordStore
from knowledge.reindexing import Reindex, Reindexing, WriteGate
from knowledge.reranking import CrossEncoderReranker, Reranker
from knowledge.search import Mode, Searcher, SearchResult
from knowledge.settings import KnowledgeSettings
from knowledge.vectors import MissingVectors, VectorStore
from knowledge.versions import Versions

log = logging.getLogger(__name__)

MAX_PAGE = 1000


class KnowledgeBase:
    def __init__(
        self, settings: KnowledgeSettings, *, embedder: Embedder | None = None, reranker: Reranker | None = None
    ):
        """Open (or create) the stores under `settings`, repairing any write a crash cut short.

        `embedder`: share one already loaded (tests, or several bases in one process).
        `reranker`: use this one instead of the settings' LORAG_RERANKER_PATH.
        """
        self.settings = settings
        self.embedder = embedder or Embedder(
            settings.embedder_path, settings.embed_batch_size, settings.embedder_device
        )
        if settings.chunk_tokens > self.embedder.max_tokens:
            raise ValueError(
                f"chunk_tokens ({settings.chunk_tokens}) exceeds what the embedder reads at once "
                f"({self.embedder.max_tokens} tokens); lower LORAG_CHUNK_TOKENS"
            )
        if reranker is None and settings.reranker_path is not None:
            reranker = CrossEncoderReranker(settings.reranker_path, settings.embedder_device)
        # What a new collection records unless its creator says otherwise.
        self.chunking = Chunking(
            settings.chunk_tokens, settings.chunk_overlap, "tokens", settings.embed_title_key, self.embedder.identity
        )
        self.pdfs = PdfExtractor(
            PdfLimits(settings.pdf_timeout_s, settings.pdf_memory_mb << 20, settings.pdf_max_pages,
                      settings.max_document_chars),
            settings.pdf_workers,
        )
        self.records = RecordStore(Database(settings.database), self.chunking)
        try:
            self.vectors = VectorStore(settings)
            self.versions = Versions(self.records.active_versions())
            self._ingestion = Ingestion(
                self.records, self.vectors, self.versions, self.embedder, settings.max_document_chars
            )
            self.chunker = self._ingestion.chunker(self.chunking)  # the default collection's
            self._gate = WriteGate()
            self._reindexing = Reindexing(self.records, self.vectors, self.versions, self._ingestion, self._gate)
            self._searcher = Searcher(
                self.records, self.vectors, self.versions, self.embedder, settings.max_top_k,
                settings.hybrid_dense_weight, reranker, settings.rerank_depth,
            )
            self._sweep_orphans()
            self.recovered = self._ingestion.recover()
        except BaseException:
            self.records.close()
            raise

    def close(self) -> None:
        self.records.close()
        self.vectors.close()

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sweep_orphans(self) -> None:
        # Chroma collections of ours with no SQLite row: left by a create or delete cut short.
        known = self.records.chroma_names()
        for name in self.vectors.names(f"lorag-{self.records.instance}-"):
            if name not in known:
                log.info("deleting orphan Chroma collection %s", name)
                self.vectors.drop(name)

    # Collections

    def create_collection(
        self,
        name: str,
        metadata: Metadata | None = None,
        *,
        chunking: Mapping[str, object] | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> CollectionInfo:
        """`chunking`: any of size, overlap, strategy, title_key, instead of the settings' defaults."""
        check_collection_name(name)
        metadata = check_metadata(metadata, "collection metadata")
        recorded = self._chunking(self.chunking, chunking)
        with self.records.transaction() as tx:
            if self.records.collection(tenant, name, tx) is not None:
                raise CollectionExists(name)
            row = self.records.insert_collection(tx, tenant, name, metadata, time.time(), recorded)
            # Inside the transaction: if Chroma refuses, the row rolls back with it.
            self.vectors.create(row.chroma_name)
        self.versions.add_collection(row.id)
        self._reindexing.forget(tenant, name)  # a namesake's, deleted before
        return self._info(tenant, row, 0)

    def get_collection(self, name: str, *, tenant: str = DEFAULT_TENANT) -> CollectionInfo:
        row = self._collection(name, tenant)
        return self._info(tenant, row, self.records.count_documents(row.id))

    def list_collections(self, *, tenant: str = DEFAULT_TENANT) -> list[CollectionInfo]:
        return [self._info(tenant, row, count) for row, count in self.records.collections(tenant)]

    def _info(self, tenant: str, row: CollectionRow, documents: int) -> CollectionInfo:
        return CollectionInfo(
            row.name, row.metadata, _time(row.created_at), documents, row.chunking,
            self._reindexing.status(tenant, row),
        )

    def delete_collection(self, name: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Delete it, and the shadow of a reindex under way (which then fails)."""
        check_collection_name(name)
        with self._gate.writing((tenant, name)), self.records.transaction() as tx:
            row = self.records.collection(tenant, name, tx)
            if row is None:
                raise CollectionNotFound(name)
            shadow = self.records.shadow(tx, row.id)
            gone = [row] if shadow is None else [row, shadow]
            for each in gone:
                self.records.delete_collection(tx, each.id)
        for each in gone:
            self.versions.settle(self.versions.drop_collection(each.id))
            try:
                self.vectors.drop(each.chroma_name)
            except Exception:
                log.warning("could not delete Chroma collection %s; the next open will", each.chroma_name, exc_info=True)

    def reindex(
        self, name: str, chunking: Mapping[str, object] | None = None, *, tenant: str = DEFAULT_TENANT
    ) -> Reindex:
        """Claim the collection for a rebuild with its chunking changed by `chunking` (any of size,
        overlap, strategy, title_key; "" title_key: none) and this service's embedder; `.run()` it.
        Raises ReindexRunning if one is under way."""
        row = self._collection(name, tenant)
        target = self._chunking(replace(row.chunking, embedder=self.embedder.identity), chunking)
        return self._reindexing.start(tenant, row, target)

    def _chunking(self, base: Chunking, changes: Mapping[str, object] | None) -> Chunking:
        changes = dict(changes or {})
        unknown = set(changes) - {"size", "overlap", "strategy", "title_key"}
        if unknown:
            raise InvalidChunking(f"unknown chunking field(s) {sorted(unknown)}; use size, overlap, strategy, title_key")
        chunking = base.changed(**changes)
        try:
            chunking.check(self.embedder.max_tokens)
        except ValueError as exc:
            raise InvalidChunking(str(exc)) from None
        return chunking

    def _collection(self, name: str, tenant: str) -> CollectionRow:
        check_collection_name(name)
        row = self.records.collection(tenant, name)
        if row is None:
            raise CollectionNotFound(name)
        return row

    # Documents

    def extract_text(self, filename: str, data: bytes) -> str:
        """An uploaded file's text (PDFs read in a child process under the pdf_* limits)."""
        return extract_text(filename, data, self.pdfs)

    def put_document(
        self, collection: str, doc_id: str, text: str, metadata: Metadata | None = None, *, tenant: str = DEFAULT_TENANT
    ) -> WriteResult:
        """Write a new version of a document (or nothing, if text and metadata are unchanged).

        Returns after the new version is what every later search sees.
        """
        (result,) = self.put_documents(collection, [DocumentInput(doc_id, text, metadata)], tenant=tenant)
        if isinstance(result, KnowledgeError):
            raise result
        return result

    def put_documents(
        self, collection: str, items: Sequence[DocumentInput], *, tenant: str = DEFAULT_TENANT
    ) -> list[WriteResult | KnowledgeError]:
        """Write many documents, embedding across them; one result or error per item, in order."""
        with self._gate.writing((tenant, collection)):  # resolved inside: a reindex may cut over first
            return self._ingestion.put(self._collection(collection, tenant), list(items))

    def get_document(self, collection: str, doc_id: str, *, tenant: str = DEFAULT_TENANT) -> Document:
        row = self._collection(collection, tenant)
        found = self.records.document(row.id, check_doc_id(doc_id))
        if found is None:
            raise DocumentNotFound(collection, doc_id)
        return Document(**vars(_info(collection, found)), text=found.text or "")

    def list_documents(
        self, collection: str, limit: int = 100, after: str | None = None, *, tenant: str = DEFAULT_TENANT
    ) -> tuple[list[DocumentInfo], str | None]:
        """One page ordered by doc_id, and the cursor (`after`) of the next page or None."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidQuery(f"limit must be an integer from 1 to {MAX_PAGE}, got {limit!r}")
        if after is not None and not isinstance(after, str):
            raise InvalidQuery("after must be the doc_id cursor returned with the previous page")
        row = self._collection(collection, tenant)
        found = self.records.documents_page(row.id, limit + 1, after)
        items = [_info(collection, doc) for doc in found[:limit]]
        return items, (items[-1].doc_id if len(found) > limit else None)

    def delete_document(self, collection: str, doc_id: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Remove the document and every chunk of it."""
        with self._gate.writing((tenant, collection)):
            self._ingestion.delete(self._collection(collection, tenant), check_doc_id(doc_id))

    # Search

    def search(
        self,
        collection: str,
        query: str,
        top_k: int = 5,
        mode: Mode = "hybrid",
        filter: dict | None = None,  # noqa: A002 (the name callers know from Chroma)
        query_embedding: Sequence[float] | np.ndarray | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
    ) -> SearchResult:
        """Best chunks for `query`; `query_embedding` skips embedding the query (dense and hybrid)."""
        vector = self._searcher.check(query, top_k, mode, query_embedding)
        where = Filter.parse(filter)
        check_collection_name(collection)
        try:
            return self._searcher.search(lambda: self._collection(collection, tenant), query, top_k, mode, where, vector)
        except (MissingVectors, MissingIndex):  # deleted under this search
            raise CollectionNotFound(collection) from None


def _time(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def _info(collection: str, row: DocumentRow) -> DocumentInfo:
    return DocumentInfo(
        collection, row.doc_id, row.version, row.content_hash, row.metadata, row.chunks,
        _time(row.created_at), _time(row.updated_at),
    )
