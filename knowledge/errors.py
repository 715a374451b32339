"""Errors the knowledge base raises for things a caller did; each message says what to fix.

The service maps them to its error envelope (not-found errors to 404, conflicts to 409, the
rest to 400); anything else escaping this package is a fault of ours or of a backing store.
"""

from __future__ import annotations


class KnowledgeError(Exception):
    """Base of every caller-facing knowledge error."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class CollectionNotFound(KnowledgeError):
    def __init__(self, name: str):
        super().__init__(f"collection {name!r} does not exist; create it first or check the name")
        self.name = name


class CollectionExists(KnowledgeError):
    def __init__(self, name: str):
        super().__init__(f"collection {name!r} already exists; pick another name or delete it first")
        self.name = name


class InvalidCollectionName(KnowledgeError):
    def __init__(self, name: object, why: str):
        super().__init__(f"invalid collection name {name!r}: {why}")
        self.name = name
        self.why = why


class DocumentNotFound(KnowledgeError):
    def __init__(self, collection: str, doc_id: str):
        super().__init__(f"document {doc_id!r} does not exist in collection {collection!r}")
        self.collection = collection
        self.doc_id = doc_id


class InvalidDocument(KnowledgeError):
    """Bad text, doc_id or metadata of a document being written."""


class InvalidFilter(KnowledgeError):
    """A metadata filter outside the supported subset of Chroma's `where` language."""


class InvalidQuery(KnowledgeError):
    """Bad search or listing arguments: empty query, top_k out of range, unknown mode, bad cursor."""


class InvalidChunking(KnowledgeError):
    """Chunking settings a collection cannot use (size past the embedder's window, overlap not below size, ...)."""


class ReindexRequired(KnowledgeError):
    """The collection's vectors come from another embedder than the one this service runs."""

    def __init__(self, name: str, recorded: str, current: str):
        super().__init__(
            f"collection {name!r} was embedded with {recorded}, and this service embeds with {current}; "
            f"run `lorag docs reindex {name}` to embed it again (keyword search works meanwhile)"
        )
        self.name = name


class ReindexRunning(KnowledgeError):
    def __init__(self, name: str):
        super().__init__(f"collection {name!r} is already being reindexed; wait for it to finish (GET the collection)")
        self.name = name


class ReindexInterrupted(KnowledgeError):
    """A reindex stopped before its cut-over (the service is stopping): the old index serves on."""

    def __init__(self, name: str):
        super().__init__(f"the reindex of {name!r} stopped before its cut-over; run it again to resume")
        self.name = name


class StoreUnavailable(KnowledgeError):
    """A backing store (a Chroma server) did not answer; nothing was changed, and retrying later can succeed."""

    def __init__(self, what: str, why: object):
        super().__init__(f"the knowledge base's {what} is not reachable ({why}); retry shortly")
