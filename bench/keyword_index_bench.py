"""What the in-memory keyword index costs each gateway as a corpus grows: memory, and the rebuild
at start.

    .venv/bin/python -m bench.keyword_index_bench [--sizes 100000 1000000] [--out bench/results/keyword_index.json]

Every gateway holds every collection's BM25 index in memory (knowledge/keywords.py) and rebuilds
it from the chunks table when it opens the store. For each size, a child process (so that its
memory is its own) fills a SQLite store with that many chunks of real prose (windows of about
180 words, the size of a default 240-token chunk, cut at random from the GNU manuals in
bench/data), then measures, in one run:

- read_s: the baseline, reading every chunk's text out of SQLite (what any rebuild must do);
- open_s: opening the store, which reads the same rows and builds the index (ratio: open_s / read_s);
- index_mib: the index's arrays (postings, frequencies, offsets, lengths, ids), exactly (less the
  term dictionaries); rss_mib: what the open left in the process's resident memory (arrays,
  term dictionaries, allocator); peak_rss_mib: the process's peak, the build's working set
  included (what a pod's memory limit must allow);
- query_ms: p50 of a keyword ranking of three common terms.

Per 100k chunks figures are the measured ones divided by size / 100k.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import multiprocessing
import random
import resource
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from bench.machine import description
from knowledge.chunking import Chunking
from knowledge.keywords import query_terms
from knowledge.records import RecordStore

CHUNK_WORDS = 180
CHUNKING = Chunking(240, 48, "tokens", "title", "bench")
BATCH = 20_000
QUERIES = ["file system permissions", "compile the program with options", "regular expression match"]


def prose(corpus: Path) -> list[str]:
    with gzip.open(corpus, "rt", encoding="utf-8") as rows:
        return " ".join(json.loads(line)["text"] for line in rows).split()


def fill(path: Path, size: int, corpus: Path, seed: int) -> None:
    words = prose(corpus)
    rng = random.Random(seed)
    store = RecordStore(path, CHUNKING)
    with store.transaction() as tx:
        cid = store.insert_collection(tx, "default", "bench", {}, time.time(), CHUNKING).id
    for start in range(0, size, BATCH):
        rows = []
        for i in range(start, min(size, start + BATCH)):
            at = rng.randrange(0, len(words) - CHUNK_WORDS)
            text = " ".join(words[at:at + CHUNK_WORDS])
            rows.append((cid, f"doc{i // 4:07d}", 1, i % 4, 0, len(text), text, "{}"))
        with store.transaction() as tx:
            tx.executemany(
                'INSERT INTO chunks (collection_id, doc_id, version, idx, start, "end", text, metadata)'
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows,
            )
    store.close()


def measure(path: Path, size: int, corpus: Path, seed: int, results) -> None:
    fill(path, size, corpus, seed)
    started = time.perf_counter()
    conn = sqlite3.connect(path)
    count = sum(1 for _ in conn.execute("SELECT id, text FROM chunks"))
    read_s = time.perf_counter() - started
    conn.close()
    assert count == size, (count, size)

    gc.collect()
    before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    store = RecordStore(path, CHUNKING)
    open_s = time.perf_counter() - started
    gc.collect()
    rss = psutil.Process().memory_info().rss - before
    [(collection, _)] = store.collections("default")
    index = store.keywords(collection.id)
    postings, arrays = index.footprint()
    times = []
    for _ in range(5):
        for query in QUERIES:
            started = time.perf_counter()
            index.rank(query_terms(query)).top(10)
            times.append((time.perf_counter() - started) * 1000)
    results.put({
        "chunks": size,
        "postings": postings,
        "read_s": round(read_s, 2),
        "open_s": round(open_s, 2),
        "open_over_read": round(open_s / read_s, 2),
        "index_mib": round(arrays / 2**20, 1),
        "rss_mib": round(rss / 2**20, 1),
        "index_mib_per_100k": round(arrays / 2**20 / (size / 100_000), 1),
        "rss_mib_per_100k": round(rss / 2**20 / (size / 100_000), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "query_ms_p50": round(statistics.median(times), 2),
    })
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--corpus", type=Path, default=Path("bench/data/gnu_manuals.jsonl.gz"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/keyword_index.json"))
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            results = multiprocessing.get_context("spawn").Queue()
            child = multiprocessing.get_context("spawn").Process(
                target=measure, args=(Path(tmp) / "knowledge.db", size, args.corpus, args.seed, results))
            child.start()
            row = results.get()
            child.join()
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": description(), "chunk_words": CHUNK_WORDS, "sizes": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
