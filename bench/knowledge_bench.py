"""Knowledge benchmark: ingest throughput against raw encode throughput, and search latency by size.

    .venv/bin/python -m bench.knowledge_bench [--sizes 1000 10000 100000] [--out bench/results/knowledge.json]

1. Ingest: the same chunks are embedded raw (Embedder.encode) and ingested through
   KnowledgeBase.put_documents (chunking, embedding, Chroma, SQLite, cut-over) in one run;
   the ratio of the two throughputs is the ingest efficiency (target >= 0.8).
2. Search: collections of 1k/10k/100k chunks; p50/p99 latency of dense, keyword and hybrid
   search with the query embedding precomputed (reported on its own). For these collections the
   chunk embeddings are synthetic unit vectors (embedding 100k chunks on 2 cores would take
   ~10 minutes and does not change search latency); the text, BM25 index and HNSW are real.
   open_s: reopening the store at that size (the keyword index is rebuilt from SQLite).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from knowledge import DocumentInput, Embedder, KnowledgeBase, KnowledgeSettings
from training.demo.corpus import corpus


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class SyntheticEmbedder:
    """The real embedder's tokenizer, with deterministic random unit vectors instead of the model."""

    def __init__(self, real: Embedder):
        self.tokenizer, self.max_tokens, self.dim = real.tokenizer, real.max_tokens, real.dim

    def encode(self, texts):
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            v = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(self.dim).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out


def documents(count: int, sentences_per_doc: int, seed: int) -> list[DocumentInput]:
    lines = corpus(seed, count * sentences_per_doc)
    return [
        DocumentInput(f"doc{i:06d}", " ".join(lines[i * sentences_per_doc:(i + 1) * sentences_per_doc]),
                      {"group": i % 10})
        for i in range(count)
    ]


def bench_ingest(embedder: Embedder, docs: list[DocumentInput], batch: int, rounds: int) -> dict:
    """Alternate raw encoding and ingesting the same chunks, so both see the same machine load."""
    with tempfile.TemporaryDirectory() as home:
        settings = KnowledgeSettings(home=Path(home))
        with KnowledgeBase(settings, embedder=embedder) as kb:
            texts = [c.text for d in docs for c in kb.chunker.split(d.text)]
            embedder.encode(texts[:64])  # warm-up
            raw, ingest = [], []
            for r in range(rounds):
                started = time.perf_counter()
                embedder.encode(texts)
                raw.append(len(texts) / (time.perf_counter() - started))

                kb.create_collection(f"ingest-{r}")
                started = time.perf_counter()
                for lo in range(0, len(docs), batch):
                    results = kb.put_documents(f"ingest-{r}", docs[lo:lo + batch])
                    assert all(res.status == "created" for res in results), results
                ingest.append(len(texts) / (time.perf_counter() - started))
    ratios = [i / r for i, r in zip(ingest, raw)]
    return {
        "chunks": len(texts),
        "documents": len(docs),
        "batch_documents": batch,
        "rounds": rounds,
        "raw_encode_chunks_per_s": [round(x, 1) for x in raw],
        "ingest_chunks_per_s": [round(x, 1) for x in ingest],
        "ingest_over_raw_per_round": [round(x, 3) for x in ratios],
        "ingest_over_raw": round(statistics.median(ratios), 3),
    }


def bench_search(real: Embedder, size: int, queries: list[str], query_vectors: np.ndarray, chunk_tokens: int) -> dict:
    fake = SyntheticEmbedder(real)
    with tempfile.TemporaryDirectory() as home:
        settings = KnowledgeSettings(home=Path(home), chunk_tokens=chunk_tokens, chunk_overlap=0)
        with KnowledgeBase(settings, embedder=fake) as kb:
            kb.create_collection("search")
            # Documents of ~10 chunks; add until the collection holds `size` chunks.
            chunks, started, n = 0, time.perf_counter(), 0
            while chunks < size:
                docs = documents(max(1, min(200, (size - chunks) // 10)), 40, seed=size + n)
                docs = [DocumentInput(f"b{n}-{d.doc_id}", d.text, d.metadata) for d in docs]
                for r in kb.put_documents("search", docs):
                    chunks += r.chunks
                n += 1
            load_s = time.perf_counter() - started
            out: dict = {"chunks": chunks, "load_s": round(load_s, 1)}
            for mode in ("dense", "keyword", "hybrid"):
                for q, v in zip(queries[:10], query_vectors[:10]):  # warm-up
                    kb.search("search", q, top_k=5, mode=mode, query_embedding=v)
                latencies = []
                for q, v in zip(queries, query_vectors):
                    t = time.perf_counter()
                    result = kb.search("search", q, top_k=5, mode=mode, query_embedding=v)
                    latencies.append((time.perf_counter() - t) * 1000)
                    assert result.hits, (mode, q)
                out[mode] = {
                    "p50_ms": round(percentile(latencies, 50), 2),
                    "p99_ms": round(percentile(latencies, 99), 2),
                    "mean_ms": round(statistics.fmean(latencies), 2),
                    "queries": len(latencies),
                }
        # Opening an existing store rebuilds the in-memory keyword index from SQLite.
        started = time.perf_counter()
        with KnowledgeBase(settings, embedder=fake) as kb:
            out["open_s"] = round(time.perf_counter() - started, 2)
            assert kb.search("search", queries[0], top_k=5, mode="keyword").hits
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--ingest-docs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/results/knowledge.json"))
    args = parser.parse_args()

    real = Embedder()
    results: dict = {
        "benchmark": "knowledge",
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print("ingest ...", flush=True)
    results["ingest"] = bench_ingest(real, documents(args.ingest_docs, 40, seed=1), batch=50, rounds=args.rounds)
    print(json.dumps(results["ingest"]), flush=True)

    rng = random.Random(7)
    queries = [q for q in corpus(99, 4 * args.queries) if q.endswith("?")]
    queries = rng.sample(queries, min(args.queries, len(queries)))
    started = time.perf_counter()
    embed_ms = []
    vectors = []
    for q in queries:
        t = time.perf_counter()
        vectors.append(real.encode([q])[0])
        embed_ms.append((time.perf_counter() - t) * 1000)
    results["query_embedding"] = {"p50_ms": round(percentile(embed_ms, 50), 2), "p99_ms": round(percentile(embed_ms, 99), 2)}
    results["search"] = {}
    for size in args.sizes:
        print(f"search at {size} chunks ...", flush=True)
        results["search"][str(size)] = bench_search(real, size, queries, np.stack(vectors), chunk_tokens=64)
        print(json.dumps(results["search"][str(size)]), flush=True)
    results["targets"] = {
        "ingest_over_raw >= 0.8": results["ingest"]["ingest_over_raw"] >= 0.8,
        "hybrid p50 < 30 ms at the largest size": results["search"][str(max(args.sizes))]["hybrid"]["p50_ms"] < 30,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["targets"]), f"→ {args.out}")


if __name__ == "__main__":
    main()
