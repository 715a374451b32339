"""The adapter registry: names, content-hashed versions, the active version and its history.

This is the desired state that every engine is brought to. It lives in the service's
SQLite store and is mirrored in memory, so that resolving a request's `model` reads no
disk. A version's files live at `<adapters root>/<name>/<version>/` and never change:
a version *is* its content (the first 12 hex digits of its files' sha256).
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service.adapters.inspection import AdapterFacts
from service.errors import AdapterConflict, AdapterNotFound, InvalidRequest

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # fullmatch: "$" would let a trailing newline in
VERSION_CHARS = 12

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    active TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS adapter_versions (
    name TEXT NOT NULL REFERENCES adapters(name) ON DELETE CASCADE,
    version TEXT NOT NULL,
    facts TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS adapter_activations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    path: Path
    facts: dict[str, Any]  # AdapterFacts as stored: rank, alpha, target modules, size, manifest, eval, rag
    created: float

    @property
    def served(self) -> str:
        """The unique name the engines know this version by."""
        return f"{self.name}@{self.version}"


@dataclass
class Adapter:
    name: str
    created: float
    active: str | None = None
    versions: dict[str, Version] = field(default_factory=dict)

    def active_version(self) -> Version | None:
        return self.versions.get(self.active) if self.active else None


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise InvalidRequest(
            f"adapter name {name!r} is not valid: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            param="name",
        )
    return name


class Registry:
    def __init__(self, db_path: Path, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / ".staging", ignore_errors=True)  # uploads cut short by a crash
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._adapters = self._load()

    def close(self) -> None:
        self._db.close()

    # Reads (memory only)

    def adapters(self) -> list[Adapter]:
        return sorted(self._adapters.values(), key=lambda a: a.name)

    def get(self, name: str) -> Adapter:
        adapter = self._adapters.get(name)
        if adapter is None:
            known = ", ".join(sorted(self._adapters)) or "none"
            raise AdapterNotFound(f"adapter {name!r} does not exist; known adapters: {known}")
        return adapter

    def version(self, name: str, version: str) -> Version:
        adapter = self.get(name)
        found = adapter.versions.get(version)
        if found is None:
            known = ", ".join(adapter.versions) or "none"
            raise AdapterNotFound(f"adapter {name!r} has no version {version!r}; its versions: {known}")
        return found

    def find(self, name: str) -> Adapter | None:
        return self._adapters.get(name)

    def active(self) -> list[Version]:
        return [v for a in self._adapters.values() if (v := a.active_version()) is not None]

    def previous(self, name: str) -> str | None:
        """The version that was active before the current one (and still exists), for rollback."""
        adapter = self.get(name)
        rows = self._db.execute(
            "SELECT version FROM adapter_activations WHERE name = ? ORDER BY seq DESC", (name,)
        ).fetchall()
        for (version,) in rows:
            if version != adapter.active and version in adapter.versions:
                return version
        return None

    # Writes (SQLite first, then memory); all run on the event loop, one at a time.

    def add(self, name: str, facts: AdapterFacts, staged: Path) -> tuple[Version, bool]:
        """Move a validated, staged folder into place as a version; (version, False) if it already exists."""
        version_id = facts.content_hash[:VERSION_CHARS]
        adapter = self._adapters.get(name)
        if adapter is not None and version_id in adapter.versions:
            shutil.rmtree(staged, ignore_errors=True)
            return adapter.versions[version_id], False
        final = self.root / name / version_id
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # left by a crash between the move and the commit
            shutil.rmtree(final)
        staged.rename(final)
        now = time.time()
        stored = asdict(facts)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR IGNORE INTO adapters (name, created) VALUES (?, ?)", (name, now))
            self._db.execute(
                "INSERT INTO adapter_versions (name, version, facts, created) VALUES (?, ?, ?, ?)",
                (name, version_id, json.dumps(stored), now),
            )
        if adapter is None:
            adapter = self._adapters[name] = Adapter(name, now)
        version = Version(name, version_id, final, stored, now)
        adapter.versions[version_id] = version
        return version, True

    def set_active(self, name: str, version: str) -> None:
        self.version(name, version)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE adapters SET active = ? WHERE name = ?", (version, name))
            self._db.execute(
                "INSERT INTO adapter_activations (name, version, at) VALUES (?, ?, ?)", (name, version, time.time())
            )
        self._adapters[name].active = version

    def remove_version(self, name: str, version: str) -> Version:
        found = self.version(name, version)
        if self._adapters[name].active == version:
            raise AdapterConflict(
                f"{found.served} is the active version of {name!r}; activate another version first",
                code="version_active",
            )
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM adapter_versions WHERE name = ? AND version = ?", (name, version))
            self._db.execute("DELETE FROM adapter_activations WHERE name = ? AND version = ?", (name, version))
        del self._adapters[name].versions[version]
        shutil.rmtree(found.path, ignore_errors=True)
        return found

    def remove(self, name: str) -> Adapter:
        adapter = self.get(name)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM adapter_activations WHERE name = ?", (name,))
            self._db.execute("DELETE FROM adapters WHERE name = ?", (name,))
        del self._adapters[name]
        shutil.rmtree(self.root / name, ignore_errors=True)
        return adapter

    def _load(self) -> dict[str, Adapter]:
        adapters = {
            name: Adapter(name, created, active)
            for name, active, created in self._db.execute("SELECT name, active, created FROM adapters")
        }
        for name, version, facts, created in self._db.execute(
            "SELECT name, version, facts, created FROM adapter_versions"
        ):
            adapters[name].versions[version] = Version(name, version, self.root / name / version, json.loads(facts), created)
        return adapters

