"""Reindexing: a collection rebuilt with new chunking settings (or a new embedder) while it serves;
searches see the old index whole, then the new one whole; an interrupted reindex leaves the old
index serving and resumes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from knowledge import DocumentInput, Embedder, KnowledgeBase
from knowledge.database import Database
from knowledge.documents import DEFAULT_TENANT
from knowledge.errors import (
    CollectionNotFound,
    InvalidChunking,
    ReindexInterrupted,
    ReindexRequired,
    ReindexRunning,
)
from knowledge.reindexing import BATCH
from tests.knowledge.inspection import chroma_chunks, chunk_rows, keyword_matches, rows

OLD = {"size": 24, "overlap": 4}
NEW = {"size": 64, "overlap": 8}
DOCS = 2 * BATCH + 6  # three copy batches


def text(i: int, tag: str = "") -> str:
    return " ".join(f"Ledger {i}{tag} records shipment {j} of copper to harbour {i % 7}." for j in range(12))


def fill(kb: KnowledgeBase, name: str = "docs") -> None:
    kb.create_collection(name, chunking=OLD)
    results = kb.put_documents(name, [DocumentInput(f"d{i:02d}", text(i), {"title": f"Ledger {i}"}) for i in range(DOCS)])
    assert all(r.status == "created" for r in results)


def spans(kb: KnowledgeBase, chunking: dict, name: str = "docs") -> set[tuple]:
    """(doc_id, version, index, start, end) of every chunk the collection's documents have when cut by `chunking`."""
    chunker = kb._ingestion.chunker(kb.chunking.changed(**chunking))
    docs, _ = kb.list_documents(name, limit=1000)
    found = set()
    for doc in docs:
        for chunk in chunker.split(kb.get_document(name, doc.doc_id).text):
            found.add((doc.doc_id, doc.version, chunk.index, chunk.start, chunk.end))
    return found


def hit_spans(result) -> set[tuple]:
    return {(h.doc_id, h.version, h.index, h.start, h.end) for h in result.hits}


def chroma_names(kb: KnowledgeBase) -> set[str]:
    return set(kb.vectors.names(f"lorag-{kb.records.instance}-"))


def test_a_reindex_rebuilds_every_chunk_and_keeps_documents_as_they_were(kb: KnowledgeBase):
    fill(kb)
    before = {d.doc_id: d for d in kb.list_documents("docs", limit=1000)[0]}
    old_names = chroma_names(kb)
    assert kb.get_collection("docs").chunking.size == 24

    status = kb.reindex("docs", NEW).run()

    assert (status.state, status.documents, status.copied, status.reused) == ("done", DOCS, DOCS, 0)
    info = kb.get_collection("docs")
    assert (info.chunking.size, info.chunking.overlap, info.documents) == (64, 8, DOCS)
    assert info.chunking.embedder == kb.embedder.identity and info.reindex == status
    after = {d.doc_id: d for d in kb.list_documents("docs", limit=1000)[0]}
    # Same versions, hashes, metadata and times: the text did not change, only its chunks.
    for doc_id, doc in before.items():
        assert (after[doc_id].version, after[doc_id].content_hash, after[doc_id].metadata) == (
            doc.version, doc.content_hash, doc.metadata)
        assert (after[doc_id].created_at, after[doc_id].updated_at) == (doc.created_at, doc.updated_at)
        assert after[doc_id].chunks < doc.chunks
    expected = spans(kb, NEW)
    assert {(d, v, i) for d, v, i, *_ in expected} == set(chroma_chunks(kb, "docs"))
    assert chunk_rows(kb, "docs", "d03") == [(1, i) for i in range(after["d03"].chunks)]
    # The old Chroma collection is gone; the new one is the only one left.
    assert len(chroma_names(kb)) == 1 and not chroma_names(kb) & old_names
    for mode in ("dense", "keyword", "hybrid"):
        hits = kb.search("docs", "Ledger 17 shipment copper", top_k=5, mode=mode)
        assert hit_spans(hits) <= expected and hits.hits[0].doc_id == "d17"
    # Writes go on with the new chunking.
    written = kb.put_document("docs", "late", text(99))
    assert written.chunks == len(kb._ingestion.chunker(kb.chunking.changed(**NEW)).split(text(99)))


