"""Collections and versioned documents against real Chroma (embedded and server) and SQLite."""

from __future__ import annotations

import pytest

from knowledge import (
    CollectionExists,
    CollectionNotFound,
    DocumentInput,
    DocumentNotFound,
    InvalidCollectionName,
    InvalidDocument,
    InvalidQuery,
    KnowledgeBase,
    WriteResult,
)
from tests.knowledge.inspection import chroma_chunks, chroma_name, chunk_rows, keyword_matches

LONG = " ".join(f"Paragraph {i} talks about lighthouse keepers and their lamps." for i in range(60))


def test_collections_lifecycle(kb: KnowledgeBase):
    created = kb.create_collection("manuals", {"owner": "ops", "tier": 2})
    assert (created.name, created.metadata, created.documents) == ("manuals", {"owner": "ops", "tier": 2}, 0)
    kb.create_collection("faq")
    with pytest.raises(CollectionExists):
        kb.create_collection("faq")
    assert [c.name for c in kb.list_collections()] == ["faq", "manuals"]
    kb.put_document("faq", "q1", "How do I reset my password?")
    assert kb.get_collection("faq").documents == 1

    name = chroma_name(kb, "faq")
    kb.delete_collection("faq")
    assert [c.name for c in kb.list_collections()] == ["manuals"]
    assert name not in [c.name for c in kb.vectors.client.list_collections()]
    for call in (lambda: kb.get_collection("faq"), lambda: kb.delete_collection("faq"),
                 lambda: kb.put_document("faq", "q1", "text"), lambda: kb.search("faq", "password")):
        with pytest.raises(CollectionNotFound):
            call()
    # The name is free again and the new collection starts empty.
    kb.create_collection("faq")
    assert kb.search("faq", "password").hits == []


@pytest.mark.parametrize("name", ["ab", "Docs", "-docs", "a" * 64, "with space", "ünï", "", None, "a/b"])
def test_collection_names_are_checked(kb: KnowledgeBase, name):
    with pytest.raises(InvalidCollectionName, match="3 to 63 characters"):
        kb.create_collection(name)


def test_put_get_list_delete(kb: KnowledgeBase):
    kb.create_collection("docs")
    result = kb.put_document("docs", "guide", LONG, {"lang": "en", "year": 2024, "draft": False, "score": 0.5})
    assert result.status == "created" and result.version == 1 and result.chunks > 1
    doc = kb.get_document("docs", "guide")
    assert (doc.text, doc.version, doc.chunks) == (LONG, 1, result.chunks)
    assert doc.metadata == {"lang": "en", "year": 2024, "draft": False, "score": 0.5}
    assert len(doc.content_hash) == 64 and doc.created_at == doc.updated_at

    for i in range(5):
        kb.put_document("docs", f"note-{i}", f"Short note number {i}.")
    page, cursor = kb.list_documents("docs", limit=4)
    assert [d.doc_id for d in page] == ["guide", "note-0", "note-1", "note-2"]
    page, cursor = kb.list_documents("docs", limit=4, after=cursor)
    assert [d.doc_id for d in page] == ["note-3", "note-4"] and cursor is None

    kb.delete_document("docs", "guide")
    with pytest.raises(DocumentNotFound):
        kb.get_document("docs", "guide")
    with pytest.raises(DocumentNotFound):
        kb.delete_document("docs", "guide")
    assert chroma_chunks(kb, "docs", "guide") == []
    assert chunk_rows(kb, "docs", "guide") == []
    assert keyword_matches(kb, "docs", "lighthouse") == []
    assert all(hit.doc_id != "guide" for hit in kb.search("docs", "lighthouse keepers", top_k=10).hits)


def test_identical_content_is_unchanged_and_metadata_counts(kb: KnowledgeBase):
    kb.create_collection("docs")
    first = kb.put_document("docs", "a", "Alpha text.", {"k": 1})
    again = kb.put_document("docs", "a", "Alpha text.", {"k": 1})
    assert again == WriteResult("a", 1, "unchanged", first.chunks)
    assert kb.get_document("docs", "a").updated_at == kb.get_document("docs", "a").created_at
    # Same text, other metadata: a new version (filters must see the new metadata).
    assert kb.put_document("docs", "a", "Alpha text.", {"k": 2}).version == 2
    assert kb.put_document("docs", "a", "Alpha text.", {"k": True}).version == 3


