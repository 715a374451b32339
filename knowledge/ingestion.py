"""Writing documents: chunk, embed, store the new version, flip to it, delete the old one.

For each changed document, in this order:
  0. an intent row in SQLite (a crash after this point is repaired at the next open);
  1. the new version's chunks and vectors go to Chroma (invisible: not the active version);
  2. one SQLite transaction adds the new chunk rows (the keyword index takes them at its
     commit) and makes the version active: the flip; then the version map lets new searches see it;
  3. once no search that started before the flip is running, the old version's chunks leave
     Chroma and SQLite, and the intent row goes.
A bulk write does each step once for all of its documents, so Chroma and SQLite see a few big
batches and the embedder one long stream of chunks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from knowledge.chunking import Chunk, Chunker, Chunking
from knowledge.documents import DocumentInput, Metadata, ValidDocument, WriteResult, validate_document
from knowledge.embedding import Embedder
from knowledge.errors import CollectionNotFound, DocumentNotFound, InvalidDocument, KnowledgeError
from knowledge.filters import as_float
from knowledge.records import CollectionRow, DocumentRow, Publication, RecordStore
from knowledge.vectors import MissingVectors, VectorStore, chunk_id
from knowledge.versions import Versions

log = logging.getLogger(__name__)

Key = tuple[int, str]  # (collection id, doc_id)


class DocumentLocks:
    """One lock per document, made on demand and dropped when no one holds or waits for it."""

    def __init__(self):
        self._mutex = threading.Lock()
        self._locks: dict[Key, list] = {}  # key → [lock, holders and waiters]

    @contextmanager
    def holding(self, keys: Iterable[Key]) -> Iterator[None]:
        keys = sorted(set(keys))  # one global order: two bulk writes never deadlock
        with self._mutex:
            entries = [self._locks.setdefault(key, [threading.Lock(), 0]) for key in keys]
            for entry in entries:
                entry[1] += 1
        taken = []
        try:
            for entry in entries:
                entry[0].acquire()
                taken.append(entry[0])
            yield
        finally:
            for lock in reversed(taken):
                lock.release()
            with self._mutex:
                for key, entry in zip(keys, entries, strict=True):
                    entry[1] -= 1
                    if not entry[1]:
                        del self._locks[key]


class Ingestion:
    def __init__(
        self,
        records: RecordStore,
        vectors: VectorStore,
        versions: Versions,
        embedder: Embedder,
        max_document_chars: int,
    ):
        self._records = records
        self._vectors = vectors
        self._versions = versions
        self._embedder = embedder
        self._max_chars = max_document_chars
        self._locks = DocumentLocks()
        self._chunkers: dict[tuple[int, int], Chunker] = {}
        self._chunkers_lock = threading.Lock()

    def chunker(self, chunking: Chunking) -> Chunker:
        """The chunker of a collection's recorded settings (one per size and overlap, made once)."""
        key = (chunking.size, chunking.overlap)
        with self._chunkers_lock:
            if key not in self._chunkers:
                self._chunkers[key] = Chunker(self._embedder.tokenizer, chunking.size, chunking.overlap)
            return self._chunkers[key]

    def embed(self, chunking: Chunking, docs: Sequence[tuple[str, Metadata]]) -> tuple[list[list[Chunk]], np.ndarray]:
        """Each (text, metadata)'s chunks, and the vectors of all of them in order."""
        chunker = self.chunker(chunking)
        chunks = [chunker.split(text) for text, _ in docs]
        texts = [
            _context(metadata, chunking.title_key) + chunk.text
            for (_, metadata), parts in zip(docs, chunks, strict=True)
            for chunk in parts
        ]
        return chunks, self._embedder.encode(texts)

    def put(self, collection: CollectionRow, items: Sequence[object]) -> list[WriteResult | KnowledgeError]:
        """Write each item; a bad item gets its error in its slot and does not stop the others."""
        results: list[WriteResult | KnowledgeError | None] = [None] * len(items)
        valid: dict[int, ValidDocument] = {}
        seen: set[str] = set()
        for i, item in enumerate(items):
            try:
                if not isinstance(item, DocumentInput):
                    raise InvalidDocument(f"item {i} is not a document (doc_id, text, metadata)")
                doc = validate_document(item.doc_id, item.text, item.metadata, self._max_chars)
                if doc.doc_id in seen:
                    raise InvalidDocument(f"doc_id {doc.doc_id!r} appears more than once in this batch; send it once")
            except InvalidDocument as exc:
                results[i] = exc
                continue
            seen.add(doc.doc_id)
            valid[i] = doc

        # Unchanged documents cost one lookup, no embedding.
        with self._records.reading() as conn:
            current = self._records.current(conn, collection.id, [doc.doc_id for doc in valid.values()])
        todo = {}
        for i, doc in valid.items():
            found = current.get(doc.doc_id)
            if found is not None and found.content_hash == doc.content_hash:
                results[i] = WriteResult(doc.doc_id, found.version, "unchanged", found.chunks)
            else:
                todo[i] = doc
        if todo:
            collection.chunking.require_embedder(collection.name, self._embedder.identity)
            split, vectors = self.embed(collection.chunking, [(doc.text, doc.metadata) for doc in todo.values()])
            chunks = dict(zip(todo, split, strict=True))
            with self._locks.holding((collection.id, doc.doc_id) for doc in todo.values()):
                results_written = self._write(collection, todo, chunks, vectors)
            for i, result in results_written.items():
                results[i] = result
        return results  # type: ignore[return-value]

    def copy(self, target: CollectionRow, docs: Sequence[DocumentRow]) -> None:
        """Write these documents (another collection's rows, with text) into `target`, cut by its
        chunking, at their own versions and times, replacing whatever it holds of them: a reindex's
        copy. Only for a collection no search reads."""
        chunks, vectors = self.embed(target.chunking, [(doc.text or "", doc.metadata) for doc in docs])
        doc_ids = [doc.doc_id for doc in docs]
        with self._locks.holding((target.id, doc_id) for doc_id in doc_ids):
            self._remove(target, doc_ids)
            with self._records.transaction() as tx:
                leftover = self._records.add_intents(tx, target.id, doc_ids, time.time())
            publications = [
                Publication(doc.doc_id, doc.version, doc.content_hash, doc.metadata, doc.text or "", parts,
                            doc.created_at, doc.updated_at)
                for doc, parts in zip(docs, chunks, strict=True)
            ]
            self._publish(target, publications, vectors, {}, leftover)

    def discard(self, target: CollectionRow, doc_ids: Sequence[str]) -> None:
        """Remove these documents from `target`, no search waited for: a reindex's copy of
        documents deleted from the live collection since."""
        with self._locks.holding((target.id, doc_id) for doc_id in doc_ids):
            self._remove(target, doc_ids)

    def _remove(self, target: CollectionRow, doc_ids: Sequence[str]) -> None:
        with self._records.reading() as conn:
            present = list(self._records.current(conn, target.id, doc_ids))
        if not present:
            return
        for doc_id in present:
            self._vectors.delete_stale(target.chroma_name, doc_id, keep_version=None)
        with self._records.transaction() as tx:
            for doc_id in present:
                self._records.remove_document(tx, target.id, doc_id)
                self._records.drop_chunks(tx, target.id, doc_id, keep_version=None)
        self._versions.settle(self._versions.flip(target.id, dict.fromkeys(present)), target.id, present)

    def _write(
        self,
        collection: CollectionRow,
        todo: dict[int, ValidDocument],
        chunks: dict[int, list[Chunk]],
        vectors: np.ndarray,
    ) -> dict[int, WriteResult]:
        cid = collection.id
        now = time.time()
        results: dict[int, WriteResult] = {}
        publications: list[Publication] = []
        old: dict[str, tuple[int, int]] = {}  # doc_id → (version, chunks) being replaced
        row = 0
        embeddings: list[np.ndarray] = []
        with self._records.transaction() as tx:
            if not self._records.collection_exists(tx, cid):
                raise CollectionNotFound(collection.name)
            # Read again under the document locks: another write may have landed since `put` looked.
            current = self._records.current(tx, cid, [doc.doc_id for doc in todo.values()])
            for i, doc in todo.items():
                found = current.get(doc.doc_id)
                if found is not None and found.content_hash == doc.content_hash:
                    results[i] = WriteResult(doc.doc_id, found.version, "unchanged", found.chunks)
                else:
                    version = found.version + 1 if found is not None else 1
                    if found is not None:
                        old[doc.doc_id] = (found.version, found.chunks)
                    publications.append(
                        Publication(doc.doc_id, version, doc.content_hash, doc.metadata, doc.text, chunks[i])
                    )
                    embeddings.append(vectors[row : row + len(chunks[i])])
                    results[i] = WriteResult(doc.doc_id, version, "updated" if found else "created", len(chunks[i]))
                row += len(chunks[i])
            leftover = self._records.add_intents(tx, cid, [p.doc_id for p in publications], now)
        if publications:
            self._publish(collection, publications, np.concatenate(embeddings), old, leftover)
        return results

    def _publish(
        self,
        collection: CollectionRow,
        publications: list[Publication],
        vectors: np.ndarray,
        old: dict[str, tuple[int, int]],
        leftover: list[str],
    ) -> None:
        """Steps 1 to 3 for documents whose intents are written: `vectors` holds their chunks'
        in order; `old` the (version, chunks) each replaces; `leftover` those an earlier write left."""
        cid, name = collection.id, collection.chroma_name
        doc_ids = [p.doc_id for p in publications]
        try:
            if leftover:  # an earlier write of these documents failed half-way
                self.repair(collection, leftover)
            ids, metadatas = [], []
            for publication in publications:
                for chunk in publication.chunks:
                    ids.append(chunk_id(publication.doc_id, publication.version, chunk.index))
                    metadatas.append(_chunk_metadata(publication, chunk))
            self._vectors.upsert(name, ids, vectors, metadatas)
            with self._records.transaction() as tx:
                if not self._records.collection_exists(tx, cid):
                    raise CollectionNotFound(collection.name)
                self._records.publish(tx, cid, publications, time.time())
        except BaseException as exc:
            self._abandon(collection, doc_ids)
            if isinstance(exc, MissingVectors):
                raise CollectionNotFound(collection.name) from None
            raise

        seq = self._versions.flip(cid, {p.doc_id: p.version for p in publications})
        self._versions.settle(seq, cid, doc_ids)
        try:
            self._vectors.delete_ids(
                name, [chunk_id(doc_id, version, k) for doc_id, (version, count) in old.items() for k in range(count)]
            )
            with self._records.transaction() as tx:
                for publication in publications:
                    self._records.drop_chunks(tx, cid, publication.doc_id, keep_version=publication.version)
                self._records.clear_intents(tx, cid, doc_ids)
        except Exception:
            # The new versions are live and searches ignore the old ones; the intents stay, so
            # the next write of these documents, or the next open, finishes the clean-up.
            log.warning("could not delete replaced chunks in %r; left for repair", collection.name, exc_info=True)

    def _abandon(self, collection: CollectionRow, doc_ids: list[str]) -> None:
        """Best effort after a failed write: remove every chunk of these documents except their
        active (old) version's, so the failed version's and any an earlier failure left; then the intents."""
        try:
            self.repair(collection, doc_ids)
            with self._records.transaction() as tx:
                self._records.clear_intents(tx, collection.id, doc_ids)
        except MissingVectors:
            pass  # the collection was deleted under the write: nothing left to clean
        except Exception:
            log.warning("could not clean up a failed write in %r; left for repair", collection.name, exc_info=True)

    def delete(self, collection: CollectionRow, doc_id: str) -> None:
        cid = collection.id
        with self._locks.holding([(cid, doc_id)]):
            with self._records.transaction() as tx:
                if not self._records.current(tx, cid, [doc_id]):
                    raise DocumentNotFound(collection.name, doc_id)
                self._records.add_intents(tx, cid, [doc_id], time.time())
                self._records.remove_document(tx, cid, doc_id)
            seq = self._versions.flip(cid, {doc_id: None})
            self._versions.settle(seq, cid, [doc_id])
            try:
                self._vectors.delete_stale(collection.chroma_name, doc_id, keep_version=None)
                with self._records.transaction() as tx:
                    self._records.drop_chunks(tx, cid, doc_id, keep_version=None)
                    self._records.clear_intents(tx, cid, [doc_id])
            except Exception:
                log.warning(
                    "could not delete the chunks of %r in %r; left for repair", doc_id, collection.name, exc_info=True
                )

    def repair(self, collection: CollectionRow, doc_ids: Iterable[str]) -> None:
        """Delete every chunk of these documents that is not of their active version.

        Only for documents no search can be reading at another version: locked, or at open.
        """
        cid = collection.id
        for doc_id in doc_ids:
            found = self._records.document(cid, doc_id, text=False)
            keep = found.version if found is not None else None
            self._vectors.delete_stale(collection.chroma_name, doc_id, keep)
            with self._records.transaction() as tx:
                self._records.drop_chunks(tx, cid, doc_id, keep)

    def recover(self) -> int:
        """At open: repair every document whose write was cut short. Returns how many."""
        intents = self._records.intents()
        for collection, doc_id in intents:
            log.info("repairing %r in %r after an interrupted write", doc_id, collection.name)
            try:
                self.repair(collection, [doc_id])
            except MissingVectors:
                pass  # its Chroma collection is gone; nothing left there to repair
            with self._records.transaction() as tx:
                self._records.clear_intents(tx, collection.id, [doc_id])
        return len(intents)


def _context(metadata: Metadata, title_key: str | None) -> str:
    """What is embedded before each chunk of a document: its title line, so a chunk deep in a
    page about `sort` is still about sort (all-MiniLM-L6-v2 sees one chunk at a time)."""
    title = metadata.get(title_key) if title_key else None
    return f"{title.strip()}\n" if isinstance(title, str) and title.strip() else ""


def _chunk_metadata(publication: Publication, chunk: Chunk) -> dict:
    # The document's metadata, numbers as floats (see filters.py: Chroma's int-vs-float
    # comparisons truncate), plus lorag's reserved fields. Hits read metadata from SQLite.
    return {
        **{key: as_float(value) for key, value in publication.metadata.items()},
        "_doc_id": publication.doc_id,
        "_version": publication.version,
        "_idx": chunk.index,
        "_start": chunk.start,
        "_end": chunk.end,
    }
