"""Rebuilding a collection's chunks and vectors (new chunking settings, or a new embedder) while
it keeps serving.

The rebuild goes into a shadow collection: its own SQLite rows, keyword index and Chroma
collection, which no caller can name or search. Documents are copied into it at their own
versions, a batch at a time, while writes to the live collection go on; then, with the
collection's writes held, a last pass copies what changed since, and one SQLite transaction
gives the shadow the collection's name (the cut-over). Searches resolve their collection inside
their version snapshot (search.py), so each sees the old index whole or the new one whole; the
old one is deleted once every search that may be reading it has finished.

Interrupted before the cut-over (a crash, the service stopping, an error), the live collection
was never touched. The shadow stays: the next reindex with the same settings resumes from it
(documents it holds at their live version are not embedded again); with other settings it
starts over. After the cut-over, the next open deletes whatever of the old index is left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal

from knowledge.chunking import Chunking
from knowledge.errors import CollectionNotFound, ReindexInterrupted, ReindexRunning
from knowledge.ingestion import Ingestion
from knowledge.records import CollectionRow, RecordStore, shadow_name
from knowledge.vectors import MissingVectors, VectorStore
from knowledge.versions import Versions

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (tenant, collection name)
BATCH = 32  # documents per copy step: progress, and how often a stop is noticed


@dataclass(frozen=True)
class ReindexStatus:
    state: Literal["running", "done", "failed", "interrupted"]
    chunking: Chunking  # what the collection is being rebuilt with
    documents: int  # in the collection when the copy began
    copied: int  # chunked and embedded again so far
    reused: int  # already in the shadow at their current version (a resumed reindex)
    started_at: datetime
    finished_at: datetime | None = None
    error: str | None = None


class WriteGate:
    """Lets a collection's writes through, except while a reindex cuts it over: the cut-over
    waits for the writes under way and holds new ones until the new index is the collection."""

    def __init__(self):
        self._cond = threading.Condition()
        self._writing: Counter[Key] = Counter()
        self._closed: set[Key] = set()

    @contextmanager
    def writing(self, key: Key) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: key not in self._closed)
            self._writing[key] += 1
        try:
            yield
        finally:
            with self._cond:
                self._writing[key] -= 1
                if not self._writing[key]:
                    del self._writing[key]
                self._cond.notify_all()

    @contextmanager
    def closed(self, key: Key) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: key not in self._closed)
            self._closed.add(key)
            self._cond.wait_for(lambda: not self._writing[key])
        try:
            yield
        finally:
            with self._cond:
                self._closed.discard(key)
                self._cond.notify_all()


class Reindexing:
    def __init__(
        self, records: RecordStore, vectors: VectorStore, versions: Versions, ingestion: Ingestion, gate: WriteGate
    ):
        self._records = records
        self._vectors = vectors
        self._versions = versions
        self._ingestion = ingestion
        self._gate = gate
        self._lock = threading.Lock()
        # The last reindex of each collection in this process, and its status.
        self._last: dict[Key, tuple[Reindex, ReindexStatus]] = {}

    def start(self, tenant: str, live: CollectionRow, target: Chunking) -> Reindex:
        """Claim the collection for one reindex (ReindexRunning if one is under way); `run` does it."""
        key = (tenant, live.name)
        job = Reindex(self, key, live, target)
        with self._lock:
            current = self._last.get(key)
            if current is not None and current[1].state == "running":
                raise ReindexRunning(live.name)
            self._last[key] = (job, ReindexStatus("running", target, 0, 0, 0, datetime.now(UTC)))
        return job

    def status(self, tenant: str, live: CollectionRow) -> ReindexStatus | None:
        """This process's last reindex of the collection; else, if an earlier one left its shadow, that one, interrupted."""
        with self._lock:
            found = self._last.get((tenant, live.name))
        if found is not None:
            return found[1]
        with self._records.reading() as conn:
            shadow = self._records.shadow(conn, live.id)
        if shadow is None:
            return None
        return ReindexStatus(
            "interrupted", shadow.chunking, self._records.count_documents(live.id), 0,
            self._records.count_documents(shadow.id), datetime.fromtimestamp(shadow.created_at, UTC),
        )

    def _update(self, job: Reindex, **changes: object) -> ReindexStatus:
        """Change `job`'s status; a job whose collection was deleted (and maybe made anew) since
        keeps its own, unseen."""
        with self._lock:
            mine, status = self._last.get(job.key, (None, job.last))
            job.last = replace(status, **changes)
            if mine is job:
                self._last[job.key] = (job, job.last)
            return job.last

    def forget(self, tenant: str, name: str) -> None:
        """A new collection of this name: the last reindex was another's."""
        with self._lock:
            self._last.pop((tenant, name), None)


