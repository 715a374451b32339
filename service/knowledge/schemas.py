"""Knowledge API shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Scalar = str | int | float | bool


class ChunkingIn(BaseModel):
    """How to cut and embed documents; a field left out keeps its current (or default) value."""

    model_config = ConfigDict(extra="forbid")

    size: int | None = Field(None, description="Largest chunk, in embedder tokens (8 to the embedder's window).")
    overlap: int | None = Field(None, description="Tokens shared by consecutive chunks; below size.")
    strategy: Literal["tokens"] | None = Field(None, description="tokens: windows cut where words start.")
    title_key: str | None = Field(
        None, description="Metadata key whose text is embedded before each chunk as context; \"\": none."
    )


class CollectionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="3 to 63 characters: lowercase letters, digits, '-' and '_', starting alphanumeric.")
    metadata: dict[str, Scalar] = Field(default_factory=dict)
    chunking: ChunkingIn | None = Field(None, description="Instead of the service's LORAG_CHUNK_* defaults.")


class ReindexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chunking: ChunkingIn | None = Field(None, description="Changes to the collection's chunking; none: rebuild as is.")


class ChunkingOut(BaseModel):
    size: int
    overlap: int
    strategy: str
    title_key: str | None
    embedder: str = Field(description="The model whose vectors the collection holds: name, size, weights hash.")


class ReindexOut(BaseModel):
    state: Literal["running", "done", "failed", "interrupted"] = Field(
        description="interrupted: stopped before its cut-over; the old index serves, and reindexing again resumes."
    )
    chunking: ChunkingOut = Field(description="What the collection is being (or was) rebuilt with.")
    documents: int = Field(description="Documents in the collection when the rebuild began.")
    copied: int = Field(description="Documents chunked and embedded again so far.")
    reused: int = Field(description="Documents a resumed rebuild had already done.")
    started_at: datetime
    finished_at: datetime | None
    error: str | None


class CollectionOut(BaseModel):
    object: Literal["collection"] = "collection"
    name: str
    metadata: dict[str, Any]
    created_at: datetime
    documents: int = Field(description="Documents in the collection.")
    chunking: ChunkingOut = Field(description="How its documents are cut and embedded.")
    reindex: ReindexOut | None = Field(
        description="The last reindex this service ran on it since it started, or one left interrupted; else null."
    )


class DocumentPut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="The document's full text; a changed text makes a new version.")
    metadata: dict[str, Scalar] = Field(
        default_factory=dict, description="Flat key → string/number/boolean; keys starting with '_' are reserved."
    )


class WriteResultOut(BaseModel):
    object: Literal["document.write"] = "document.write"
    doc_id: str
    version: int
    status: Literal["created", "updated", "unchanged"]
    chunks: int


class DocumentOut(BaseModel):
    object: Literal["document"] = "document"
    doc_id: str
    version: int
    content_hash: str
    metadata: dict[str, Any]
    text: str
    chunks: int
    created_at: datetime
    updated_at: datetime


class DocumentSummary(BaseModel):
    doc_id: str
    version: int
    content_hash: str
    metadata: dict[str, Any]
    chunks: int
    updated_at: datetime


class DocumentPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[DocumentSummary]
    next: str | None = Field(None, description="Pass as `after` for the next page; null on the last page.")


class BulkItemResult(BaseModel):
    line: int
    doc_id: str | None = None
    status: Literal["created", "updated", "unchanged", "failed"]
    version: int | None = None
    chunks: int | None = None
    error: str | None = None


class BulkResult(BaseModel):
    object: Literal["document.bulk"] = "document.bulk"
    results: list[BulkItemResult]
    summary: dict[str, int]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1)
    top_k: int = Field(5, ge=1, description="Hits to return (at most LORAG_MAX_TOP_K).")
    mode: Literal["hybrid", "dense", "keyword"] = "hybrid"
    filter: dict[str, Any] | None = Field(
        None, description='Metadata filter: {"field": value}, $eq/$ne/$gt/$gte/$lt/$lte/$in/$nin, $and/$or.'
    )


class SearchHit(BaseModel):
    chunk_id: str
    doc_id: str
    version: int
    index: int
    start: int
    end: int
    text: str
    score: float = Field(
        description="Higher is better. dense: cosine similarity; keyword: BM25; hybrid: the weighted sum of "
        "both lists' scores, each scaled to 0..1 over its candidates (0 to 1); with a reranker "
        "(LORAG_RERANKER_PATH): the reranker's score."
    )
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[SearchHit]
    timings_ms: dict[str, float]


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True
