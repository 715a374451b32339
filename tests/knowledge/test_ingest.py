"""Bulk ingest across documents."""

from __future__ import annotations

import random

from knowledge import DocumentInput, Embedder, KnowledgeBase, WriteResult

VOCAB = (
    "harbour storm lamp keeper ledger archive tide river mountain invoice tax opening chess bread yeast "
    "lava ash moon sun broker topic partition"
).split()


def corpus(seed: int, docs: int, words: int) -> list[DocumentInput]:
    rng = random.Random(seed)
    return [
        DocumentInput(
            f"doc-{seed}-{i}",
            " ".join(rng.choice(VOCAB) + ("." if rng.random() < 0.1 else "") for _ in range(words)),
            {"batch": seed, "n": i},
        )
        for i in range(docs)
    ]


def test_bulk_ingest_writes_every_chunk_of_every_document(make_settings, embedder: Embedder):
    """Throughput against the raw embedder is measured by bench/knowledge_bench.py, not here."""
    with KnowledgeBase(make_settings(chunk_tokens=32, chunk_overlap=6), embedder=embedder) as kb:
        kb.create_collection("bulk")
        for batch in range(2):
            docs = corpus(batch, docs=25, words=200)
            texts = [chunk.text for doc in docs for chunk in kb.chunker.split(doc.text)]
            results = kb.put_documents("bulk", docs)
            assert all(isinstance(r, WriteResult) and r.status == "created" for r in results)
            assert sum(r.chunks for r in results) == len(texts) >= 100
        hits = kb.search("bulk", "harbour storm", top_k=3, filter={"batch": 1}).hits
        assert len(hits) == 3 and all(h.metadata["batch"] == 1 for h in hits)
