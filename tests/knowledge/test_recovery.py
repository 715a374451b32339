"""Crash safety: a write cut short at any step leaves, at the next open, every acknowledged
document intact and searchable, and no chunk of any other version anywhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from knowledge import Embedder, KnowledgeBase
from knowledge.documents import DEFAULT_TENANT
from knowledge.records import Publication
from knowledge.vectors import chunk_id
from tests.knowledge.inspection import chroma_chunks, chroma_name, chunk_rows, keyword_matches, rows

V1 = "The archive opens at nine. Visitors sign the ledger at the oak desk."
V2 = "The archive now opens at ten. Visitors scan a badge at the glass gate."


def intents(kb: KnowledgeBase) -> list[tuple]:
    return rows(kb, "SELECT collection_id, doc_id FROM intents")


def half_write(kb: KnowledgeBase, doc_id: str, text: str, version: int, *, flip: bool) -> None:
    """Do a write's steps by hand up to Chroma (flip=False) or up to the SQLite flip (flip=True),
    then stop, as a killed process would."""
    row = kb.records.collection(DEFAULT_TENANT, "docs")
    chunks = kb.chunker.split(text)
    with kb.records.transaction() as tx:
        kb.records.add_intents(tx, row.id, [doc_id], time.time())
    kb.vectors.upsert(
        row.chroma_name,
        [chunk_id(doc_id, version, c.index) for c in chunks],
        kb.embedder.encode([c.text for c in chunks]),
        [{"_doc_id": doc_id, "_version": version, "_idx": c.index, "_start": c.start, "_end": c.end} for c in chunks],
    )
    if flip:
        with kb.records.transaction() as tx:
            kb.records.publish(tx, row.id, [Publication(doc_id, version, "hash", {}, text, chunks)], time.time())


def test_crash_before_the_flip_keeps_the_acknowledged_version(make_settings, embedder: Embedder):
    settings = make_settings()
    with KnowledgeBase(settings, embedder=embedder) as kb:
        kb.create_collection("docs")
        kb.put_document("docs", "hours", V1)
        half_write(kb, "hours", V2, 2, flip=False)
        assert {v for _, v, _ in chroma_chunks(kb, "docs", "hours")} == {1, 2}

    with KnowledgeBase(settings, embedder=embedder) as kb:
        assert kb.recovered == 1 and intents(kb) == []
        assert chroma_chunks(kb, "docs", "hours") == [("hours", 1, 0)]
        assert kb.get_document("docs", "hours").version == 1
        for mode in ("dense", "keyword", "hybrid"):
            hits = kb.search("docs", "when does the archive open", mode=mode).hits
            assert [(h.doc_id, h.version, h.text) for h in hits] == [("hours", 1, V1)]
        # The interrupted version number is free again.
        assert kb.put_document("docs", "hours", V2).version == 2
        assert chroma_chunks(kb, "docs", "hours") == [("hours", 2, 0)]


def test_crash_after_the_flip_finishes_the_clean_up(make_settings, embedder: Embedder):
    settings = make_settings()
    with KnowledgeBase(settings, embedder=embedder) as kb:
        kb.create_collection("docs")
        kb.put_document("docs", "hours", V1)
        half_write(kb, "hours", V2, 2, flip=True)
        assert chunk_rows(kb, "docs", "hours") == [(1, 0), (2, 0)]

    with KnowledgeBase(settings, embedder=embedder) as kb:
        assert kb.recovered == 1 and intents(kb) == []
        assert chroma_chunks(kb, "docs", "hours") == [("hours", 2, 0)]
        assert chunk_rows(kb, "docs", "hours") == [(2, 0)]
        assert keyword_matches(kb, "docs", "ledger oak") == []
        hits = kb.search("docs", "archive opening hours badge", mode="hybrid").hits
        assert [(h.doc_id, h.version) for h in hits] == [("hours", 2)]


def test_crash_during_a_delete_removes_every_chunk(make_settings, embedder: Embedder):
    settings = make_settings()
    with KnowledgeBase(settings, embedder=embedder) as kb:
        kb.create_collection("docs")
        kb.put_document("docs", "gone", V1)
        kb.put_document("docs", "kept", V2)
        cid = kb.records.collection(DEFAULT_TENANT, "docs").id
        with kb.records.transaction() as tx:  # a delete's first step, then the crash
            kb.records.add_intents(tx, cid, ["gone"], time.time())
            kb.records.remove_document(tx, cid, "gone")

    with KnowledgeBase(settings, embedder=embedder) as kb:
        assert kb.recovered == 1
        assert chroma_chunks(kb, "docs") == [("kept", 1, 0)]
        assert chunk_rows(kb, "docs", "gone") == []
        assert [h.doc_id for h in kb.search("docs", "archive visitors", top_k=5).hits] == ["kept"]


def test_a_clean_open_has_nothing_to_repair_and_sweeps_only_its_own_orphans(make_settings, embedder: Embedder):
    settings = make_settings()
    with KnowledgeBase(settings, embedder=embedder) as kb:
        kb.create_collection("docs")
        kb.put_document("docs", "hours", V1)
        mine = f"lorag-{kb.records.instance}-999"  # as left by a create that crashed before its commit
        theirs = f"lorag-{'0' * 12}-{os.getpid()}"  # another store's, on a shared server
        kb.vectors.client.create_collection(mine, embedding_function=None)
        kb.vectors.client.get_or_create_collection(theirs, embedding_function=None)

    with KnowledgeBase(settings, embedder=embedder) as kb:
        assert kb.recovered == 0
        names = {c.name for c in kb.vectors.client.list_collections()}
        assert mine not in names and theirs in names and chroma_name(kb, "docs") in names
        kb.vectors.client.delete_collection(theirs)
        assert [h.doc_id for h in kb.search("docs", "archive").hits] == ["hours"]


# A writer process, killed for real: after two acknowledged rounds, its third bulk write
# stops (and is killed) right after the flip, with the replaced versions still everywhere.
WRITER = textwrap.dedent(
    """
    import sys, time
    from knowledge import DocumentInput, KnowledgeBase, KnowledgeSettings
    kb = KnowledgeBase(KnowledgeSettings(_env_file=None, home=sys.argv[1], chunk_tokens=24, chunk_overlap=4))
    kb.create_collection("crash")
    settle = kb.versions.settle
    def settle_then_stall(seq, collection_id=None, doc_ids=()):
        settle(seq, collection_id, doc_ids)
        if len(doc_ids) > 1 and round == 3:
            print("flipped bulk", round, flush=True)
            time.sleep(60)
    kb.versions.settle = settle_then_stall
    for round in range(1, 4):
        body = lambda name: " ".join(f"{name} round{round} entry {i} of the ship log." for i in range(3 + round % 4))
        result = kb.put_document("crash", "single", body("single"))
        print("ack single", result.version, flush=True)
        results = kb.put_documents("crash", [DocumentInput(f"bulk-{k}", body(f"bulk{k}")) for k in range(4)])
        print("ack bulk", results[0].version, flush=True)
    """
)


@pytest.mark.parametrize("chroma_mode", ["persistent"])
def test_sigkill_mid_write_loses_nothing_acknowledged(make_settings, embedder: Embedder, chroma_mode):
    settings = make_settings()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(settings.home)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    acked: dict[str, int] = {}
    try:
        for line in child.stdout:
            what, name, version = line.decode().split()
            if what == "flipped":
                break
            acked[name] = int(version)
        else:
            pytest.fail(f"the writer died: {child.stderr.read().decode()[-2000:]}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert acked == {"single": 3, "bulk": 2}

    with KnowledgeBase(settings, embedder=embedder) as kb:
        assert kb.recovered == 4  # the bulk write's documents
        assert intents(kb) == []
        docs, _ = kb.list_documents("crash")
        assert {d.doc_id: d.version for d in docs} == {"single": 3, **{f"bulk-{k}": 3 for k in range(4)}}
        for doc in docs:
            assert chroma_chunks(kb, "crash", doc.doc_id) == [(doc.doc_id, doc.version, i) for i in range(doc.chunks)]
            assert chunk_rows(kb, "crash", doc.doc_id) == [(doc.version, i) for i in range(doc.chunks)]
            text = kb.get_document("crash", doc.doc_id).text
            assert "round3" in text
            hits = kb.search("crash", text[:60], top_k=10, mode="hybrid").hits
            assert {h.version for h in hits if h.doc_id == doc.doc_id} == {doc.version}
        assert keyword_matches(kb, "crash", "round2") == []


class Outage(Exception):
    pass


def test_a_failed_write_leaves_the_old_version_serving(kb: KnowledgeBase, monkeypatch: pytest.MonkeyPatch):
    kb.create_collection("docs")
    kb.put_document("docs", "hours", V1)
    upsert = kb.vectors.upsert

    def upsert_then_fail(*args, **kwargs):  # the chunks land, then the connection drops
        upsert(*args, **kwargs)
        raise Outage

    monkeypatch.setattr(kb.vectors, "upsert", upsert_then_fail)
    with pytest.raises(Outage):
        kb.put_document("docs", "hours", V2 + " " + V2)
    monkeypatch.undo()
    assert chroma_chunks(kb, "docs", "hours") == [("hours", 1, 0)]
    assert intents(kb) == []
    assert [(h.version, h.text) for h in kb.search("docs", "archive opens").hits] == [(1, V1)]
    assert kb.put_document("docs", "hours", V2).version == 2


def test_a_failed_clean_up_is_finished_by_the_next_write(kb: KnowledgeBase, monkeypatch: pytest.MonkeyPatch):
    kb.create_collection("docs")
    kb.put_document("docs", "hours", " ".join([V1] * 12))  # several chunks
    monkeypatch.setattr(kb.vectors, "delete_ids", lambda *a, **k: (_ for _ in ()).throw(Outage()))
    result = kb.put_document("docs", "hours", V2)  # the write itself succeeded: it is live
    monkeypatch.undo()
    assert result.version == 2 and len(intents(kb)) == 1
    assert [h.version for h in kb.search("docs", "archive opens", top_k=10).hits] == [2]
    assert {v for _, v, _ in chroma_chunks(kb, "docs", "hours")} == {1, 2}  # garbage, never visible

    kb.put_document("docs", "hours", V1)
    assert chroma_chunks(kb, "docs", "hours") == [("hours", 3, 0)]
    assert chunk_rows(kb, "docs", "hours") == [(3, 0)]
    assert intents(kb) == []
