"""Versioned documents → chunks → embeddings in Chroma and text in SQLite, BM25 in memory; hybrid search.

Imports nothing of lorag's and nothing of FastAPI: the service and training both use it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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

# Resolved on first use: importing one light module (knowledge.prompting, knowledge.parsing)
# does not load torch, tokenizers and Chroma with the whole base.
_HOMES = {
    "Chunk": "knowledge.chunking",
    "Chunker": "knowledge.chunking",
    "CollectionInfo": "knowledge.documents",
    "Document": "knowledge.documents",
    "DocumentInfo": "knowledge.documents",
    "DocumentInput": "knowledge.documents",
    "WriteResult": "knowledge.documents",
    "Embedder": "knowledge.embedding",
    "Hit": "knowledge.search",
    "KnowledgeBase": "knowledge.base",
    "KnowledgeSettings": "knowledge.settings",
    "SearchResult": "knowledge.search",
    "SearchTimings": "knowledge.search",
    **{name: "knowledge.errors" for name in (
        "CollectionExists", "CollectionNotFound", "DocumentNotFound", "InvalidCollectionName",
        "InvalidDocument", "InvalidFilter", "InvalidQuery", "KnowledgeError",
    )},
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module 'knowledge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
