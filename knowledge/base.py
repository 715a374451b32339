"""The knowledge base: collections of versioned documents, searchable by meaning and by keyword.

Every collection belongs to a tenant, and a name is looked up only among the caller's tenant's
collections: another tenant's is indistinguishable from one that does not exist.

Synchronous and thread-safe: the service calls it from worker threads. Heavy to open (the
embedder, Chroma), so open one per process and share it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np

from knowledge.chunking import Chunker
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
from knowledge.errors import CollectionExists, CollectionNotFound, DocumentNotFound, InvalidQuery, KnowledgeError
from knowledge.filters import Filter
from knowledge.ingestion import Ingestion
from knowledge.keywords import MissingIndex
from knowledge.parsing import extract_text
from knowledge.pdf_reading import PdfExtractor, PdfLimits
from knowledge.records import CollectionRow, DocumentRow, RecordStore
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
        self.chunker = Chunker(self.embedder.tokenizer, settings.chunk_tokens, settings.chunk_overlap)
        self.pdfs = PdfExtractor(
            PdfLimits(settings.pdf_timeout_s, settings.pdf_memory_mb << 20, settings.pdf_max_pages,
                      settings.max_document_chars),
            settings.pdf_workers,
        )
        self.records = RecordStore(settings.database_path)
        try:
            self.vectors = VectorStore(settings)
            self.versions = Versions(self.records.active_versions())
            self._ingestion = Ingestion(
                self.records, self.vectors, self.versions, self.chunker, self.embedder, settings.max_document_chars,
                settings.embed_title_key,
            )
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
        self, name: str, metadata: Metadata | None = None, *, tenant: str = DEFAULT_TENANT
    ) -> CollectionInfo:
        check_collection_name(name)
        metadata = check_metadata(metadata, "collection metadata")
        with self.records.transaction() as tx:
            if self.records.collection(tenant, name, tx) is not None:
                raise CollectionExists(name)
            row = self.records.insert_collection(tx, tenant, name, metadata, time.time())
            # Inside the transaction: if Chroma refuses, the row rolls back with it.
            self.vectors.create(row.chroma_name)
        self.versions.add_collection(row.id)
        return CollectionInfo(row.name, row.metadata, _time(row.created_at), 0)

    def get_collection(self, name: str, *, tenant: str = DEFAULT_TENANT) -> CollectionInfo:
        row = self._collection(name, tenant)
        return CollectionInfo(row.name, row.metadata, _time(row.created_at), self.records.count_documents(row.id))

    def list_collections(self, *, tenant: str = DEFAULT_TENANT) -> list[CollectionInfo]:
        return [
            CollectionInfo(row.name, row.metadata, _time(row.created_at), count)
            for row, count in self.records.collections(tenant)
        ]

    def delete_collection(self, name: str, *, tenant: str = DEFAULT_TENANT) -> None:
        check_collection_name(name)
        with self.records.transaction() as tx:
            row = self.records.collection(tenant, name, tx)
            if row is None:
                raise CollectionNotFound(name)
            self.records.delete_collection(tx, row.id)
        self.versions.settle(self.versions.drop_collection(row.id))
        try:
            self.vectors.drop(row.chroma_name)
        except Exception:
            log.warning("could not delete Chroma collection %s; the next open will", row.chroma_name, exc_info=True)

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
        row = self._collection(collection, tenant)
        try:
            return self._searcher.search(row, query, top_k, mode, where, vector)
        except (MissingVectors, MissingIndex):  # deleted under this search
            raise CollectionNotFound(collection) from None


def _time(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def _info(collection: str, row: DocumentRow) -> DocumentInfo:
    return DocumentInfo(
        collection, row.doc_id, row.version, row.content_hash, row.metadata, row.chunks,
        _time(row.created_at), _time(row.updated_at),
    )