def test_searches_during_a_reindex_see_the_old_index_or_the_new_one_never_a_mix(kb: KnowledgeBase):
    fill(kb)
    old, new = spans(kb, OLD), spans(kb, NEW)
    seen: list[list[str]] = [[], []]  # per searching thread: "old" or "new", search by search
    problems: list[str] = []
    done = threading.Event()

    def search(seen: list[str]) -> None:
        while not done.is_set():
            for mode in ("hybrid", "dense", "keyword"):
                got = hit_spans(kb.search("docs", "copper shipment harbour 3", top_k=8, mode=mode))
                if len(got) != 8:
                    problems.append(f"{mode}: {len(got)} hits")
                elif got <= old:
                    seen.append("old")
                elif got <= new:
                    seen.append("new")
                else:
                    problems.append(f"{mode}: a mix of both indexes: {sorted(got)}")

    searchers = [threading.Thread(target=search, args=(mine,)) for mine in seen]
    for thread in searchers:
        thread.start()
    try:
        status = kb.reindex("docs", NEW).run()
    finally:
        done.set()
        for thread in searchers:
            thread.join()
    assert status.state == "done" and not problems
    for mine in seen:  # both indexes answered, and once the new one had, the old one never again
        assert mine[0] == "old" and mine[-1] == "new"
        assert mine == sorted(mine, key=["old", "new"].index)


def test_writes_during_a_reindex_reach_the_new_index(kb: KnowledgeBase, monkeypatch: pytest.MonkeyPatch):
    fill(kb)
    copy = kb._ingestion.copy
    batches = []

    def copy_and_write(target, docs):  # while the copy runs, callers change the live collection
        copy(target, docs)
        batches.append(len(docs))
        if len(batches) == 1:
            kb.put_document("docs", "d00", text(0, "b"))  # already copied: must be copied again
            kb.put_document("docs", "fresh", text(50))  # new since the copy began
            kb.delete_document("docs", "d40")  # not copied yet
            kb.delete_document("docs", "d01")  # copied, then deleted

    monkeypatch.setattr(kb._ingestion, "copy", copy_and_write)
    status = kb.reindex("docs", NEW).run()
    assert status.state == "done" and status.copied == DOCS - 1 + 2  # d40 never; d00 twice; fresh
    docs = {d.doc_id: d.version for d in kb.list_documents("docs", limit=1000)[0]}
    assert docs["d00"] == 2 and docs["fresh"] == 1 and "d40" not in docs and "d01" not in docs
    assert set(chroma_chunks(kb, "docs")) == {(d, v, i) for d, v, i, *_ in spans(kb, NEW)}
    assert keyword_matches(kb, "docs", "0b") == [("d00", 2)]
    assert {(h.doc_id, h.version) for h in kb.search("docs", "0b", top_k=5, mode="keyword").hits} == {("d00", 2)}


class StopAfter:
    """A stop signal that fires at the n+1th look (the copy looks once per batch)."""

    def __init__(self, looks: int):
        self.looks = looks

    def is_set(self) -> bool:
        self.looks -= 1
        return self.looks < 0


def test_a_stopped_reindex_leaves_the_old_index_serving_and_resumes(make_settings, embedder: Embedder):
    settings = make_settings()
    with KnowledgeBase(settings, embedder=embedder) as kb:
        fill(kb)
        old = spans(kb, OLD)
        with pytest.raises(ReindexInterrupted):
            kb.reindex("docs", NEW).run(StopAfter(1))
        info = kb.get_collection("docs")
        assert info.chunking.size == 24 and info.reindex.state == "interrupted" and info.reindex.copied == BATCH
        assert hit_spans(kb.search("docs", "copper harbour", top_k=10)) <= old
        assert kb.put_document("docs", "d02", text(2, "b")).version == 2  # writes go on

    with KnowledgeBase(settings, embedder=embedder) as kb:  # a restart: the shadow is still there
        info = kb.get_collection("docs")
        assert info.reindex.state == "interrupted" and info.reindex.chunking.size == 64
        assert [c.name for c in kb.list_collections()] == ["docs"]
        status = kb.reindex("docs", NEW).run()
        # d00..d31 were copied before the stop; d02 changed since, so it is copied again.
        assert (status.reused, status.copied) == (BATCH - 1, DOCS - BATCH + 1)
        assert kb.get_collection("docs").chunking.size == 64
        assert set(chroma_chunks(kb, "docs")) == {(d, v, i) for d, v, i, *_ in spans(kb, NEW)}
        assert len(chroma_names(kb)) == 1


