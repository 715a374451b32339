"""Which version of each document a search may see, and when an old version may be deleted.

Chroma cannot flip a document's chunks atomically, so both versions sit in it for a moment,
and a search filters hits by this map instead:

- every flip (a document's active version changing, or a document being deleted) takes the
  next sequence number and remembers the version it replaced;
- a search takes the current sequence number when it starts and accepts (doc, v) only if v
  was active at that number: the new version if the flip came before, else the previous one;
- an old version's chunks are deleted only after every search that started before its flip
  has finished (`settle`), so a search never loses the version it accepts.

Hence a search sees every document at exactly one version, never zero and never two.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager


class Versions:
    def __init__(self, active: Mapping[int, Mapping[str, int]] | None = None):
        self._cond = threading.Condition()
        self._seq = 0
        self._readers: Counter[int] = Counter()  # start sequence → searches running since it
        # collection id → doc_id → active version (absent: no such document)
        self._active: dict[int, dict[str, int]] = {cid: dict(docs) for cid, docs in (active or {}).items()}
        # (collection id, doc_id) → (version before the flip or None, the flip's sequence number);
        # kept only until the flip is settled
        self._moving: dict[tuple[int, str], tuple[int | None, int]] = {}

    @contextmanager
    def reading(self) -> Iterator[int]:
        """Hold the returned sequence number for the duration of one search."""
        with self._cond:
            seq = self._seq
            self._readers[seq] += 1
        try:
            yield seq
        finally:
            with self._cond:
                self._readers[seq] -= 1
                if not self._readers[seq]:
                    del self._readers[seq]
                    self._cond.notify_all()

    def visible(self, seq: int, collection_id: int, doc_ids: Iterable[str]) -> dict[str, int]:
        """The version of each document a search that started at `seq` sees (absent: none)."""
        seen: dict[str, int] = {}
        with self._cond:
            active = self._active.get(collection_id, {})
            for doc_id in doc_ids:
                version = active.get(doc_id)
                moving = self._moving.get((collection_id, doc_id))
                if moving is not None and moving[1] > seq:
                    version = moving[0]
                if version is not None:
                    seen[doc_id] = version
        return seen

    def add_collection(self, collection_id: int) -> None:
        with self._cond:
            self._active.setdefault(collection_id, {})

    def drop_collection(self, collection_id: int) -> int:
        """Forget a collection; returns the sequence number to `settle` before deleting its vectors."""
        with self._cond:
            self._seq += 1
            self._active.pop(collection_id, None)
            for key in [key for key in self._moving if key[0] == collection_id]:
                del self._moving[key]
            return self._seq

    def flip(self, collection_id: int, changes: Mapping[str, int | None]) -> int:
        """Make each document's new version (None: deleted) the one new searches see.

        Call after the change is committed to SQLite. Returns the flip's sequence number.
        """
        with self._cond:
            self._seq += 1
            active = self._active.setdefault(collection_id, {})
            for doc_id, version in changes.items():
                self._moving[(collection_id, doc_id)] = (active.get(doc_id), self._seq)
                if version is None:
                    active.pop(doc_id, None)
                else:
                    active[doc_id] = version
            return self._seq

    def barrier(self) -> int:
        """The next sequence number, changing nothing: settling it waits out every search running now."""
        with self._cond:
            self._seq += 1
            return self._seq

    def settle(self, seq: int, collection_id: int | None = None, doc_ids: Iterable[str] = ()) -> None:
        """Wait until no search that started before flip `seq` is running; then forget the old versions."""
        with self._cond:
            self._cond.wait_for(lambda: not self._readers or min(self._readers) >= seq)
            for doc_id in doc_ids:
                key = (collection_id, doc_id)
                if key in self._moving and self._moving[key][1] == seq:
                    del self._moving[key]
