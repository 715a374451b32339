"""Retrieval scoring: does search put the right passage in front of the model?

    lorag eval retrieval SUITE.jsonl --collection NAME [--url URL] [--modes dense,keyword,hybrid]
                         [--k 1,3,5] [--split test] [--json]

A suite is JSON lines, one question each:

    {"id": "q1", "question": "How do I ...?", "doc_id": "manual/page", "answer": "exact text", "split": "test"}

`doc_id` names the document that answers it, `answer` the text a passage must contain (at
least one of the two; `id` defaults to the line number, `split` to none). Every question is
sent to the collection's search API once per mode, as a user's search would be, and scored:
recall@k of the answer document (a hit from it among the first k) and of the answer text (a
hit whose text contains it, whitespace aside), and the mean reciprocal rank of each within
the largest k. Search latency is measured as the client sees it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

MODES = ("dense", "keyword", "hybrid")
_KEYS = {"id", "question", "doc_id", "answer", "split"}


class SuiteError(ValueError):
    """A suite file that cannot be scored; the message names every bad line."""


class SearchFailed(RuntimeError):
    """The service refused or could not answer a search; the message says why."""


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    doc_id: str | None
    answer: str | None
    split: str | None = None


def load_suite(path: Path) -> list[Question]:
    """The questions of a suite file; SuiteError naming each bad line (all of them) otherwise."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"cannot read {path}: {exc}") from exc
    questions, problems, ids = [], [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            problems.append(f"line {number}: not JSON ({exc})")
            continue
        problem = _problem(row)
        if problem is None:
            qid = str(row.get("id", number))
            if qid in ids:
                problem = f"id {qid!r} is used twice"
            ids.add(qid)
        if problem:
            problems.append(f"line {number}: {problem}")
            continue
        questions.append(Question(qid, row["question"], row.get("doc_id"), row.get("answer"), row.get("split")))
    if problems:
        raise SuiteError(f"{path}: {len(problems)} bad line(s)\n  " + "\n  ".join(problems))
    if not questions:
        raise SuiteError(f"{path}: no questions")
    return questions


def _problem(row: object) -> str | None:
    if not isinstance(row, dict):
        return "a question is a JSON object"
    if unknown := sorted(set(row) - _KEYS):
        return f"unknown key(s) {', '.join(unknown)}; a question has {', '.join(sorted(_KEYS))}"
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        return "'question' must be a non-empty string"
    for key in ("doc_id", "answer", "split"):
        if key in row and not (isinstance(row[key], str) and row[key].strip()):
            return f"{key!r} must be a non-empty string"
    if "doc_id" not in row and "answer" not in row:
        return "name the answer: 'doc_id', 'answer' or both"
    if "id" in row and not isinstance(row["id"], (str, int)):
        return "'id' must be a string or a number"
    return None


Search = Callable[[str, str, int], list[dict]]  # (query, mode, top_k) -> hits, best first


class SearchClient:
    """A collection's search API on a running lorag."""

    def __init__(self, url: str, collection: str, api_key: str | None = None, timeout: float = 60):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, headers=headers)
        self._path = f"/v1/collections/{collection}/search"
        self._url = url

    def __call__(self, query: str, mode: str, top_k: int) -> list[dict]:
        try:
            response = self._http.post(self._path, json={"query": query, "mode": mode, "top_k": top_k})
        except httpx.TransportError as exc:
            raise SearchFailed(f"cannot reach the service at {self._url}: {exc}") from exc
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise SearchFailed(f"search answered {response.status_code}: {message}")
        return response.json()["data"]


def score(search: Search, questions: Iterable[Question], modes: Iterable[str] = MODES,
          ks: Iterable[int] = (1, 3, 5), progress: bool = True) -> dict:
    """Per mode: recall@k and MRR of the answer document and of the answer text, and latency."""
    questions, modes, ks = list(questions), list(modes), sorted(set(ks))
    depth = ks[-1]
    results = {}
    with tqdm(total=len(questions) * len(modes), unit="search", desc="eval retrieval", file=sys.stderr,
              disable=not progress) as bar:
        for mode in modes:
            doc_ranks, text_ranks, latencies = [], [], []
            for q in questions:
                started = time.perf_counter()
                hits = search(q.question, mode, depth)
                latencies.append((time.perf_counter() - started) * 1000)
                if q.doc_id is not None:
                    doc_ranks.append(_rank(hits, lambda hit: hit["doc_id"] == q.doc_id))
                if q.answer is not None:
                    wanted = _words(q.answer)
                    text_ranks.append(_rank(hits, lambda hit: wanted in _words(hit["text"])))
                bar.update(1)
            results[mode] = {
                "questions": len(questions),
                "document": _measures(doc_ranks, ks),
                "text": _measures(text_ranks, ks),
                "search_ms": {"p50": round(_percentile(latencies, 50), 2), "p99": round(_percentile(latencies, 99), 2)},
            }
    return results


def _rank(hits: list[dict], found: Callable[[dict], bool]) -> int | None:
    return next((rank for rank, hit in enumerate(hits, 1) if found(hit)), None)


def _words(text: str) -> str:
    """Whitespace-insensitive: a passage keeps its document's line breaks, a typed answer need not."""
    return " ".join(text.split())


def _measures(ranks: list[int | None], ks: list[int]) -> dict | None:
    if not ranks:
        return None
    measures = {f"recall@{k}": round(sum(r is not None and r <= k for r in ranks) / len(ranks), 4) for k in ks}
    measures["mrr"] = round(statistics.fmean(1 / r if r else 0.0 for r in ranks), 4)
    measures["scored"] = len(ranks)
    return measures


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else 0.0


def report(results: dict) -> str:
    """A table: one row per mode and target (document, text)."""
    first = next(m for result in results.values() for m in (result["document"], result["text"]) if m)
    ks = [key for key in first if key.startswith("recall@")]
    header = f"{'mode':<8} {'target':<8} " + " ".join(f"{k:>9}" for k in ks) + f" {'mrr':>7} {'p50 ms':>7}"
    rows = [header]
    for mode, result in results.items():
        for target in ("document", "text"):
            if measures := result[target]:
                cells = " ".join(f"{measures[k]:>9.3f}" for k in ks)
                rows.append(f"{mode:<8} {target:<8} {cells} {measures['mrr']:>7.3f} {result['search_ms']['p50']:>7.1f}")
    return "\n".join(rows)