def test_a_reindex_with_other_settings_starts_over(kb: KnowledgeBase):
    fill(kb)
    with pytest.raises(ReindexInterrupted):
        kb.reindex("docs", NEW).run(StopAfter(1))
    status = kb.reindex("docs", {"size": 48, "overlap": 0}).run()
    assert (status.reused, status.copied) == (0, DOCS)
    assert set(chroma_chunks(kb, "docs")) == {(d, v, i) for d, v, i, *_ in spans(kb, {"size": 48, "overlap": 0})}
    assert len(chroma_names(kb)) == 1  # the abandoned shadow's Chroma collection went too


# A reindexing process, killed for real at a given point: "copy" (half-way through the copy,
# after a batch's vectors reached the shadow's Chroma collection and before its SQLite commit)
# or "cut" (after the cut-over committed, before the old index was deleted).
REINDEXER = textwrap.dedent(
    """
    import os, signal, sys
    from knowledge import KnowledgeBase, KnowledgeSettings
    home, point = sys.argv[1], sys.argv[2]
    kb = KnowledgeBase(KnowledgeSettings(_env_file=None, home=home))
    job = kb.reindex("docs", {"size": 64, "overlap": 8})
    upsert, calls = kb.vectors.upsert, []
    def upsert_then_die(name, *args):
        upsert(name, *args)
        calls.append(name)
        if point == "copy" and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    kb.vectors.upsert = upsert_then_die
    if point == "cut":
        job._retire = lambda: os.kill(os.getpid(), signal.SIGKILL)
    job.run()
    """
)


