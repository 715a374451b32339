"""Knowledge settings, from `LORAG_*` variables; built by the caller and passed in."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_home() -> Path:
    """$XDG_DATA_HOME/lorag (else ~/.local/share/lorag): one data directory whatever the working
    directory, so the service and `lorag keys` run from anywhere find the same store."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "lorag"


class KnowledgeSettings(BaseSettings):
    """Where the knowledge base keeps its data, and how it chunks and embeds documents."""

    # extra="ignore": the service's own LORAG_* variables share the prefix.
    model_config = SettingsConfigDict(env_prefix="LORAG_", extra="ignore", protected_namespaces=())

    home: Path = Field(
        default_factory=default_home,
        description="Data directory: Chroma under home/chroma, the document table in home/knowledge.db.",
    )
    chroma_url: str | None = Field(
        None,
        description="URL of a `chroma run` server (e.g. http://127.0.0.1:8001); unset: embedded Chroma under home.",
    )
    database_url: str | None = Field(
        None,
        description="PostgreSQL URL (postgresql://USER:PASSWORD@HOST:PORT/NAME) shared by every gateway: documents, "
        "versions and chunk text, the adapter registry and API keys; unset: SQLite files under home.",
    )
    embedder_path: Path | None = Field(
        None,
        description="sentence-transformers model directory; unset: the packaged all-MiniLM-L6-v2 weights. "
        "Collections embedded with another model need `lorag docs reindex`.",
    )
    embedder_device: str = Field("cpu", description="torch device the embedder runs on ('cpu', 'cuda', ...).")
    # 240 of all-MiniLM-L6-v2's 254: on bench.retrieval_bench's dev half, 240-token chunks put
    # the answer in the top 3 more often than 200 (0.85 against 0.77, hybrid), and leave
    # room for the title line embedded before each chunk.
    chunk_tokens: int = Field(240, ge=8, description="Largest chunk, in embedder tokens, for new collections.")
    chunk_overlap: int = Field(
        48, ge=0, description="Tokens shared by consecutive chunks, for new collections; below chunk_tokens."
    )
    embed_title_key: str | None = Field(
        "title",
        description="Metadata key whose text is embedded with each of the document's chunks, as context "
        "(the chunk's stored text is unchanged); empty: chunks are embedded alone. The default for new collections.",
    )
    # 0.6: chosen on bench.retrieval_bench's dev half (0.3 to 0.7 tried).
    hybrid_dense_weight: float = Field(
        0.6, ge=0, le=1,
        description="Weight of the dense scores in hybrid search (keyword scores get the rest); "
        "each list's scores are scaled to 0..1 before they are added.",
    )
    reranker_path: Path | None = Field(
        None,
        description="sentence-transformers CrossEncoder directory that reorders each search's best candidates; "
        "unset: no reranking (none is packaged).",
    )
    rerank_depth: int = Field(20, ge=1, le=1000, description="Candidates the reranker reads per search.")
    embed_batch_size: int = Field(64, ge=1, description="Texts per embedder forward pass.")
    max_document_chars: int = Field(2_000_000, ge=1, description="Longest document text accepted, in characters.")
    max_top_k: int = Field(100, ge=1, le=1000, description="Most hits one search may ask for.")
    # A PDF is read by a child process under these limits; past them the upload is refused (422 or 400).
    pdf_timeout_s: float = Field(30, gt=0, description="Longest time reading one uploaded PDF may take, in seconds.")
    pdf_memory_mb: int = Field(
        512, ge=128, description="Memory (address space) the process that reads one PDF may use, in MiB."
    )
    pdf_max_pages: int = Field(2000, ge=1, description="Most pages in one uploaded PDF.")
    pdf_workers: int = Field(
        2, ge=1, description="PDFs read at once (each may use LORAG_PDF_MEMORY_MB); more uploads wait their turn."
    )

    @field_validator("embed_title_key")
    @classmethod
    def _check_title_key(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("chroma_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"chroma_url must look like http://host:port, got {value!r}")
        return value.strip().rstrip("/")

    @model_validator(mode="after")
    def _check_overlap(self) -> KnowledgeSettings:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_tokens ({self.chunk_tokens})"
            )
        return self

    @property
    def chroma_path(self) -> Path:
        return self.home / "chroma"

    @property
    def database_path(self) -> Path:
        return self.home / "knowledge.db"

    @property
    def database(self) -> str:
        """The URL the records live at: LORAG_DATABASE_URL, else the SQLite file under home."""
        return self.database_url or f"sqlite:///{self.database_path}"
