"""Readers during rewrites: never zero chunks of a document, never two versions in one result."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from knowledge import Embedder, KnowledgeBase
from knowledge.documents import DEFAULT_TENANT
from knowledge.versions import Versions
from tests.knowledge.inspection import chroma_chunks, chroma_name, chunk_rows

VERSIONS = 30
QUERY = "zebra lighthouse"


def version_text(version: int) -> str:
    # 3 to 7 chunks of 24 tokens, every chunk carrying the version's marker and the query's words.
    sentences = 6 + (version % 5) * 3
    return " ".join(f"zebra mark{version:03d} crossed lighthouse bay {i}." for i in range(sentences))


@pytest.fixture
def live_kb(make_settings, embedder: Embedder):
    with KnowledgeBase(make_settings(chunk_tokens=24, chunk_overlap=4), embedder=embedder) as kb:
        kb.create_collection("live")
        for name in ("noise-a", "noise-b", "noise-c"):
            kb.put_document("live", name, f"Unrelated {name} notes on tax forms and invoices.")
        yield kb


def test_readers_see_exactly_one_version_while_a_document_is_rewritten(live_kb: KnowledgeBase):
    kb = live_kb
    kb.put_document("live", "doc", version_text(1))
    stop = threading.Event()
    problems: list[str] = []
    searches: Counter[str] = Counter()
    seen_versions: set[int] = set()

    def read() -> None:
        try:
            check_until_stopped()
        except Exception as exc:  # a reader that dies must fail the test, not end quietly
            problems.append(f"reader failed: {exc!r}")

    def check_until_stopped() -> None:
        modes = ("dense", "keyword", "hybrid")
        while not stop.is_set():
            mode = modes[sum(searches.values()) % 3]
            hits = [h for h in kb.search("live", QUERY, top_k=30, mode=mode).hits if h.doc_id == "doc"]
            searches[mode] += 1
            versions = {h.version for h in hits}
            if len(versions) != 1:
                problems.append(f"{mode}: versions {sorted(versions)} in one result")
                continue
            (version,) = versions
            seen_versions.add(version)
            expected_chunks = kb.chunker.split(version_text(version))
            if sorted(h.index for h in hits) != list(range(len(expected_chunks))):
                problems.append(f"{mode}: chunks {sorted(h.index for h in hits)} of version {version}")
            if any(f"mark{version:03d}" not in h.text for h in hits):
                problems.append(f"{mode}: a hit's text is not of version {version}")

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for version in range(2, VERSIONS + 1):
            result = kb.put_document("live", "doc", version_text(version))
            assert (result.version, result.status) == (version, "updated")
            # Read-your-writes: the next search, in the writer's thread, sees the new version only.
            hits = [h for h in kb.search("live", QUERY, top_k=30, mode="dense").hits if h.doc_id == "doc"]
            assert {h.version for h in hits} == {version}
    finally:
        stop.set()
        for reader in readers:
            reader.join()

    assert not problems, problems[:5]
    assert min(searches.values()) >= 5, searches
    assert len(seen_versions) > 5  # the readers really did run across the rewrites
    final = len(kb.chunker.split(version_text(VERSIONS)))
    assert chroma_chunks(kb, "live", "doc") == [("doc", VERSIONS, i) for i in range(final)]
    assert chunk_rows(kb, "live", "doc") == [(VERSIONS, i) for i in range(final)]


def test_writes_to_one_document_are_serialised(live_kb: KnowledgeBase):
    kb = live_kb
    results = []

    def write(writer: int) -> None:
        for i in range(8):
            results.append(kb.put_document("live", "shared", f"writer {writer} pass {i} zebra " * (1 + i % 4)))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.version for r in results) == list(range(1, 25))
    doc = kb.get_document("live", "shared")
    assert doc.version == 24
    assert chroma_chunks(kb, "live", "shared") == [("shared", 24, i) for i in range(doc.chunks)]


def test_version_map_and_reader_gate():
    versions = Versions({1: {"a": 1}})
    with versions.reading() as before:
        seq = versions.flip(1, {"a": 2, "b": 1})
        assert versions.visible(before, 1, ["a", "b"]) == {"a": 1}  # b did not exist yet
        with versions.reading() as after:
            assert versions.visible(after, 1, ["a", "b"]) == {"a": 2, "b": 1}
        settled = threading.Event()

        def settle() -> None:
            versions.settle(seq, 1, ["a", "b"])
            settled.set()

        thread = threading.Thread(target=settle)
        thread.start()
        time.sleep(0.1)
        assert not settled.is_set()  # a search from before the flip still runs
    thread.join(timeout=5)
    assert settled.is_set()
    with versions.reading() as later:
        seq = versions.flip(1, {"a": None})
        assert versions.visible(later, 1, ["a", "b"]) == {"a": 2, "b": 1}
    versions.settle(seq, 1, ["a"])
    with versions.reading() as last:
        assert versions.visible(last, 1, ["a", "b"]) == {"b": 1}


def test_old_version_outlives_every_search_that_started_before_the_flip(live_kb: KnowledgeBase):
    kb = live_kb
    kb.put_document("live", "doc", version_text(1))
    v1_chunks = chroma_chunks(kb, "live", "doc")
    writer = None
    with kb.versions.reading() as old_search:  # a search in flight across the rewrite
        writer = threading.Thread(target=kb.put_document, args=("live", "doc", version_text(2)))
        writer.start()
        deadline = time.monotonic() + 30
        while {h.version for h in kb.search("live", QUERY, mode="keyword").hits if h.doc_id == "doc"} != {2}:
            assert time.monotonic() < deadline, "the new version never became visible"
            time.sleep(0.01)
        # Flipped for new searches, but the old search may still read version 1: it stays.
        time.sleep(0.2)
        assert writer.is_alive()
        assert set(v1_chunks) <= set(chroma_chunks(kb, "live", "doc"))
        cid = kb.records.collection(DEFAULT_TENANT, "live").id
        assert kb.versions.visible(old_search, cid, ["doc"]) == {"doc": 1}
    writer.join(timeout=30)
    assert not writer.is_alive()
    assert {version for _, version, _ in chroma_chunks(kb, "live", "doc")} == {2}


def test_deleting_a_collection_under_searches_and_writes(make_settings, embedder: Embedder):
    from knowledge import CollectionNotFound

    with KnowledgeBase(make_settings(), embedder=embedder) as kb:
        stop = threading.Event()
        problems: list[str] = []

        def loop(action) -> None:
            while not stop.is_set():
                try:
                    action()
                except CollectionNotFound:
                    pass
                except Exception as exc:
                    problems.append(repr(exc))

        kb.create_collection("shaky")
        workers = [
            threading.Thread(target=loop, args=(lambda: kb.search("shaky", "zebra lighthouse", mode="hybrid"),)),
            threading.Thread(target=loop, args=(lambda: kb.search("shaky", "zebra lighthouse", mode="keyword"),)),
            threading.Thread(target=loop, args=(lambda: kb.put_document("shaky", "doc", f"zebra {time.time()}"),)),
        ]
        for worker in workers:
            worker.start()
        try:
            for _ in range(6):
                time.sleep(0.15)
                kb.delete_collection("shaky")
                time.sleep(0.05)
                kb.create_collection("shaky")
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        assert not problems, problems[:5]
        own = f"lorag-{kb.records.instance}-"
        live = {c.name for c in kb.vectors.client.list_collections() if c.name.startswith(own)}
        assert live == {chroma_name(kb, "shaky")}
        docs, _ = kb.list_documents("shaky")
        for doc in docs:
            assert chroma_chunks(kb, "shaky", doc.doc_id) == [(doc.doc_id, doc.version, i) for i in range(doc.chunks)]
