"""Chunk vectors in Chroma: embedded (PersistentClient) or a `chroma run` server (HttpClient).

lorag computes every embedding itself, so collections are created without an embedding
function and every write passes its vectors. Collection names and configuration are ours:
nothing from a caller reaches Chroma except ids, vectors and validated metadata.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import chromadb
import httpx
import numpy as np
from chromadb.config import Settings as ChromaSettings
from chromadb.errors import ChromaError, NotFoundError

from knowledge.errors import StoreUnavailable
from knowledge.settings import KnowledgeSettings

# Cosine distance on L2-normalised vectors: similarity = 1 - distance.
CONFIGURATION = {"hnsw": {"space": "cosine"}}


class MissingVectors(LookupError):
    """The Chroma collection is gone (deleted while an operation was under way)."""


@dataclass(frozen=True)
class VectorHit:
    doc_id: str
    version: int
    index: int
    distance: float


@contextmanager
def _reachable() -> Iterator[None]:
    """A `chroma run` server that is down or cut off is the store's outage, not a fault of ours."""
    try:
        yield
    except httpx.TransportError as exc:
        raise StoreUnavailable("Chroma server", exc) from None


def chunk_id(doc_id: str, version: int, index: int) -> str:
    # \x1f (unit separator) cannot occur in a doc_id (printable only), so ids never collide.
    return f"{doc_id}\x1f{version}\x1f{index}"


def _chunk_key(cid: str) -> tuple[str, int, int]:
    """chunk_id's inverse: (doc_id, version, index)."""
    doc_id, version, index = cid.rsplit("\x1f", 2)
    return doc_id, int(version), int(index)


class VectorStore:
    def __init__(self, settings: KnowledgeSettings):
        chroma_settings = ChromaSettings(anonymized_telemetry=False)
        if settings.chroma_url:
            url = urlsplit(settings.chroma_url)
            self._client = chromadb.HttpClient(
                host=url.hostname,
                port=url.port or (443 if url.scheme == "https" else 80),
                ssl=url.scheme == "https",
                settings=chroma_settings,
            )
        else:
            settings.chroma_path.mkdir(parents=True, exist_ok=True)
            self._client = chromadb.PersistentClient(path=str(settings.chroma_path), settings=chroma_settings)
        self._batch = min(self._client.get_max_batch_size(), 2048)
        self._collections: dict[str, chromadb.Collection] = {}
        self._lock = threading.Lock()

    @property
    def client(self) -> chromadb.ClientAPI:
        return self._client

    def close(self) -> None:
        self._collections.clear()
        self._client.close()

    def collection(self, name: str) -> chromadb.Collection:
        with self._lock:
            found = self._collections.get(name)
        if found is not None:
            return found
        try:
            with _reachable():
                found = self._client.get_collection(name, embedding_function=None)
        except NotFoundError:
            raise MissingVectors(name) from None
        with self._lock:
            return self._collections.setdefault(name, found)

    def create(self, name: str) -> None:
        # A collection of this name can only be left over from a create that crashed before
        # its SQLite row committed: it holds nothing anyone acknowledged.
        self.drop(name)
        with _reachable():
            created = self._client.create_collection(name, configuration=CONFIGURATION, embedding_function=None)
        with self._lock:
            self._collections[name] = created

    def drop(self, name: str) -> None:
        with self._lock:
            self._collections.pop(name, None)
        try:
            with _reachable():
                self._client.delete_collection(name)
        except NotFoundError:
            pass

    def names(self, prefix: str) -> list[str]:
        with _reachable():
            return [c.name for c in self._client.list_collections() if c.name.startswith(prefix)]

    def _call(self, name: str, method: str, **kwargs):
        try:
            with _reachable():
                return getattr(self.collection(name), method)(**kwargs)
        except ChromaError as exc:
            # A `chroma run` server deleting the collection under a call does not always answer
            # NotFound: an internal error ("Nothing found on disk") or a 412 ("Missing metadata
            # segment") come back too, depending on where the delete caught the call. Which one
            # is the server's race, not ours to list, so ask whether the collection still exists.
            if not isinstance(exc, NotFoundError) and self._exists(name):
                raise
            with self._lock:
                self._collections.pop(name, None)
            raise MissingVectors(name) from None

    def _exists(self, name: str) -> bool:
        try:
            with _reachable():
                self._client.get_collection(name, embedding_function=None)
        except NotFoundError:
            return False
        return True

    def upsert(self, name: str, ids: Sequence[str], embeddings: np.ndarray, metadatas: Sequence[dict]) -> None:
        for lo in range(0, len(ids), self._batch):
            hi = lo + self._batch
            self._call(
                name, "upsert", ids=list(ids[lo:hi]), embeddings=embeddings[lo:hi], metadatas=list(metadatas[lo:hi])
            )

    def delete_ids(self, name: str, ids: Sequence[str]) -> None:
        for lo in range(0, len(ids), self._batch):
            self._call(name, "delete", ids=list(ids[lo : lo + self._batch]))

    def delete_stale(self, name: str, doc_id: str, keep_version: int | None) -> None:
        """Delete every chunk of `doc_id` except those of `keep_version` (all of them if None)."""
        where: dict = {"_doc_id": doc_id}
        if keep_version is not None:
            where = {"$and": [where, {"_version": {"$ne": keep_version}}]}
        self._call(name, "delete", where=where)

    def query(self, name: str, embedding: np.ndarray, n: int, where: dict | None) -> list[VectorHit]:
        # The id alone names the chunk (see chunk_id): asking Chroma for metadata too made each
        # query four times dearer (2.1 ms against 0.5 ms), and chat pays this on every request.
        # A chunk deleted while the query ran belongs to a replaced version, which the caller's
        # visibility check drops.
        result = self._call(
            name, "query", query_embeddings=embedding.reshape(1, -1), n_results=n, where=where, include=["distances"]
        )
        return [
            VectorHit(*_chunk_key(cid), float(distance))
            for cid, distance in zip(result["ids"][0], result["distances"][0], strict=True)
        ]
