"""Query embedding at batch 1: the ONNX Runtime export against torch, in the same run.

    .venv/bin/python -m bench.query_embedding_bench [--queries 200] [--rounds 6] [--threads 1]
                                                   [--out bench/results/query_embedding.json]

Both encoders embed the same demo-corpus questions one at a time, as a chat request does,
in rounds that alternate which goes first (torch, onnx, onnx, torch, ...), so both see the
same machine load. Threads as the gateway runs them (LORAG_TORCH_THREADS, 1 by default).
Reported per runtime: p50/p99 wall latency and the CPU time per query (this thread's, less
noisy than wall time on a shared machine); the ratio onnx/torch per round and over all
queries (target: p50 <= 0.5); the worst cosine between the two runtimes' vectors; the
export and cached-start times; and, to decide which runtime ingests documents, the
throughput of both on 200-token chunks at the ingest batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import machine
from bench.knowledge_bench import percentile
from knowledge import Embedder
from knowledge.query_encoder import OnnxEncoder
from training.demo.corpus import corpus


def timed(encoder, queries: list[str]) -> tuple[list[float], list[float], np.ndarray]:
    """(wall ms, CPU ms, vectors) embedding each query alone."""
    wall, cpu, vectors = [], [], []
    for query in queries:
        started, started_cpu = time.perf_counter(), time.thread_time()
        vectors.append(encoder.encode([query])[0])
        cpu.append((time.thread_time() - started_cpu) * 1000)
        wall.append((time.perf_counter() - started) * 1000)
    return wall, cpu, np.stack(vectors)


def summary(wall: list[float], cpu: list[float]) -> dict:
    return {"p50_ms": round(percentile(wall, 50), 3), "p99_ms": round(percentile(wall, 99), 3),
            "cpu_p50_ms": round(percentile(cpu, 50), 3), "queries": len(wall)}


def bench_ingest(embedder: Embedder, onnx: OnnxEncoder, rounds: int) -> dict:
    """Chunks per second for both runtimes on the same 200-token chunks, alternating."""
    words = " ".join(corpus(5, 4000)).split()
    texts = [" ".join(words[i : i + 150]) for i in range(0, 150 * 128, 150)]  # about 200 tokens each
    rates: dict[str, list[float]] = {"torch": [], "onnx": []}
    for r in range(rounds):
        for name in (("torch", "onnx") if r % 2 == 0 else ("onnx", "torch")):
            encoder = embedder if name == "torch" else onnx
            started = time.perf_counter()
            encoder.encode(texts)
            rates[name].append(round(len(texts) / (time.perf_counter() - started), 1))
    return {
        "chunks": len(texts),
        "batch_size": embedder.batch_size,
        "chunks_per_s": rates,
        "onnx_over_torch": round(statistics.median(o / t for o, t in zip(rates["onnx"], rates["torch"])), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--ingest-rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (LORAG_TORCH_THREADS)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/query_embedding.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    embedder = Embedder()
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        onnx = OnnxEncoder(embedder, Path(cache), threads=args.threads)
        export_s = time.perf_counter() - started
        started = time.perf_counter()
        OnnxEncoder(embedder, Path(cache), threads=args.threads)  # the cached export, checked as every start does
        cached_start_s = time.perf_counter() - started

    questions = [q for q in corpus(99, 8 * args.queries) if q.endswith("?")][: args.queries]
    encoders = {"torch": embedder, "onnx": onnx}
    for encoder in encoders.values():  # warm-up: first calls allocate
        timed(encoder, questions[:20])
    wall: dict[str, list[float]] = {"torch": [], "onnx": []}
    cpu: dict[str, list[float]] = {"torch": [], "onnx": []}
    rounds = []
    vectors = {}
    for r in range(args.rounds):
        order = ("torch", "onnx") if r % 2 == 0 else ("onnx", "torch")
        this = {}
        for name in order:
            w, c, vectors[name] = timed(encoders[name], questions)
            wall[name] += w
            cpu[name] += c
            this[name] = summary(w, c)
        this["onnx_over_torch_p50"] = round(this["onnx"]["p50_ms"] / this["torch"]["p50_ms"], 3)
        rounds.append(this)
        print(json.dumps({"round": r, **this}), flush=True)
    cosines = (vectors["torch"] * vectors["onnx"]).sum(axis=1)

    print("ingest ...", flush=True)
    ingest = bench_ingest(embedder, onnx, args.ingest_rounds)
    results = {
        "benchmark": "query_embedding",
        "machine": {
            **machine.description(),
            "shared": "2 cores shared with other agents' builds and tests: wall times are noisy, "
                      "CPU times and same-run ratios less so",
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "threads": args.threads,
        "batch": 1,
        "torch": summary(wall["torch"], cpu["torch"]),
        "onnx": summary(wall["onnx"], cpu["onnx"]),
        "onnx_over_torch": {
            "p50": round(percentile(wall["onnx"], 50) / percentile(wall["torch"], 50), 3),
            "p99": round(percentile(wall["onnx"], 99) / percentile(wall["torch"], 99), 3),
            "cpu_p50": round(percentile(cpu["onnx"], 50) / percentile(cpu["torch"], 50), 3),
            "p50_per_round": [r["onnx_over_torch_p50"] for r in rounds],
        },
        "rounds": rounds,
        "min_cosine_onnx_vs_torch": round(float(cosines.min()), 8),
        "export_s": round(export_s, 2),
        "cached_start_s": round(cached_start_s, 2),
        "ingest": ingest,
    }
    results["targets"] = {
        "onnx p50 <= 0.5 of torch's": results["onnx_over_torch"]["p50"] <= 0.5,
        "cosine >= 0.99999": results["min_cosine_onnx_vs_torch"] >= 0.99999,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("torch", "onnx", "onnx_over_torch", "ingest", "targets")}),
          f"→ {args.out}")


if __name__ == "__main__":
    main()
