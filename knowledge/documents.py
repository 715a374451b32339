"""What collections and documents are: the value types callers see, and the rules their fields obey."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from knowledge.errors import InvalidCollectionName, InvalidDocument

if TYPE_CHECKING:
    from knowledge.chunking import Chunking
    from knowledge.reindexing import ReindexStatus

Scalar = str | int | float | bool
Metadata = dict[str, Scalar]

# Whose collections a caller sees: its API key's tenant, or this one when auth is off. Data
# stored before tenancy existed belongs to it.
DEFAULT_TENANT = "default"
COLLECTION_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{2,62}")
# Keys travel into Chroma metadata and into SQLite JSON paths ($."key"), so no quotes or `$`;
# a leading "_" is reserved for lorag's own chunk fields (_doc_id, _version, ...).
METADATA_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
MAX_DOC_ID_CHARS = 256
MAX_METADATA_KEYS = 64
MAX_METADATA_STRING_CHARS = 2048
INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    metadata: Metadata
    created_at: datetime
    documents: int
    chunking: Chunking
    reindex: ReindexStatus | None  # the last one this process ran, or one left interrupted


@dataclass(frozen=True)
class DocumentInput:
    """One document of a bulk write."""

    doc_id: str
    text: str
    metadata: Metadata | None = None


@dataclass(frozen=True)
class DocumentInfo:
    collection: str
    doc_id: str
    version: int
    content_hash: str
    metadata: Metadata
    chunks: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Document(DocumentInfo):
    text: str = ""


@dataclass(frozen=True)
class WriteResult:
    doc_id: str
    version: int
    status: Literal["created", "updated", "unchanged"]
    chunks: int


@dataclass(frozen=True)
class ValidDocument:
    """A document that passed every rule, with its content hash."""

    doc_id: str
    text: str
    metadata: Metadata
    content_hash: str = field(default="")


def check_collection_name(name: object) -> str:
    if not isinstance(name, str) or not COLLECTION_NAME.fullmatch(name):
        raise InvalidCollectionName(
            name,
            "use 3 to 63 characters of lowercase letters, digits, '_' or '-', starting with a letter or digit",
        )
    return name


def check_doc_id(doc_id: object) -> str:
    if not isinstance(doc_id, str) or not 1 <= len(doc_id) <= MAX_DOC_ID_CHARS:
        raise InvalidDocument(f"doc_id must be a string of 1 to {MAX_DOC_ID_CHARS} characters, got {doc_id!r:.80}")
    if not doc_id.isprintable():
        raise InvalidDocument(f"doc_id {doc_id!r:.80} contains control or non-printable characters; remove them")
    return doc_id


def check_text(text: object, max_chars: int) -> str:
    if not isinstance(text, str):
        raise InvalidDocument(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidDocument("text is empty or only whitespace; send the document's content")
    if len(text) > max_chars:
        raise InvalidDocument(
            f"text has {len(text)} characters, more than the limit of {max_chars} (LORAG_MAX_DOCUMENT_CHARS); "
            "split the document"
        )
    if "\x00" in text:
        raise InvalidDocument("text contains NUL characters; remove them")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidDocument(f"text is not valid Unicode (lone surrogate at {exc.start}); fix its encoding") from None
    return text


def check_metadata_key(key: object, where: str = "metadata") -> str:
    if not isinstance(key, str):
        raise InvalidDocument(f"{where} keys must be strings, got {key!r}")
    if key.startswith("_"):
        raise InvalidDocument(f"{where} key {key!r} starts with '_', which is reserved for lorag; rename it")
    if not METADATA_KEY.fullmatch(key):
        raise InvalidDocument(
            f"{where} key {key!r:.80} is not allowed: use 1 to 64 characters of letters, digits, '_', '.', ':' "
            "or '-', starting with a letter or digit"
        )
    return key


def check_scalar(value: object) -> bool:
    """Whether `value` is a JSON scalar Chroma can store and filter on."""
    if isinstance(value, bool | str):
        return True
    if isinstance(value, int):
        return INT64[0] <= value <= INT64[1]
    return isinstance(value, float) and math.isfinite(value)


def check_metadata(metadata: object, where: str = "metadata") -> Metadata:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidDocument(
            f"{where} must be an object of key → string/number/boolean, got {type(metadata).__name__}"
        )
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidDocument(f"{where} has {len(metadata)} keys, more than {MAX_METADATA_KEYS}; keep fewer")
    for key, value in metadata.items():
        check_metadata_key(key, where)
        if not check_scalar(value):
            raise InvalidDocument(
                f"{where}[{key!r}] must be a string, a finite number (64-bit for integers) or a boolean; "
                f"got {type(value).__name__} (nested values and null are not allowed)"
            )
        if isinstance(value, str) and len(value) > MAX_METADATA_STRING_CHARS:
            raise InvalidDocument(f"{where}[{key!r}] is longer than {MAX_METADATA_STRING_CHARS} characters")
    return dict(metadata)


def canonical_json(metadata: Metadata) -> str:
    return json.dumps(metadata, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def content_hash(text: str, metadata: Metadata) -> str:
    """sha256 over metadata and text: a rewrite with both identical is a no-op."""
    digest = hashlib.sha256(canonical_json(metadata).encode())
    digest.update(b"\x00")
    digest.update(text.encode())
    return digest.hexdigest()


def validate_document(doc_id: object, text: object, metadata: object, max_chars: int) -> ValidDocument:
    doc_id = check_doc_id(doc_id)
    text = check_text(text, max_chars)
    metadata = check_metadata(metadata)
    return ValidDocument(doc_id, text, metadata, content_hash(text, metadata))
