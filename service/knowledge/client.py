"""`lorag docs push|search|reindex`: the knowledge API from the command line, against a running service."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from knowledge.parsing import SUPPORTED_SUFFIXES

# JSON-lines files go through the bulk route in batches of this many documents.
_BULK_BATCH = 100


@dataclass
class Outcome:
    source: str
    status: str  # created | updated | unchanged | failed
    reason: str = ""
    chunks: int = 0  # of the document as stored (JSON-lines pushes)


def _files(paths: list[Path]) -> Iterator[tuple[Path, Path]]:
    """(file, root) for every file named or found under a named folder, in a stable order."""
    for path in paths:
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                yield file, path
        else:
            yield path, path.parent


class DocsClient:
    def __init__(self, url: str, collection: str, api_key: str | None = None, timeout: float = 300):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, headers=headers)
        self._collection = collection

    def ensure_collection(self) -> None:
        response = self._http.post("/v1/collections", json={"name": self._collection})
        if response.status_code not in (201, 409):
            raise SystemExit(f"lorag docs: cannot create collection {self._collection!r}: {_message(response)}")

    def push(self, paths: list[Path]) -> list[Outcome]:
        files = list(_files(paths))
        outcomes: list[Outcome] = []
        with tqdm(total=len(files), unit="file", desc=f"push → {self._collection}", file=sys.stderr) as bar:
            for file, root in files:
                if not file.exists():
                    outcomes.append(Outcome(str(file), "failed", "no such file"))
                elif file.suffix.lower() == ".jsonl":
                    outcomes.extend(self._push_jsonl(file))
                elif file.suffix.lower() in SUPPORTED_SUFFIXES:
                    outcomes.append(self._push_file(file, file.relative_to(root).as_posix()))
                else:
                    outcomes.append(Outcome(str(file), "failed", f"unsupported file type {file.suffix or '(none)'}"))
                bar.update(1)
        return outcomes

    def _push_file(self, file: Path, doc_id: str) -> Outcome:
        try:
            response = self._http.post(
                f"/v1/collections/{self._collection}/files",
                files={"file": (file.name, file.read_bytes())},
                data={"doc_id": doc_id},
            )
        except (OSError, httpx.HTTPError) as exc:
            return Outcome(str(file), "failed", str(exc))
        if response.status_code in (200, 201):
            return Outcome(str(file), response.json()["status"])
        return Outcome(str(file), "failed", _message(response))

    def _push_jsonl(self, file: Path) -> list[Outcome]:
        lines = file.read_text(encoding="utf-8").split("\n")
        outcomes = []
        for start in range(0, len(lines), _BULK_BATCH):
            batch = lines[start:start + _BULK_BATCH]
            if not any(line.strip() for line in batch):  # e.g. the "" after a final newline: nothing to send
                continue
            try:
                response = self._http.post(
                    f"/v1/collections/{self._collection}/documents/bulk",
                    content="\n".join(batch).encode(),
                    headers={"content-type": "application/x-ndjson"},
                )
            except httpx.HTTPError as exc:
                outcomes.extend(Outcome(f"{file}:{start + i + 1}", "failed", str(exc)) for i in range(len(batch)))
                continue
            if response.status_code != 200:
                reason = _message(response)
                outcomes.extend(Outcome(f"{file}:{start + i + 1}", "failed", reason) for i in range(len(batch)))
                continue
            for item in response.json()["results"]:
                source = f"{file}:{start + item['line']}"
                outcomes.append(Outcome(source, item["status"], item.get("error") or "", item.get("chunks", 0)))
        return outcomes

    def search(self, query: str, top_k: int, mode: str, filter_: dict | None) -> dict:
        body = {"query": query, "top_k": top_k, "mode": mode, "filter": filter_}
        response = self._http.post(f"/v1/collections/{self._collection}/search", json=body)
        if response.status_code != 200:
            raise SystemExit(f"lorag docs search: {_message(response)}")
        return response.json()


    def reindex(self, chunking: dict, poll_s: float = 0.5) -> dict:
        """Start a reindex and follow it to its end; returns its final status."""
        body = {"chunking": chunking} if chunking else None
        response = self._http.post(f"/v1/collections/{self._collection}/reindex", json=body)
        if response.status_code != 202:
            raise SystemExit(f"lorag docs reindex: {_message(response)}")
        status = response.json()["reindex"]
        with tqdm(unit="doc", desc=f"reindex {self._collection}", file=sys.stderr) as bar:
            while status["state"] == "running":
                time.sleep(poll_s)
                response = self._http.get(f"/v1/collections/{self._collection}")
                if response.status_code != 200:
                    raise SystemExit(f"lorag docs reindex: {_message(response)}")
                status = response.json()["reindex"]
                bar.total = status["documents"]
                bar.n = status["copied"] + status["reused"]
                bar.refresh()
        return status


def reindex_summary(status: dict) -> str:
    chunking = status["chunking"]
    settings = f"size {chunking['size']}, overlap {chunking['overlap']}, title key {chunking['title_key']}"
    if status["state"] == "done":
        return (f"reindexed {status['documents']} documents ({status['copied']} embedded again, "
                f"{status['reused']} resumed) with {settings}")
    return f"reindex {status['state']}: {status['error']}; the old index is still serving"


def summary(outcomes: list[Outcome]) -> str:
    counts = Counter(o.status for o in outcomes)
    lines = [", ".join(f"{counts.get(s, 0)} {s}" for s in ("created", "updated", "unchanged", "failed"))]
    lines += [f"  failed: {o.source}: {o.reason}" for o in outcomes if o.status == "failed"]
    return "\n".join(lines)


def _message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


def print_hits(result: dict) -> None:
    for rank, hit in enumerate(result["data"], 1):
        snippet = " ".join(hit["text"].split())[:160]
        print(f"{rank}. {hit['doc_id']} v{hit['version']} #{hit['index']}  score={hit['score']:.4f}\n   {snippet}")
    print(json.dumps({"timings_ms": result.get("timings_ms", {})}))
