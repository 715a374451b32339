"""The SQL store lorag keeps its state in: SQLite in a file by default, PostgreSQL by URL, so
that several gateways can share one truth.

Callers write one SQL text, with `?` placeholders and types both backends read the same
(TEXT, INTEGER, DOUBLE PRECISION: PostgreSQL's REAL is single precision, too coarse for a
unix time). A schema changes only by numbered migration steps, recorded per component in
`schema_migrations` and applied when a store opens, under a lock, so two processes opening
one database at once apply each step exactly once.

It lives in the lowest package so that the knowledge base, the adapter registry and the key
store can share it without the knowledge base depending on the service.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SQLITE = "sqlite:///"
POSTGRES = ("postgresql://", "postgres://")
# pg_advisory_xact_lock key for migrations: any fixed number; "lorag" in ASCII.
MIGRATION_LOCK = 0x6C6F726167

# One statement, several run in order, or a function for what SQL alone cannot say portably.
Step = str | tuple[str, ...] | Callable[["Database"], None]


class DatabaseError(Exception):
    """The database cannot be opened or migrated as asked; the message says why."""


class Database:
    def __init__(self, url: str):
        """`sqlite:///PATH` (a file, created with its folder) or `postgresql://USER@HOST:PORT/NAME`."""
        self.url = url
        # One connection, shared by threads: a statement or a transaction holds the lock, so
        # no thread's statement lands inside another's transaction.
        self._lock = threading.RLock()
        if url.startswith(SQLITE):
            path = Path(url[len(SQLITE):])
            path.parent.mkdir(parents=True, exist_ok=True)
            self.dialect = "sqlite"
            self._db: Any = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=10000")  # another process's write: wait, do not fail
        elif url.startswith(POSTGRES):
            import psycopg

            self.dialect = "postgresql"
            try:
                self._db = psycopg.connect(url, autocommit=True, connect_timeout=10)
            except psycopg.OperationalError as exc:
                raise DatabaseError(f"cannot connect to PostgreSQL at {_safe(url)}: {exc}") from None
        else:
            raise DatabaseError(f"database URL {_safe(url)!r} is neither sqlite:///PATH nor postgresql://...")

    @classmethod
    def sqlite(cls, path: Path) -> Database:
        return cls(f"{SQLITE}{path}")

    def close(self) -> None:
        self._db.close()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; the cursor it returns iterates rows and has fetchone, fetchall, rowcount."""
        if self.dialect == "postgresql":
            sql = sql.replace("%", "%%").replace("?", "%s")
        with self._lock:
            return self._db.execute(sql, params)

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """Statements inside commit together or not at all; SQLite's is taken for writing at once."""
        with self._lock:
            if self.dialect == "postgresql":
                with self._db.transaction():
                    yield self
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def migrate(self, component: str, steps: Sequence[Step]) -> int:
        """Apply `component`'s steps it has not had yet, each recorded with its number (from 1), in
        one transaction; returns how many ran. Steps are only ever appended to."""
        with self.transaction():
            if self.dialect == "postgresql":  # SQLite's BEGIN IMMEDIATE already excludes other writers
                self.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            self.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (component TEXT NOT NULL, version INTEGER NOT NULL, "
                "applied DOUBLE PRECISION NOT NULL, PRIMARY KEY (component, version))"
            )
            done = self.execute(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations WHERE component = ?", (component,)
            ).fetchone()[0]
            if done > len(steps):
                raise DatabaseError(
                    f"the database's {component} schema is at version {done}, newer than this lorag knows "
                    f"({len(steps)}): upgrade lorag, or point it at another database"
                )
            for version, step in enumerate(steps[done:], done + 1):
                if callable(step):
                    step(self)
                else:
                    for statement in (step,) if isinstance(step, str) else step:
                        self.execute(statement)
                self.execute(
                    "INSERT INTO schema_migrations (component, version, applied) VALUES (?, ?, ?)",
                    (component, version, time.time()),
                )
            return len(steps) - done

    def version(self, component: str) -> int:
        """The last migration step applied for `component` (0: none)."""
        if "version" not in self.columns("schema_migrations"):
            return 0
        row = self.execute("SELECT MAX(version) FROM schema_migrations WHERE component = ?", (component,))
        return row.fetchone()[0] or 0

    def columns(self, table: str) -> set[str]:
        if self.dialect == "sqlite":
            return {row[1] for row in self.execute(f"PRAGMA table_info({table})")}
        rows = self.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ?", (table,)
        )
        return {row[0] for row in rows}

    def add_column(self, table: str, column: str, kind: str) -> None:
        """Add a column unless the table has it (a database made before migrations were recorded may)."""
        if column not in self.columns(table):
            self.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def _safe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}" if ":" in credentials else url
