"""Collections belong to tenants: a name resolves only inside the caller's tenant; stores made
before tenancy are migrated at open, their collections going to the default tenant."""

from __future__ import annotations

import sqlite3
import time

import pytest

from knowledge import CollectionExists, CollectionNotFound, DocumentInput, Embedder, KnowledgeBase
from knowledge.documents import DEFAULT_TENANT
from tests.knowledge.inspection import chroma_chunks

A, B = "tenant-a", "tenant-b"


def not_found_message(kb: KnowledgeBase, name: str) -> str:
    with pytest.raises(CollectionNotFound) as caught:
        kb.get_collection(name, tenant="nobody-has-this")
    return caught.value.message


def test_tenants_share_names_but_never_collections(kb: KnowledgeBase):
    kb.create_collection("contracts", {"owner": "a"}, tenant=A)
    kb.put_documents("contracts", [DocumentInput("lease", "The harbour lease runs until 2031 for tenant A."),
                                   DocumentInput("fees", "Mooring fees rise by four percent.")], tenant=A)
    kb.create_collection("only-a", tenant=A)
    with pytest.raises(CollectionExists):
        kb.create_collection("contracts", tenant=A)
    # The same name in B is another collection, empty until B writes to it.
    created = kb.create_collection("contracts", {"owner": "b"}, tenant=B)
    assert (created.name, created.metadata, created.documents) == ("contracts", {"owner": "b"}, 0)
    assert kb.search("contracts", "harbour lease", tenant=B).hits == []
    assert kb.list_documents("contracts", tenant=B) == ([], None)
    kb.put_document("contracts", "lease", "Tenant B leases a warehouse by the river.", tenant=B)

    assert [c.name for c in kb.list_collections(tenant=A)] == ["contracts", "only-a"]
    assert [(c.name, c.documents) for c in kb.list_collections(tenant=B)] == [("contracts", 1)]
    assert kb.list_collections() == []  # the default tenant has none
    assert kb.get_document("contracts", "lease", tenant=A).text.endswith("tenant A.")
    assert kb.get_document("contracts", "lease", tenant=B).text.endswith("the river.")
    for tenant, own in ((A, 2), (B, 1)):
        for mode in ("dense", "keyword", "hybrid"):
            hits = kb.search("contracts", "lease harbour warehouse fees", top_k=5, mode=mode, tenant=tenant).hits
            assert len(hits) == own and all(("tenant A" in h.text or "Mooring" in h.text) == (tenant == A)
                                            for h in hits), (tenant, mode)

    # Another tenant's collection is exactly a missing one: same error, same message.
    message = not_found_message(kb, "only-a")
    calls = {
        "get_collection": lambda: kb.get_collection("only-a", tenant=B),
        "delete_collection": lambda: kb.delete_collection("only-a", tenant=B),
        "put_document": lambda: kb.put_document("only-a", "x", "text", tenant=B),
        "put_documents": lambda: kb.put_documents("only-a", [DocumentInput("x", "text")], tenant=B),
        "get_document": lambda: kb.get_document("only-a", "x", tenant=B),
        "list_documents": lambda: kb.list_documents("only-a", tenant=B),
        "delete_document": lambda: kb.delete_document("only-a", "x", tenant=B),
        "search": lambda: kb.search("only-a", "harbour", tenant=B),
    }
    for what, call in calls.items():
        with pytest.raises(CollectionNotFound) as caught:
            call()
        assert caught.value.message == message, what

    # Deleting in one tenant leaves the other's same-named collection whole.
    kb.delete_document("contracts", "lease", tenant=B)
    assert kb.get_document("contracts", "lease", tenant=A).version == 1
    kb.delete_collection("contracts", tenant=B)
    assert [c.name for c in kb.list_collections(tenant=B)] == []
    assert kb.get_collection("contracts", tenant=A).documents == 2
    assert [h.doc_id for h in kb.search("contracts", "harbour lease", top_k=1, tenant=A).hits] == ["lease"]
    kb.delete_collection("contracts", tenant=A)
    assert [c.name for c in kb.list_collections(tenant=A)] == ["only-a"]