def test_new_version_replaces_every_old_chunk(kb: KnowledgeBase):
    kb.create_collection("docs")
    v1 = kb.put_document("docs", "d", LONG)
    assert v1.chunks >= 3
    assert chroma_chunks(kb, "docs", "d") == [("d", 1, i) for i in range(v1.chunks)]

    # Shrinks to one chunk with other words: no tail of version 1 may survive anywhere.
    v2 = kb.put_document("docs", "d", "Now it is about submarine navigation.")
    assert (v2.status, v2.version, v2.chunks) == ("updated", 2, 1)
    assert chroma_chunks(kb, "docs", "d") == [("d", 2, 0)]
    assert chunk_rows(kb, "docs", "d") == [(2, 0)]
    assert keyword_matches(kb, "docs", "lighthouse") == []
    assert keyword_matches(kb, "docs", "submarine") == [("d", 2)]
    hits = kb.search("docs", "lighthouse keepers lamps", top_k=10, mode="dense").hits
    assert [(h.doc_id, h.version) for h in hits] == [("d", 2)]

    # Grows back: version 3, all of its chunks, nothing of version 2.
    v3 = kb.put_document("docs", "d", LONG + " The end.")
    assert chroma_chunks(kb, "docs", "d") == [("d", 3, i) for i in range(v3.chunks)]
    assert {v for v, _ in chunk_rows(kb, "docs", "d")} == {3}


def test_read_your_writes(kb: KnowledgeBase):
    kb.create_collection("docs")
    for version in range(1, 4):
        kb.put_document("docs", "news", f"Breaking: the harbour reopened on day {version} of the storm.")
        for mode in ("dense", "keyword", "hybrid"):
            hits = kb.search("docs", "harbour reopened storm", mode=mode).hits
            assert [(h.doc_id, h.version) for h in hits] == [("news", version)]
            assert f"day {version}" in hits[0].text


@pytest.mark.parametrize(
    ("doc_id", "text", "metadata", "message"),
    [
        ("d", "", None, "empty"),
        ("d", " \n\t ", None, "empty"),
        ("d", "x" * 5001, None, "more than the limit of 5000"),
        ("d", "ok \x00", None, "NUL"),
        ("d", 42, None, "must be a string"),
        ("", "text", None, "doc_id"),
        ("a\nb", "text", None, "control"),
        ("x" * 257, "text", None, "doc_id"),
        ("d", "text", {"_doc_id": "x"}, "reserved"),
        ("d", "text", {"nested": {"a": 1}}, "nested"),
        ("d", "text", {"none": None}, "null"),
        ("d", "text", {"list": [1, 2]}, "nested"),
        ("d", "text", {"nan": float("nan")}, "finite"),
        ("d", "text", {"big": 2**70}, "64-bit"),
        ("d", "text", {'quo"te': 1}, "not allowed"),
        ("d", "text", ["not", "a", "dict"], "must be an object"),
    ],
)
def test_invalid_documents_are_refused(make_settings, embedder, doc_id, text, metadata, message):
    with KnowledgeBase(make_settings(max_document_chars=5000), embedder=embedder) as kb:
        kb.create_collection("docs")
        with pytest.raises(InvalidDocument, match=message):
            kb.put_document("docs", doc_id, text, metadata)
        assert kb.list_documents("docs") == ([], None)


def test_bulk_write_reports_each_item(kb: KnowledgeBase):
    kb.create_collection("docs")
    kb.put_document("docs", "same", "Unchanged body.")
    results = kb.put_documents(
        "docs",
        [
            DocumentInput("a", "First document about rivers."),
            DocumentInput("bad", "   "),
            DocumentInput("same", "Unchanged body."),
            DocumentInput("b", "Second document about mountains.", {"kind": "geo"}),
            DocumentInput("a", "A duplicate in the same batch."),
            "not a document",
        ],
    )
    assert [type(r).__name__ for r in results] == [
        "WriteResult", "InvalidDocument", "WriteResult", "WriteResult", "InvalidDocument", "InvalidDocument",
    ]
    assert (results[0].status, results[2].status, results[3].status) == ("created", "unchanged", "created")
    assert "more than once" in results[4].message
    assert kb.get_document("docs", "a").text == "First document about rivers."
    assert [h.doc_id for h in kb.search("docs", "mountains", top_k=1).hits] == ["b"]


def test_listing_arguments_are_checked(kb: KnowledgeBase):
    kb.create_collection("docs")
    for limit in (0, 1001, "10", True):
        with pytest.raises(InvalidQuery, match="limit"):
            kb.list_documents("docs", limit=limit)
