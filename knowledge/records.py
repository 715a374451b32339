"""The SQL side (knowledge.database: SQLite or PostgreSQL): collections (each a tenant's),
documents (the source of truth for active versions), the chunks of active versions, and write
intents; plus each collection's in-memory keyword index (keywords.py), which follows the chunks
table commit by commit.

One writer connection behind a lock (SQLite allows one writer anyway); readers take
connections from a small pool so that searches never wait for a write (SQLite in WAL mode).
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from knowledge.chunking import Chunk, Chunking
from knowledge.database import COLUMN_TYPES, Database, redacted
from knowledge.documents import DEFAULT_TENANT, Metadata, canonical_json
from knowledge.keywords import KeywordIndex, MissingIndex, build

# A name means something only inside its tenant: two tenants may each have "contracts".
COLLECTIONS = """(
    id {serial},  -- never reused: names the Chroma collection
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    chroma_name TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    chunking TEXT NOT NULL DEFAULT '',  -- chunking.Chunking as JSON
    reindex_of INTEGER,  -- a reindex's shadow: the id of the collection it will replace; NULL: live
    UNIQUE (tenant, name)
)"""
TABLES = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS collections {COLLECTIONS}",
    """CREATE TABLE IF NOT EXISTS documents (
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    doc_id TEXT NOT NULL,
    version INTEGER NOT NULL,  -- the active version
    content_hash TEXT NOT NULL,
    metadata TEXT NOT NULL,
    text TEXT NOT NULL,
    chunks INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (collection_id, doc_id)
)""",
    # Chunks of active versions, plus for a moment the previous version's (until no search
    # that may still accept it is running). metadata: the document's, for keyword filters.
    # The keyword index is built from `text` at open.
    """CREATE TABLE IF NOT EXISTS chunks (
    id {rowid},
    collection_id INTEGER NOT NULL,
    doc_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    UNIQUE (collection_id, doc_id, version, idx)
)""",
    # A document write under way: written before its chunks reach Chroma, removed once the
    # old version is gone. Left-over rows after a crash name the only documents to repair.
    """CREATE TABLE IF NOT EXISTS intents (
    collection_id INTEGER NOT NULL,
    doc_id TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (collection_id, doc_id)
)""",
)

READERS_KEPT = 8
REBUILD_BATCH = 50_000  # chunk rows per keyword segment built at open


@dataclass(frozen=True)
class CollectionRow:
    id: int
    name: str
    chroma_name: str
    metadata: Metadata
    created_at: float
    chunking: Chunking


_COLLECTION = "c.id, c.name, c.chroma_name, c.metadata, c.created_at, c.chunking"


def _collection(row: Sequence) -> CollectionRow:
    return CollectionRow(row[0], row[1], row[2], json.loads(row[3]), row[4], Chunking.from_json(row[5]))


def shadow_name(live_id: int) -> str:
    # "~" is outside COLLECTION_NAME's alphabet: no caller can name, find or collide with a shadow.
    return f"~reindex-{live_id}"


@dataclass(frozen=True)
class DocumentRow:
    doc_id: str
    version: int
    content_hash: str
    metadata: Metadata
    chunks: int
    created_at: float
    updated_at: float
    text: str | None = None


@dataclass(frozen=True)
class ChunkRow:
    doc_id: str
    version: int
    index: int
    start: int
    end: int
    text: str
    metadata: Metadata


@dataclass(frozen=True)
class Publication:
    """A new active version of one document, ready to flip in."""

    doc_id: str
    version: int
    content_hash: str
    metadata: Metadata
    text: str
    chunks: Sequence[Chunk]
    # A reindex copies a document with its own times; None: the time of the write.
    created_at: float | None = None
    updated_at: float | None = None


# Stores written before the in-memory keyword index have an FTS5 table per collection that
# nothing reads or updates any more; a migration drops them.
OLD_FTS_TABLE = re.compile(r"fts_\d+")


def _add_tenants(db: Database) -> None:
    """Give a store made before tenancy its tenant column; its collections become DEFAULT_TENANT's.

    SQLite cannot drop the old UNIQUE (name) in place, so the table is rebuilt the documented
    way (sqlite.org/lang_altertable.html, "other kinds of schema changes"): new table, copy
    with the same ids, drop, rename; foreign keys off (migrations run so), in one transaction.
    A store made since (every PostgreSQL one) has the column already.
    """
    if "tenant" in db.columns("collections"):
        return
    (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'collections'").fetchone()
    db.execute(f"CREATE TABLE collections_new {COLLECTIONS}".replace("{serial}", COLUMN_TYPES["sqlite"]["{serial}"]))
    db.execute(
        "INSERT INTO collections_new (id, tenant, name, chroma_name, metadata, created_at)"
        " SELECT id, ?, name, chroma_name, metadata, created_at FROM collections",
        (DEFAULT_TENANT,),
    )
    db.execute("DROP TABLE collections")
    db.execute("ALTER TABLE collections_new RENAME TO collections")
    # The copy left the id counter at the highest id still there (or none); a deleted
    # collection's id above it must stay unused, or a new one would take its Chroma name.
    db.execute("DELETE FROM sqlite_sequence WHERE name = 'collections'")
    db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('collections', ?)", (seq,))
    broken = db.execute("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise RuntimeError(f"adding tenants to {redacted(db.url)} left rows without their collection: {broken[:5]}")


def _add_chunking(db: Database) -> None:
    db.add_column("collections", "chunking", "TEXT NOT NULL DEFAULT ''")
    db.add_column("collections", "reindex_of", "INTEGER")


def _drop_fts_tables(db: Database) -> None:
    if db.dialect == "sqlite":
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            if OLD_FTS_TABLE.fullmatch(name):
                db.execute(f"DROP TABLE {name}")


# Migration steps (knowledge.database), only ever appended to. Steps 2 to 4 bring stores made
# before migrations were recorded up to date, and change nothing in a store made since.
MIGRATIONS = (TABLES, _add_tenants, _add_chunking, _drop_fts_tables)


class RecordStore:
    def __init__(self, database: Database, chunking: Chunking):
        """The records in `database`, which the store owns (closes). `chunking`: what to record for
        collections made before chunking was recorded (the settings they were most likely
        written with: the ones in force now)."""
        self._db = database
        self._write_lock = threading.Lock()
        # Run after the open transaction commits (or rolls back), still under the write lock:
        # the keyword indexes change only with what the database durably holds.
        self._on_commit: list[Callable[[], None]] = []
        self._on_rollback: list[Callable[[], None]] = []
        self._keywords: dict[int, KeywordIndex] = {}
        self._readers: list[Database] = []
        self._readers_lock = threading.Lock()
        database.migrate("knowledge", MIGRATIONS)
        with self.transaction() as tx:
            tx.execute("UPDATE collections SET chunking = ? WHERE chunking = ''", (chunking.to_json(),))
            row = tx.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
            if row is None:
                # Names this store's Chroma collections, so that several stores can share one
                # Chroma server without touching each other's collections.
                row = (uuid.uuid4().hex[:12],)
                tx.execute("INSERT INTO meta VALUES ('instance', ?)", row)
        self.instance = row[0]
        self._load_keywords()

    def _load_keywords(self) -> None:
        with self.transaction() as tx:
            # The old index's rows, if a process stopped between a reindex's cut-over and its clean-up.
            tx.execute("DELETE FROM chunks WHERE collection_id NOT IN (SELECT id FROM collections)")
        with self.reading() as conn:
            for (cid,) in conn.execute("SELECT id FROM collections").fetchall():
                index = self._keywords[cid] = KeywordIndex()
                rows = conn.execute("SELECT id, text FROM chunks WHERE collection_id = ?", (cid,))
                # A batch at a time: building a million chunks in one go peaked at 11.7 GiB
                # (bench/keyword_index_bench.py); segments merge as they do after writes.
                while batch := rows.fetchmany(REBUILD_BATCH):
                    index.add(build([r[0] for r in batch], [r[1] for r in batch]))

    def close(self) -> None:
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        with self._write_lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        with self._write_lock:
            try:
                with self._db.transaction():
                    yield self._db
            except BaseException:
                undo = self._on_rollback[::-1]
                self._on_commit.clear()
                self._on_rollback.clear()
                for action in undo:
                    action()
                raise
            done = list(self._on_commit)
            self._on_commit.clear()
            self._on_rollback.clear()
            for action in done:
                action()

    @contextmanager
    def reading(self) -> Iterator[Database]:
        with self._readers_lock:
            conn = self._readers.pop() if self._readers else None
        if conn is None:
            conn = Database(self._db.url, readonly=True)
        try:
            yield conn
        finally:
            with self._readers_lock:
                if len(self._readers) < READERS_KEPT:
                    self._readers.append(conn)
                    conn = None
            if conn is not None:
                conn.close()

    # Collections

    def collection(self, tenant: str, name: str, conn: Database | None = None) -> CollectionRow | None:
        sql = f"SELECT {_COLLECTION} FROM collections c WHERE tenant = ? AND name = ? AND reindex_of IS NULL"
        if conn is not None:
            row = conn.execute(sql, (tenant, name)).fetchone()
        else:
            with self.reading() as reader:
                row = reader.execute(sql, (tenant, name)).fetchone()
        return None if row is None else _collection(row)

    def collections(self, tenant: str) -> list[tuple[CollectionRow, int]]:
        with self.reading() as conn:
            rows = conn.execute(
                f"SELECT {_COLLECTION}, (SELECT COUNT(*) FROM documents d WHERE d.collection_id = c.id)"
                " FROM collections c WHERE tenant = ? AND reindex_of IS NULL ORDER BY name",
                (tenant,),
            ).fetchall()
        return [(_collection(r), r[6]) for r in rows]

    def shadow(self, conn: Database, live_id: int) -> CollectionRow | None:
        """The shadow an unfinished reindex of collection `live_id` is building, if any."""
        row = conn.execute(f"SELECT {_COLLECTION} FROM collections c WHERE reindex_of = ?", (live_id,)).fetchone()
        return None if row is None else _collection(row)

    def chroma_names(self) -> set[str]:
        """Every tenant's: what the Chroma side should hold."""
        with self.reading() as conn:
            return {name for (name,) in conn.execute("SELECT chroma_name FROM collections")}

    def count_documents(self, collection_id: int) -> int:
        with self.reading() as conn:
            row = conn.execute("SELECT COUNT(*) FROM documents WHERE collection_id = ?", (collection_id,)).fetchone()
        return row[0]

    def insert_collection(
        self, tx: Database, tenant: str, name: str, metadata: Metadata, now: float, chunking: Chunking,
        reindex_of: int | None = None,
    ) -> CollectionRow:
        (cid,) = tx.execute(
            "INSERT INTO collections (tenant, name, chroma_name, metadata, created_at, chunking, reindex_of)"
            " VALUES (?, ?, '', ?, ?, ?, ?) RETURNING id",
            (tenant, name, canonical_json(metadata), now, chunking.to_json(), reindex_of),
        ).fetchone()
        chroma_name = f"lorag-{self.instance}-{cid}"
        tx.execute("UPDATE collections SET chroma_name = ? WHERE id = ?", (chroma_name, cid))
        # In place before the commit, so that no search finds the collection without its index.
        self._keywords[cid] = KeywordIndex()
        self._on_rollback.append(lambda: self._keywords.pop(cid, None))
        return CollectionRow(cid, name, chroma_name, metadata, now, chunking)

    def delete_collection(self, tx: Database, collection_id: int) -> None:
        self._on_commit.append(lambda: self._keywords.pop(collection_id, None))
        for table in ("chunks", "intents", "documents"):
            tx.execute(f"DELETE FROM {table} WHERE collection_id = ?", (collection_id,))
        tx.execute("DELETE FROM collections WHERE id = ?", (collection_id,))

    def cut_over(self, tx: Database, live: CollectionRow, shadow: CollectionRow) -> None:
        """The shadow becomes the collection (name, metadata, creation time); the live row and its
        documents go. Its chunk rows and keyword index stay for the searches still reading them,
        until `forget`."""
        for table in ("intents", "documents"):
            tx.execute(f"DELETE FROM {table} WHERE collection_id = ?", (live.id,))
        tx.execute("DELETE FROM collections WHERE id = ?", (live.id,))
        tx.execute(
            "UPDATE collections SET name = ?, metadata = ?, created_at = ?, reindex_of = NULL WHERE id = ?",
            (live.name, canonical_json(live.metadata), live.created_at, shadow.id),
        )

    def forget(self, collection_id: int) -> None:
        """Drop a replaced collection's chunk rows and keyword index (its row is already gone)."""
        with self.transaction() as tx:
            tx.execute("DELETE FROM chunks WHERE collection_id = ?", (collection_id,))
        self._keywords.pop(collection_id, None)

    def collection_exists(self, tx: Database, collection_id: int) -> bool:
        return tx.execute("SELECT 1 FROM collections WHERE id = ?", (collection_id,)).fetchone() is not None

    # Documents

    def document(self, collection_id: int, doc_id: str, *, text: bool = True) -> DocumentRow | None:
        columns = "doc_id, version, content_hash, metadata, chunks, created_at, updated_at" + (", text" if text else "")
        with self.reading() as conn:
            row = conn.execute(
                f"SELECT {columns} FROM documents WHERE collection_id = ? AND doc_id = ?", (collection_id, doc_id)
            ).fetchone()
        return None if row is None else _document(row)

    def documents_page(self, collection_id: int, limit: int, after: str | None) -> list[DocumentRow]:
        with self.reading() as conn:
            rows = conn.execute(
                "SELECT doc_id, version, content_hash, metadata, chunks, created_at, updated_at FROM documents"
                " WHERE collection_id = ? AND doc_id > ? ORDER BY doc_id LIMIT ?",
                (collection_id, after if after is not None else "", limit),
            ).fetchall()
        return [_document(row) for row in rows]

    def fingerprints(self, collection_id: int) -> dict[str, tuple[int, str]]:
        """doc_id → (active version, content hash) of every document in the collection."""
        with self.reading() as conn:
            rows = conn.execute(
                "SELECT doc_id, version, content_hash FROM documents WHERE collection_id = ?", (collection_id,)
            ).fetchall()
        return {doc_id: (version, digest) for doc_id, version, digest in rows}

    def current(
        self, conn: Database, collection_id: int, doc_ids: Iterable[str], *, text: bool = False
    ) -> dict[str, DocumentRow]:
        """Active version, hash and chunk count (and text) of each listed document that exists."""
        found = {}
        columns = "doc_id, version, content_hash, metadata, chunks, created_at, updated_at" + (", text" if text else "")
        for doc_id in doc_ids:
            row = conn.execute(
                f"SELECT {columns} FROM documents WHERE collection_id = ? AND doc_id = ?",
                (collection_id, doc_id),
            ).fetchone()
            if row is not None:
                found[doc_id] = _document(row)
        return found

    def active_versions(self) -> dict[int, dict[str, int]]:
        active: dict[int, dict[str, int]] = {}
        with self.reading() as conn:
            for (cid,) in conn.execute("SELECT id FROM collections"):
                active[cid] = {}
            for cid, doc_id, version in conn.execute("SELECT collection_id, doc_id, version FROM documents"):
                active[cid][doc_id] = version
        return active

    def publish(self, tx: Database, collection_id: int, docs: Sequence[Publication], now: float) -> None:
        """Make each document's new version the active one (its chunks already in Chroma)."""
        ids: list[int] = []
        texts: list[str] = []
        for doc in docs:
            meta = canonical_json(doc.metadata)
            tx.execute(
                "INSERT INTO documents (collection_id, doc_id, version, content_hash, metadata, text, chunks,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (collection_id, doc_id) DO UPDATE SET version = excluded.version,"
                " content_hash = excluded.content_hash, metadata = excluded.metadata, text = excluded.text,"
                " chunks = excluded.chunks, updated_at = excluded.updated_at",
                (collection_id, doc.doc_id, doc.version, doc.content_hash, meta, doc.text, len(doc.chunks),
                 doc.created_at or now, doc.updated_at or now),
            )
            tx.executemany(
                'INSERT INTO chunks (collection_id, doc_id, version, idx, start, "end", text, metadata)'
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(collection_id, doc.doc_id, doc.version, c.index, c.start, c.end, c.text, meta) for c in doc.chunks],
            )
            for row_id, text in tx.execute(
                "SELECT id, text FROM chunks WHERE collection_id = ? AND doc_id = ? AND version = ?",
                (collection_id, doc.doc_id, doc.version),
            ):
                ids.append(row_id)
                texts.append(text)
        index = self._keywords.get(collection_id)
        if index is not None:  # None: deleted under this write, which the caller finds out
            segment = build(ids, texts)
            self._on_commit.append(lambda: index.add(segment))

    def remove_document(self, tx: Database, collection_id: int, doc_id: str) -> None:
        tx.execute("DELETE FROM documents WHERE collection_id = ? AND doc_id = ?", (collection_id, doc_id))

    def drop_chunks(self, tx: Database, collection_id: int, doc_id: str, keep_version: int | None) -> None:
        """Delete the document's chunk rows (and their keyword postings) except those of `keep_version`."""
        keep = -1 if keep_version is None else keep_version
        gone = [
            row_id
            for (row_id,) in tx.execute(
                "DELETE FROM chunks WHERE collection_id = ? AND doc_id = ? AND version != ? RETURNING id",
                (collection_id, doc_id, keep),
            ).fetchall()
        ]
        index = self._keywords.get(collection_id)
        if gone and index is not None:
            self._on_commit.append(lambda: index.remove(gone))

    # Intents

    def add_intents(self, tx: Database, collection_id: int, doc_ids: Iterable[str], now: float) -> list[str]:
        """Record writes under way; returns the documents that already had one (a failed earlier write)."""
        leftover = []
        for doc_id in doc_ids:
            cursor = tx.execute(
                "INSERT INTO intents VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (collection_id, doc_id, now)
            )
            if cursor.rowcount == 0:
                leftover.append(doc_id)
        return leftover

    def clear_intents(self, tx: Database, collection_id: int, doc_ids: Iterable[str]) -> None:
        tx.executemany(
            "DELETE FROM intents WHERE collection_id = ? AND doc_id = ?", [(collection_id, d) for d in doc_ids]
        )

    def intents(self) -> list[tuple[CollectionRow, str]]:
        with self.reading() as conn:
            rows = conn.execute(
                f"SELECT {_COLLECTION}, i.doc_id FROM intents i JOIN collections c ON c.id = i.collection_id"
            ).fetchall()
        return [(_collection(r), r[6]) for r in rows]

    # Search

    def keywords(self, collection_id: int) -> KeywordIndex:
        index = self._keywords.get(collection_id)
        if index is None:
            raise MissingIndex(collection_id)
        return index

    def chunks_by_id(
        self, conn: Database, collection_id: int, ids: Sequence[int], where: str, params: Sequence[object]
    ) -> dict[int, ChunkRow]:
        """The rows among `ids` that still exist and pass the SQL filter `where` (over c.metadata, in
        this connection's dialect)."""
        if not ids:
            return {}
        columns = 'c.id, c.doc_id, c.version, c.idx, c.start, c."end", c.text, c.metadata'
        if conn.dialect == "postgresql":
            rows = conn.execute(
                f"SELECT {columns} FROM chunks c WHERE c.id = ANY(?) AND c.collection_id = ? AND ({where})",
                ([int(i) for i in ids], collection_id, *params),
            ).fetchall()
        else:
            # CROSS JOIN fixes the plan: a rowid lookup per id. Left to itself, SQLite scans the
            # collection's whole (collection_id, ...) index instead.
            rows = conn.execute(
                f"SELECT {columns} FROM json_each(?) AS wanted CROSS JOIN chunks c ON c.id = wanted.value"
                f" WHERE c.collection_id = ? AND ({where})",
                (json.dumps([int(i) for i in ids]), collection_id, *params),
            ).fetchall()
        return {r[0]: ChunkRow(*r[1:7], json.loads(r[7])) for r in rows}

    def chunk(
        self, conn: Database, collection_id: int, doc_id: str, version: int, idx: int
    ) -> ChunkRow | None:
        row = conn.execute(
            'SELECT doc_id, version, idx, start, "end", text, metadata FROM chunks'
            " WHERE collection_id = ? AND doc_id = ? AND version = ? AND idx = ?",
            (collection_id, doc_id, version, idx),
        ).fetchone()
        return None if row is None else ChunkRow(*row[:6], json.loads(row[6]))


def _document(row: Sequence) -> DocumentRow:
    return DocumentRow(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6], *row[7:])