@pytest.mark.parametrize("chroma_mode", ["persistent"])
@pytest.mark.parametrize("point", ["copy", "cut"])
def test_sigkill_mid_reindex_leaves_one_whole_index(make_settings, embedder: Embedder, chroma_mode, point):
    settings = make_settings()
    with KnowledgeBase(settings, embedder=embedder) as kb:
        fill(kb)
        old = spans(kb, OLD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    child = subprocess.run(
        [sys.executable, "-c", REINDEXER, str(settings.home), point], capture_output=True, env=env, timeout=300
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]

    with KnowledgeBase(settings, embedder=embedder) as kb:
        info = kb.get_collection("docs")
        if point == "copy":
            assert kb.recovered == BATCH  # the shadow's half-written batch
            assert info.chunking.size == 24 and info.reindex.state == "interrupted"
            assert set(chroma_chunks(kb, "docs")) == {(d, v, i) for d, v, i, *_ in old}
            assert hit_spans(kb.search("docs", "copper harbour", top_k=10)) <= old
            status = kb.reindex("docs", NEW).run()
            assert (status.reused, status.copied) == (BATCH, DOCS - BATCH)
        assert kb.get_collection("docs").chunking.size == 64
        new = spans(kb, NEW)
        assert set(chroma_chunks(kb, "docs")) == {(d, v, i) for d, v, i, *_ in new}
        assert hit_spans(kb.search("docs", "copper harbour", top_k=10)) <= new
        assert len(chroma_names(kb)) == 1  # the old index's Chroma collection was swept
        assert rows(kb, "SELECT COUNT(*) FROM chunks WHERE collection_id NOT IN (SELECT id FROM collections)") == [(0,)]


def test_a_collection_from_another_embedder_must_be_reindexed(make_settings, embedder: Embedder):
    settings = make_settings()
    with KnowledgeBase(settings, embedder=embedder) as kb:
        fill(kb)
    db = Database(settings.database)  # as if the service now ran another model
    for cid, chunking in db.execute("SELECT id, chunking FROM collections").fetchall():
        db.execute("UPDATE collections SET chunking = ? WHERE id = ?",
                   (json.dumps({**json.loads(chunking), "embedder": "other-model:384d:0"}), cid))
    db.close()
    with KnowledgeBase(settings, embedder=embedder) as reopened:
        for mode in ("dense", "hybrid"):
            with pytest.raises(ReindexRequired, match="lorag docs reindex docs"):
                reopened.search("docs", "copper", mode=mode)
        with pytest.raises(ReindexRequired):
            reopened.put_document("docs", "d00", text(0, "b"))
        assert reopened.search("docs", "Ledger 5 copper", mode="keyword").hits[0].doc_id == "d05"
        status = reopened.reindex("docs").run()  # no changes: the same chunking, this embedder
        assert status.copied == DOCS
        info = reopened.get_collection("docs")
        assert (info.chunking.size, info.chunking.embedder) == (24, embedder.identity)
        assert reopened.search("docs", "Ledger 5 copper", mode="dense").hits[0].doc_id == "d05"


BAD_CHUNKING = [
    ({"size": 4}, "from 8 to 254"),
    ({"size": 999}, "from 8 to 254"),
    ({"overlap": 300}, "from 0 to size - 1"),
    ({"overlap": -1}, "from 0 to size - 1"),
    ({"strategy": "paragraphs"}, "one of tokens"),
    ({"size": "64"}, "must be an integer"),
    ({"chunk_size": 64}, "unknown chunking field"),
]


@pytest.mark.parametrize("chroma_mode", ["persistent"])
def test_bad_chunking_is_refused_and_changes_nothing(kb: KnowledgeBase, chroma_mode):
    kb.create_collection("docs", chunking=OLD)
    kb.put_document("docs", "d00", text(0))
    for chunking, complaint in BAD_CHUNKING:
        with pytest.raises(InvalidChunking, match=complaint):
            kb.reindex("docs", chunking)
        with pytest.raises(InvalidChunking, match=complaint):
            kb.create_collection("other", chunking=chunking)
    assert [c.name for c in kb.list_collections()] == ["docs"]
    assert kb.get_collection("docs").reindex is None
    assert kb.reindex("docs", NEW).run().state == "done"  # the refused calls claimed nothing


def test_one_reindex_at_a_time_and_a_deleted_collection_ends_it(kb: KnowledgeBase):
    fill(kb)
    job = kb.reindex("docs", NEW)
    with pytest.raises(ReindexRunning):
        kb.reindex("docs", NEW)
    kb.delete_collection("docs")
    with pytest.raises(CollectionNotFound):
        kb.reindex("docs")
    kb.create_collection("docs")  # a namesake: the old collection's reindex is not its own
    assert kb.get_collection("docs").reindex is None
    with pytest.raises(CollectionNotFound):
        job.run()
    assert kb.get_collection("docs").reindex is None and kb.get_collection("docs").documents == 0
    assert len(chroma_names(kb)) == 1  # the shadow went with the old collection
    assert kb.reindex("docs").run().state == "done"
    with pytest.raises(CollectionNotFound):
        kb.reindex("never")


def test_a_collection_deleted_mid_copy_fails_its_reindex(kb: KnowledgeBase, monkeypatch: pytest.MonkeyPatch):
    fill(kb)
    copy = kb._ingestion.copy

    def copy_then_delete(target, docs):
        copy(target, docs)
        kb.delete_collection("docs")

    monkeypatch.setattr(kb._ingestion, "copy", copy_then_delete)
    with pytest.raises(CollectionNotFound, match="'docs'"):
        kb.reindex("docs", NEW).run()
    assert chroma_names(kb) == set() and kb.list_collections() == []


@pytest.mark.parametrize("chroma_mode", ["persistent"])  # an older lorag's store: SQLite only
def test_a_store_from_before_chunking_was_recorded_records_the_settings_in_force(make_settings, embedder: Embedder,
                                                                                 chroma_mode):
    settings = make_settings(chunk_tokens=32, chunk_overlap=6)
    with KnowledgeBase(settings, embedder=embedder) as kb:
        kb.create_collection("docs")
    with sqlite3.connect(settings.database_path) as conn:  # the columns an older lorag did not have
        conn.execute("ALTER TABLE collections DROP COLUMN chunking")
        conn.execute("ALTER TABLE collections DROP COLUMN reindex_of")
        conn.execute("DROP TABLE schema_migrations")  # nor did it record migrations
    with KnowledgeBase(settings, embedder=embedder) as kb:
        chunking = kb.get_collection("docs").chunking
        assert (chunking.size, chunking.overlap, chunking.title_key) == (32, 6, "title")
        assert kb.records.collection(DEFAULT_TENANT, "docs").chunking == kb.chunking
