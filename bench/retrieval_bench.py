"""Retrieval on real text: does search find the passage that answers a user's question?

    .venv/bin/python -m bench.retrieval_bench [--split dev|test|all] [--setting LORAG_CHUNK_TOKENS=128 ...]
                                              [--out bench/results/retrieval.json]

The corpus is five GNU manuals, one document per Info node (`bench.retrieval_corpus`, shipped
in bench/data/gnu_manuals.jsonl.gz); the questions (bench/data/gnu_manuals_questions.jsonl)
were written by reading those pages, each naming its answer document and the exact answer
text, and are split in halves: tune on `dev`, report on `test`. One knowledge-only
`lorag serve` (no engine) is started in a temporary home, with the service's default
settings or those given with `--setting` (to try them on the dev half). The corpus goes in
through the bulk API, and every question is scored through the search API with `lorag eval
retrieval`'s code, for dense, keyword and hybrid: recall@1/3/5 and MRR of the answer
document and of the answer text, and search latency as the client sees it. Also reported:
ingest time and chunks per second.

Targets (issue 12, test half): hybrid at least as good as the better of dense and keyword
at every k (answer-text recall and MRR), and hybrid answer-text recall@3 at least 0.90.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench import machine
from bench.retrieval_corpus import CORPUS, load
from service.knowledge.client import DocsClient, summary
from tests.gateway import knowledge_gateway
from training.eval.retrieval import MODES, SearchClient, load_suite, score

QUESTIONS = Path(__file__).parent / "data" / "gnu_manuals_questions.jsonl"
COLLECTION = "gnu-manuals"
KS = (1, 3, 5)


def ingest(url: str, documents: list[dict], home: Path) -> dict:
    """Push every document with `lorag docs push`'s client (a JSON-lines file through the bulk
    API); seconds taken and chunks made."""
    corpus = home / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d["doc_id"], "text": d["text"],
                                          "metadata": {"title": d["title"], "manual": d["manual"]}}) + "\n"
                              for d in documents))
    client = DocsClient(url, COLLECTION, timeout=600)
    client.ensure_collection()
    started = time.perf_counter()
    outcomes = client.push([corpus])
    seconds = time.perf_counter() - started
    if any(o.status == "failed" for o in outcomes):
        raise SystemExit(f"ingest failed:\n{summary(outcomes)}")
    chunks = sum(o.chunks for o in outcomes)
    return {"documents": len(documents), "chunks": chunks, "seconds": round(seconds, 1),
            "chunks_per_s": round(chunks / seconds, 1)}


def targets(test: dict) -> dict:
    """The issue's acceptance checks on the test half's scores."""
    checks = {}
    for measure in [f"recall@{k}" for k in KS] + ["mrr"]:
        best = max(test[mode]["text"][measure] for mode in ("dense", "keyword"))
        checks[f"hybrid text {measure} >= best of dense and keyword"] = test["hybrid"]["text"][measure] >= best
    checks["hybrid text recall@3 >= 0.90"] = test["hybrid"]["text"]["recall@3"] >= 0.90
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=["dev", "test", "all"], default="all")
    parser.add_argument("--setting", action="append", default=[], metavar="LORAG_NAME=VALUE",
                        help="a service setting for this run (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/retrieval.json"))
    args = parser.parse_args()
    settings = dict(setting.split("=", 1) for setting in args.setting)

    documents = load(CORPUS)
    questions = load_suite(QUESTIONS)
    splits = ["dev", "test"] if args.split == "all" else [args.split]
    with tempfile.TemporaryDirectory() as tmp:
        gw = knowledge_gateway(Path(tmp) / "home", env=settings).start()
        try:
            gw.wait_up()
            ingested = ingest(gw.url, documents, Path(tmp))
            print(json.dumps({"ingest": ingested}), flush=True)
            search = SearchClient(gw.url, COLLECTION)
            scores = {}
            for split in splits:
                scores[split] = score(search, [q for q in questions if q.split == split], MODES, KS)
                print(split, json.dumps(scores[split]), flush=True)
        finally:
            gw.stop()
    results = {
        "benchmark": "retrieval",
        "corpus": {"name": "GNU manuals (coreutils, grep, sed, gzip, diffutils), one document per Info node",
                   "documents": len(documents), "characters": sum(len(d["text"]) for d in documents)},
        "questions": {split: sum(q.split == split for q in questions) for split in ("dev", "test")},
        "settings": settings or "the service's defaults",
        "machine": machine.description(),
        "ingest": ingested,
        "scores": scores,
    }
    if "test" in scores:
        results["targets"] = targets(scores["test"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results.get("targets", {}), indent=2), f"→ {args.out}")


if __name__ == "__main__":
    main()
