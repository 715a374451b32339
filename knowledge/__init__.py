"""Versioned documents → chunks → embeddings in Chroma and text in SQLite, BM25 in memory; hybrid search.

Imports nothing of lorag's and nothing of FastAPI: the service and training both use it.
"""

from knowledge.base import KnowledgeBase
from knowledge.chunking import Chunk, Chunker
from knowledge.documents import CollectionInfo, Document, DocumentInfo, DocumentInput, WriteResult
from knowledge.embedding import Embedder
from knowledge.errors import (
    CollectionExists,
    CollectionNotFound,
    DocumentNotFound,
    InvalidCollectionName,
    InvalidDocument,
    InvalidFilter,
    InvalidQuery,
    KnowledgeError,
)
from knowledge.search import Hit, SearchResult, SearchTimings
from knowledge.settings import KnowledgeSettings

__all__ = [
    "Chunk",
    "Chunker",
    "CollectionExists",
    "CollectionInfo",
    "CollectionNotFound",
    "Document",
    "DocumentInfo",
    "DocumentInput",
    "DocumentNotFound",
    "Embedder",
    "Hit",
    "InvalidCollectionName",
    "InvalidDocument",
    "InvalidFilter",
    "InvalidQuery",
    "KnowledgeBase",
    "KnowledgeError",
    "KnowledgeSettings",
    "SearchResult",
    "SearchTimings",
    "WriteResult",
]