class Reindex:
    """One collection's rebuild; `run` it once, in any thread."""

    def __init__(self, owner: Reindexing, key: Key, live: CollectionRow, target: Chunking):
        self._owner = owner
        self.key = key
        self._live = live
        self.target = target
        self.last = ReindexStatus("running", target, 0, 0, 0, datetime.now(UTC))

    def run(self, stop: threading.Event | None = None) -> ReindexStatus:
        """Rebuild and cut over; returns the final status. A set `stop` ends it at the next batch
        with ReindexInterrupted (the old index serves on, and a later run resumes)."""
        owner, live = self._owner, self._live
        try:
            shadow = self._shadow()
            self._copy(shadow, stop, first=True)
            with owner._gate.closed(self.key):
                self._copy(shadow, None, first=False)  # what changed while the copy ran; writes are held now
                with owner._records.transaction() as tx:
                    if not owner._records.collection_exists(tx, live.id):
                        raise CollectionNotFound(live.name)
                    owner._records.cut_over(tx, live, shadow)
            self._retire()
        except (CollectionNotFound, MissingVectors):  # deleted under the reindex (it, or its shadow with it)
            owner._update(self, state="failed", finished_at=datetime.now(UTC),
                          error=f"collection {live.name!r} was deleted during the reindex")
            raise CollectionNotFound(live.name) from None
        except BaseException as exc:
            state = "interrupted" if isinstance(exc, ReindexInterrupted) else "failed"
            owner._update(self, state=state, finished_at=datetime.now(UTC), error=str(exc) or type(exc).__name__)
            raise
        return owner._update(self, state="done", finished_at=datetime.now(UTC))

    def _shadow(self) -> CollectionRow:
        """The shadow to fill: the one an interrupted run with the same settings left, or a new one."""
        records, live = self._owner._records, self._live
        stale = None
        with records.transaction() as tx:
            if not records.collection_exists(tx, live.id):
                raise CollectionNotFound(live.name)
            found = records.shadow(tx, live.id)
            if found is not None and found.chunking == self.target:
                log.info("resuming the reindex of %r", live.name)
                return found
            if found is not None:
                stale = found
                records.delete_collection(tx, found.id)
            shadow = records.insert_collection(
                tx, self.key[0], shadow_name(live.id), live.metadata, time.time(), self.target, reindex_of=live.id
            )
            self._owner._vectors.create(shadow.chroma_name)  # inside: if Chroma refuses, the row rolls back
        self._owner._versions.add_collection(shadow.id)
        if stale is not None:
            self._drop(stale)
        return shadow

    def _copy(self, shadow: CollectionRow, stop: threading.Event | None, *, first: bool) -> None:
        """Make the shadow hold every live document at its live version; documents it already
        holds so are left alone."""
        owner, live = self._owner, self._live
        wanted = owner._records.fingerprints(live.id)
        held = owner._records.fingerprints(shadow.id)
        gone = [doc_id for doc_id in held if doc_id not in wanted]
        todo = sorted(doc_id for doc_id, fingerprint in wanted.items() if held.get(doc_id) != fingerprint)
        if first:  # the last pass only adds to `copied`
            owner._update(self, documents=len(wanted), reused=len(wanted) - len(todo))
        if gone:
            owner._ingestion.discard(shadow, gone)
        for lo in range(0, len(todo), BATCH):
            if stop is not None and stop.is_set():
                raise ReindexInterrupted(live.name)
            with owner._records.reading() as conn:
                docs = list(owner._records.current(conn, live.id, todo[lo : lo + BATCH], text=True).values())
            if docs:  # else deleted since: the last pass removes them from the shadow
                owner._ingestion.copy(shadow, docs)
            owner._update(self, copied=self.last.copied + len(docs))

    def _retire(self) -> None:
        """Delete the old index once no search can still be reading it."""
        owner, live = self._owner, self._live
        # A search resolves its collection after taking its snapshot, so every search that
        # found the old row holds a snapshot older than this barrier.
        owner._versions.settle(owner._versions.barrier())
        self._drop(live, row_gone=True)

    def _drop(self, row: CollectionRow, *, row_gone: bool = False) -> None:
        owner = self._owner
        owner._versions.drop_collection(row.id)
        if row_gone:
            owner._records.forget(row.id)
        try:
            owner._vectors.drop(row.chroma_name)
        except Exception:
            log.warning("could not delete Chroma collection %s; the next open will", row.chroma_name, exc_info=True)

