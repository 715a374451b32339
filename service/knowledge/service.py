"""The knowledge API's logic: runs the (blocking) knowledge base off the event loop, in a pool of
its own, and shapes its results.

Every call names the caller's tenant: collection names resolve inside it, nowhere else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import Any, TypeVar

from anyio import CapacityLimiter, to_thread

from knowledge import KnowledgeBase
from knowledge.documents import DocumentInput
from knowledge.errors import InvalidDocument, ReindexInterrupted
from knowledge.reindexing import Reindex
from service.errors import InvalidRequest, LimitExceeded
from service.json_body import MalformedJson, parse_json
from service.settings import Settings

T = TypeVar("T")
log = logging.getLogger(__name__)
REINDEX_STOP_S = 30  # how long closing waits for a reindex to reach its next batch


class KnowledgeService:
    def __init__(self, kb: KnowledgeBase, settings: Settings):
        self._kb = kb
        self._settings = settings
        # Its own bound on threads: a burst of large ingests queues here instead of taking the
        # default pool's threads, which chat (query embedding) and key checks need.
        self._pool = CapacityLimiter(settings.knowledge_workers)
        self._stop = threading.Event()  # set at shutdown: reindexes stop at their next batch
        self._reindexes: set[threading.Thread] = set()

    def close(self) -> None:
        """Stop the reindexes under way; each leaves the old index serving and resumes when asked again."""
        self._stop.set()
        for thread in list(self._reindexes):
            thread.join(REINDEX_STOP_S)

    async def _run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking knowledge call in the knowledge pool."""
        return await to_thread.run_sync(partial(call, *args, **kwargs), limiter=self._pool)

    async def create_collection(self, name: str, metadata: dict, chunking: dict | None, *, tenant: str) -> dict:
        return asdict(await self._run(self._kb.create_collection, name, metadata, chunking=chunking, tenant=tenant))

    async def reindex(self, name: str, chunking: dict | None, *, tenant: str) -> dict:
        """Start rebuilding the collection in the background; the collection, its reindex running."""
        job = await self._run(self._kb.reindex, name, chunking, tenant=tenant)  # checks, claims: errors come back here
        # A thread of its own, not the pool: a reindex takes minutes and would hold a pool slot all along.
        thread = threading.Thread(target=self._reindex, args=(job, name), name=f"reindex-{name}", daemon=True)
        self._reindexes.add(thread)
        thread.start()
        return await self.get_collection(name, tenant=tenant)

    def _reindex(self, job: Reindex, name: str) -> None:
        try:
            status = job.run(self._stop)
            log.info("reindexed %r: %d documents embedded again, %d reused", name, status.copied, status.reused)
        except ReindexInterrupted:
            log.info("the reindex of %r stopped with the service; reindex again to resume", name)
        except Exception:
            log.exception("the reindex of %r failed; the old index serves on", name)  # its status says why
        finally:
            self._reindexes.discard(threading.current_thread())

    async def list_collections(self, *, tenant: str) -> list[dict]:
        return [asdict(c) for c in await self._run(self._kb.list_collections, tenant=tenant)]

    async def get_collection(self, name: str, *, tenant: str) -> dict:
        return asdict(await self._run(self._kb.get_collection, name, tenant=tenant))

    async def delete_collection(self, name: str, *, tenant: str) -> None:
        await self._run(self._kb.delete_collection, name, tenant=tenant)

    async def put_document(self, collection: str, doc_id: str, text: str, metadata: dict, *, tenant: str) -> dict:
        return asdict(await self._run(self._kb.put_document, collection, doc_id, text, metadata, tenant=tenant))

    async def put_file(
        self, collection: str, filename: str, data: bytes, doc_id: str | None, metadata: str | None, *, tenant: str
    ) -> dict:
        """Extract the file's text and write it as a document (its id defaults to the file name)."""
        meta = _metadata_form(metadata)
        text = await self._run(self._kb.extract_text, filename, data)
        return await self.put_document(collection, doc_id or filename, text, meta, tenant=tenant)

    async def put_bulk(self, collection: str, body: bytes, *, tenant: str) -> dict:
        """Write JSON lines {"id", "text", "metadata"?}; a bad line fails alone and names its line number."""
        items, results = await self._run(self._parse_bulk, body)  # megabytes of JSON: not on the event loop
        inputs = [DocumentInput(i["id"], i["text"], i.get("metadata")) for _, i in items]
        written = await self._run(self._kb.put_documents, collection, inputs, tenant=tenant)
        for (n, item), outcome in zip(items, written):
            if isinstance(outcome, Exception):
                results.append({"line": n, "doc_id": item["id"], "status": "failed", "error": str(outcome)})
            else:
                results.append({"line": n, **asdict(outcome)})
        results.sort(key=lambda r: r["line"])
        summary = {s: sum(r["status"] == s for r in results) for s in ("created", "updated", "unchanged", "failed")}
        return {"results": results, "summary": summary}

    def _parse_bulk(self, body: bytes) -> tuple[list[tuple[int, dict]], list[dict]]:
        """(line number, item) for each good line, and a failed result for each bad one."""
        items, results = [], []
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(
                f"the body is not UTF-8 (invalid byte at offset {exc.start}); send JSON lines in UTF-8",
                code="invalid_encoding",
            ) from None
        # Split on "\n" only: str.splitlines() would also split inside JSON strings at U+2028 and friends.
        lines = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
        if not lines:
            raise InvalidRequest("the body has no JSON lines; send one document per line", code="empty_bulk")
        if len(lines) > self._settings.max_bulk_documents:
            raise LimitExceeded(
                f"{len(lines)} documents is more than the limit of {self._settings.max_bulk_documents} per request; "
                "split the upload (LORAG_MAX_BULK_DOCUMENTS)"
            )
        for n, line in lines:
            try:
                items.append((n, _bulk_item(line)))
            except InvalidDocument as exc:
                results.append({"line": n, "status": "failed", "error": str(exc)})
        return items, results

    async def get_document(self, collection: str, doc_id: str, *, tenant: str) -> dict:
        return asdict(await self._run(self._kb.get_document, collection, doc_id, tenant=tenant))

    async def delete_document(self, collection: str, doc_id: str, *, tenant: str) -> None:
        await self._run(self._kb.delete_document, collection, doc_id, tenant=tenant)

    async def list_documents(self, collection: str, limit: int, after: str | None, *, tenant: str) -> dict:
        items, cursor = await self._run(self._kb.list_documents, collection, limit, after, tenant=tenant)
        return {"data": [asdict(d) for d in items], "next": cursor}

    async def search(
        self, collection: str, query: str, top_k: int, mode: str, filter_: dict | None, *, tenant: str
    ) -> dict:
        result = await self._run(
            self._kb.search, collection, query, top_k=top_k, mode=mode, filter=filter_, tenant=tenant
        )
        return {"data": [asdict(h) for h in result.hits], "timings_ms": asdict(result.timings)}


def _metadata_form(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        meta = parse_json(raw)
    except MalformedJson as exc:
        raise InvalidRequest(
            f"metadata must be a JSON object, e.g. {{\"lang\": \"en\"}}: {exc.message}", param="metadata", code=exc.code
        ) from None
    if not isinstance(meta, dict):
        raise InvalidRequest("metadata must be a JSON object", param="metadata")
    return meta


def _bulk_item(line: str) -> dict:
    try:
        item = parse_json(line)
    except MalformedJson as exc:
        raise InvalidDocument(exc.message) from None
    if not isinstance(item, dict):
        raise InvalidDocument("each line must be a JSON object with \"id\" and \"text\"")
    unknown = set(item) - {"id", "text", "metadata"}
    if unknown:
        raise InvalidDocument(f"unknown field(s) {sorted(unknown)}; a line holds \"id\", \"text\", \"metadata\"")
    if not isinstance(item.get("id"), str) or not isinstance(item.get("text"), str):
        raise InvalidDocument("\"id\" and \"text\" must both be strings")
    if not isinstance(item.get("metadata", {}), dict):
        raise InvalidDocument("\"metadata\" must be a JSON object")
    return item
