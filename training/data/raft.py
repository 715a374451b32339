"""RAFT rows from the live knowledge base: `lorag data raft --url URL --collection NAME
--questions Q.jsonl --out ROWS.jsonl [--oracle-share P] [--top-k K] [--refresh ROWS.jsonl]`.

Each question (one JSON object a line): {"id"?, "question", "answer", "doc_id"}, the answer in
house style and the document that holds its facts (the oracle). The builder asks the running
service's search API, with the mode and top_k chat uses, so the distractors are the retriever's
real near-misses, and places the sources with knowledge.prompting exactly as the chat endpoint
does (same system template, same token budget, the served tokenizer). A seeded share P of the
rows keeps the oracle among the sources and its answer cites the oracle's [n]; the rest holds
distractors only. Every row records its provenance, so `--refresh` rebuilds only the rows
whose documents have changed since.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import httpx

from knowledge.prompting import PromptBuilder

DEPTH = 4  # the search is this many times top_k deep: the oracle may rank lower, distractors must fill up


class RaftError(Exception):
    """The questions or the service cannot make rows; the message says why."""


def questions(path: Path) -> list[dict]:
    found, problems = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {n}: not JSON ({exc.msg})")
            continue
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip()
                                                 for k in ("question", "answer", "doc_id")):
            problems.append(f"line {n}: needs \"question\", \"answer\" and \"doc_id\" strings")
            continue
        found.append({**item, "id": str(item.get("id", n))})
    if problems:
        raise RaftError(f"{path}: " + "; ".join(problems))
    return found


class RaftBuilder:
    def __init__(self, http: httpx.Client, collection: str, builder: PromptBuilder, *, top_k: int, mode: str,
                 max_tokens: int, oracle_share: float, seed: int):
        self._http = http
        self._collection = collection
        self._builder = builder
        self._top_k, self._mode, self._max_tokens = top_k, mode, max_tokens
        self._share, self._seed = oracle_share, seed

    def search(self, query: str, top_k: int) -> list[SimpleNamespace]:
        body = {"query": query, "top_k": top_k, "mode": self._mode}
        response = self._http.post(f"/v1/collections/{self._collection}/search", json=body)
        if response.status_code != 200:
            raise RaftError(f"search failed ({response.status_code}): {response.text[:300]}")
        # A hit has every field prompting's Passage reads; attribute access is all it needs.
        return [SimpleNamespace(**hit) for hit in response.json()["data"]]

    def row(self, question: dict) -> dict | None:
        """One RAFT row, or None when the oracle is to be kept and the retriever cannot find it."""
        oracle_doc = question["doc_id"]
        served = self.search(question["question"], self._top_k)  # exactly what chat retrieves
        keep = random.Random(f"{self._seed}:{question['id']}").random() < self._share
        if keep and any(h.doc_id == oracle_doc for h in served):
            passages = served
        else:
            deeper = self.search(question["question"], self._top_k * DEPTH)
            distractors = [h for h in deeper if h.doc_id != oracle_doc]
            if keep:
                oracle = next((h for h in deeper if h.doc_id == oracle_doc), None)
                if oracle is None:
                    return None
                passages = [*distractors[: self._top_k - 1], oracle]  # ranked below every near-miss
            else:
                passages = distractors[: self._top_k]
        prompt = self._builder.build([{"role": "user", "content": question["question"]}], passages, self._max_tokens)
        cited = next((s.index for s in prompt.sources if s.doc_id == question["doc_id"]), None)
        answer = question["answer"] if cited is None else f"{question['answer']} [{cited}]"
        return {
            "messages": [*prompt.messages, {"role": "assistant", "content": answer}],
            "provenance": {
                "question_id": question["id"], "collection": self._collection, "mode": self._mode,
                "top_k": self._top_k, "oracle": question["doc_id"], "oracle_included": cited is not None,
                "sources": [{"doc_id": s.doc_id, "version": s.version, "chunk_id": s.chunk_id} for s in prompt.sources],
            },
        }

    def changed(self, row: dict) -> bool:
        """Whether any document a row was built from has another version now (or is gone)."""
        for source in row["provenance"]["sources"]:
            response = self._http.get(f"/v1/collections/{self._collection}/documents/{source['doc_id']}")
            if response.status_code != 200 or response.json()["version"] != source["version"]:
                return True
        return False


def build(raft: RaftBuilder, items: list[dict], out: Path, refresh: Path | None = None) -> dict:
    """Write a row per question to `out`; with `refresh`, rows of it whose sources are unchanged are kept."""
    from tqdm import tqdm

    kept: dict[str, dict] = {}
    if refresh is not None:
        for line in refresh.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                kept[row["provenance"]["question_id"]] = row
    counts = {"rows": 0, "kept": 0, "rebuilt": 0, "with_oracle": 0, "skipped": 0}
    rows = []
    for question in tqdm(items, unit="question", desc=f"raft → {out}"):
        old = kept.get(question["id"])
        if old is not None and not raft.changed(old):
            rows.append(old)
            counts["kept"] += 1
        else:
            row = raft.row(question)
            if row is None:
                counts["skipped"] += 1  # the oracle is nowhere in the retriever's results
                continue
            rows.append(row)
            counts["rebuilt"] += 1
        counts["with_oracle"] += rows[-1]["provenance"]["oracle_included"]
    counts["rows"] = len(rows)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return counts