# The collections table as the code before tenancy created it (the other tables did not change).
OLD_COLLECTIONS = """CREATE TABLE collections_old (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: names the Chroma collection
    name TEXT NOT NULL UNIQUE,
    chroma_name TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL
)"""


def make_pre_tenancy(path) -> None:
    """Turn a store back into the shape the code before tenancy left, keeping every row and id."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        (seq,) = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'collections'").fetchone()
        conn.execute("BEGIN")
        conn.execute(OLD_COLLECTIONS)
        conn.execute("INSERT INTO collections_old SELECT id, name, chroma_name, metadata, created_at FROM collections")
        conn.execute("DROP TABLE collections")
        conn.execute("ALTER TABLE collections_old RENAME TO collections")
        conn.execute("DELETE FROM sqlite_sequence WHERE name = 'collections'")
        conn.execute("INSERT INTO sqlite_sequence VALUES ('collections', ?)", (seq,))
        conn.execute("DROP TABLE schema_migrations")  # that code recorded none
        conn.execute("COMMIT")
        columns = [row[1] for row in conn.execute("PRAGMA table_info(collections)")]
        assert "tenant" not in columns
    finally:
        conn.close()


@pytest.mark.parametrize("chroma_mode", ["persistent"])  # an older lorag's store: SQLite only
def test_a_store_from_before_tenancy_opens_with_everything_in_the_default_tenant(make_settings, embedder: Embedder,
                                                                                 chroma_mode):
    settings = make_settings()
    with KnowledgeBase(settings, embedder=embedder) as kb:
        kb.create_collection("manuals", {"owner": "ops"})
        kb.put_documents("manuals", [DocumentInput("pump", "The bilge pump runs every hour.", {"deck": 2}),
                                     DocumentInput("lamp", "Replace the lighthouse lamp in spring.")])
        kb.create_collection("faq")
        kb.put_document("faq", "q1", "How do I reset my password?")
        kb.create_collection("gone")  # the highest id, deleted: it must not be handed out again
        gone = kb.records.collection(DEFAULT_TENANT, "gone").id
        kb.delete_collection("gone")
        cid = kb.records.collection(DEFAULT_TENANT, "manuals").id
        with kb.records.transaction() as tx:  # a write cut short, for the open to repair
            kb.records.add_intents(tx, cid, ["pump"], time.time())
    make_pre_tenancy(settings.database_path)

    with KnowledgeBase(settings, embedder=embedder) as kb:
        assert kb.recovered == 1
        listed = {c.name: (c.metadata, c.documents) for c in kb.list_collections()}
        assert listed == {"manuals": ({"owner": "ops"}, 2), "faq": ({}, 1)}
        doc = kb.get_document("manuals", "pump")
        assert (doc.text, doc.metadata, doc.version) == ("The bilge pump runs every hour.", {"deck": 2}, 1)
        for mode in ("dense", "keyword", "hybrid"):
            assert [h.doc_id for h in kb.search("manuals", "bilge pump", top_k=1, mode=mode).hits] == ["pump"]
        assert chroma_chunks(kb, "manuals") == [("lamp", 1, 0), ("pump", 1, 0)]
        assert kb.list_collections(tenant=A) == []
        with pytest.raises(CollectionNotFound):
            kb.get_collection("manuals", tenant=A)
        # Writes work as before, names are now unique per tenant, and ids are never reused.
        assert kb.put_document("manuals", "pump", "The bilge pump runs twice an hour.").version == 2
        kb.create_collection("manuals", tenant=A)
        with pytest.raises(CollectionExists):
            kb.create_collection("manuals")
        assert kb.records.collection(A, "manuals").id == gone + 1
        kb.delete_collection("faq")  # the documents' foreign key still points at collections
    with sqlite3.connect(settings.database_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM documents WHERE doc_id = 'q1'").fetchone() == (0,)
        assert conn.execute("PRAGMA foreign_key_list(documents)").fetchone()[2] == "collections"
        assert conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'collections_%'").fetchall() == []

    with KnowledgeBase(settings, embedder=embedder) as kb:  # a second open has nothing to migrate
        assert [c.name for c in kb.list_collections()] == ["manuals"]
        assert kb.get_document("manuals", "pump").version == 2
