"""Look at what the stores hold, bypassing the knowledge base's search: Chroma's collection, the
SQL rows (SQLite or PostgreSQL) and the in-memory keyword index. Collections are the default tenant's."""

from __future__ import annotations

from knowledge import KnowledgeBase
from knowledge.database import Database
from knowledge.documents import DEFAULT_TENANT
from knowledge.keywords import query_terms


def chroma_name(kb: KnowledgeBase, collection: str) -> str:
    return kb.records.collection(DEFAULT_TENANT, collection).chroma_name


def chroma_chunks(kb: KnowledgeBase, collection: str, doc_id: str | None = None) -> list[tuple[str, int, int]]:
    """(doc_id, version, index) of every chunk Chroma holds for the document (or the collection)."""
    col = kb.vectors.client.get_collection(chroma_name(kb, collection))
    got = col.get(where={"_doc_id": doc_id} if doc_id else None, include=["metadatas"])
    return sorted((m["_doc_id"], m["_version"], m["_idx"]) for m in got["metadatas"])


def rows(kb: KnowledgeBase, sql: str, params: tuple = ()) -> list[tuple]:
    """What a query over the knowledge base's own database returns, on a connection of its own."""
    db = Database(kb.settings.database)
    try:
        return [tuple(r) for r in db.execute(sql, params).fetchall()]
    finally:
        db.close()


def chunk_rows(kb: KnowledgeBase, collection: str, doc_id: str) -> list[tuple[int, int]]:
    """(version, index) of the document's chunk rows."""
    return rows(kb, "SELECT version, idx FROM chunks c JOIN collections k ON k.id = c.collection_id"
                " WHERE k.tenant = ? AND k.name = ? AND c.doc_id = ? ORDER BY version, idx",
                (DEFAULT_TENANT, collection, doc_id))


def keyword_matches(kb: KnowledgeBase, collection: str, words: str) -> list[tuple[str, int]]:
    """(doc_id, version) of every chunk in the keyword index holding any of the words;
    (None, None): an index entry whose chunk row is gone."""
    index = kb.records.keywords(kb.records.collection(DEFAULT_TENANT, collection).id)
    ids, _ = index.rank(query_terms(words)).top(len(index) + 1)
    marks = ", ".join("?" * len(ids)) or "NULL"
    found = {row_id: (doc_id, version) for row_id, doc_id, version in
             rows(kb, f"SELECT id, doc_id, version FROM chunks WHERE id IN ({marks})", tuple(int(i) for i in ids))}
    return sorted({found.get(i, (None, None)) for i in ids}, key=repr)
