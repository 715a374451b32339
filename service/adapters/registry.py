"""The adapter registry: names, content-hashed versions, the active version and its history.

This is the desired state that every engine is brought to. It lives in the service's
SQL store (knowledge.database) and is mirrored in memory, so that resolving a request's `model` reads no
disk. A version's files never change: a version *is* its content (the first 12 hex
digits of its files' sha256).

Every adapter belongs to a tenant, and names are the tenant's own: two tenants may each
have "legal". Inside, an adapter is known by its key, "legal" for the default tenant (as
before tenancy existed) and "acme/legal" for tenant acme ("/" is in neither a name nor a
tenant, so keys never collide). The key is what the rows hold and, with the
version, the name the engines serve it under. Files live under the tenant's area:
`<root>/<name>/<version>/` for the default tenant, `<root>/@<tenant>/<name>/<version>/`
for the others ("@" starts no name).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from anyio import to_thread

from knowledge.database import Database
from knowledge.documents import DEFAULT_TENANT
from service.adapters.inspection import AdapterFacts
from service.errors import AdapterConflict, AdapterNotFound, InvalidRequest

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # fullmatch: "$" would let a trailing newline in
VERSION_CHARS = 12
STAGING = ".staging"  # uploads being checked; starts no name, so it is no tenant's

# Migration steps (knowledge.database), only ever appended to. Times: unix seconds.
MIGRATIONS = ((
    "CREATE TABLE IF NOT EXISTS adapters (name TEXT PRIMARY KEY, active TEXT, created DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS adapter_versions ("
    " name TEXT NOT NULL REFERENCES adapters(name) ON DELETE CASCADE, version TEXT NOT NULL, facts TEXT NOT NULL,"
    " created DOUBLE PRECISION NOT NULL, PRIMARY KEY (name, version))",
    "CREATE TABLE IF NOT EXISTS adapter_activations ("
    " seq {serial}, name TEXT NOT NULL, version TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)",
    # result: JSON {"passed", "failures", "report"}
    "CREATE TABLE IF NOT EXISTS adapter_evals ("
    " name TEXT NOT NULL, version TEXT NOT NULL, suite TEXT NOT NULL, result TEXT NOT NULL,"
    " stored DOUBLE PRECISION NOT NULL, PRIMARY KEY (name, version, suite),"
    " FOREIGN KEY (name, version) REFERENCES adapter_versions(name, version) ON DELETE CASCADE)",
    # rag: JSON {"collection", "top_k"?, "mode"?}
    "CREATE TABLE IF NOT EXISTS adapter_retrieval ("
    " name TEXT PRIMARY KEY REFERENCES adapters(name) ON DELETE CASCADE, rag TEXT NOT NULL,"
    " updated DOUBLE PRECISION NOT NULL)",
),)


def adapter_key(tenant: str, name: str) -> str:
    return name if tenant == DEFAULT_TENANT else f"{tenant}/{name}"


def _split_key(key: str) -> tuple[str, str]:
    tenant, _, name = key.rpartition("/")
    return tenant or DEFAULT_TENANT, name


@dataclass(frozen=True)
class EvalResult:
    """One eval suite's verdict on a version, as the caller stored it (after the upload, unlike the
    manifest's `eval`, which is part of the version's content)."""

    suite: str
    passed: bool
    failures: list[str]
    report: dict[str, Any]
    stored: float  # unix time


@dataclass(frozen=True)
class Version:
    tenant: str
    name: str
    version: str
    path: Path
    facts: dict[str, Any]  # AdapterFacts as stored: rank, alpha, target modules, size, manifest, eval, rag
    created: float
    # By suite name. The one mutable part: results arrive after the version exists (its files never change).
    evals: dict[str, EvalResult] = field(default_factory=dict, compare=False)

    @property
    def served(self) -> str:
        """The name the engines know this version by, unique across tenants."""
        return f"{adapter_key(self.tenant, self.name)}@{self.version}"

    @property
    def labels(self) -> tuple[str, str, str]:
        """(tenant, adapter, version): its metric labels."""
        return self.tenant, self.name, self.version

    @property
    def pinned(self) -> str:
        """The name its tenant's clients pin it by (and see in answers)."""
        return f"{self.name}@{self.version}"


@dataclass
class Adapter:
    tenant: str
    name: str
    created: float
    active: str | None = None
    versions: dict[str, Version] = field(default_factory=dict)
    # Retrieval defaults set through the API ({"collection", "top_k"?, "mode"?}), or None. Per adapter,
    # not per version: which collection the adapter answers from is the operator's choice for the name,
    # which must survive activating a retrained version or rolling back (per version, every activation
    # would have to restate it, and a rollback would quietly switch collections). What one version was
    # trained for stays in its lorag.json `rag`, which applies when this is None.
    rag: dict[str, Any] | None = None

    def active_version(self) -> Version | None:
        return self.versions.get(self.active) if self.active else None

    def retrieval(self, version: Version) -> dict[str, Any] | None:
        """The retrieval defaults a chat with `version` (active or pinned) and no `rag` gets: the adapter's,
        else the version's lorag.json. Whole, not merged field by field: a top_k or filter chosen for one
        collection need not suit another."""
        return self.rag if self.rag is not None else version.facts.get("rag")


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise InvalidRequest(
            f"adapter name {name!r} is not valid: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            param="name",
        )
    return name


class Registry:
    def __init__(self, database: Database, root: Path):
        """The registry in `database` (which it owns and closes), its files under `root`."""
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / STAGING, ignore_errors=True)  # uploads cut short by a crash
        self._db = database
        database.migrate("adapters", MIGRATIONS)
        self._adapters = self._load()  # by key

    def close(self) -> None:
        self._db.close()

    def area(self, tenant: str) -> Path:
        """The folder a tenant's adapters live in."""
        return self.root if tenant == DEFAULT_TENANT else self.root / f"@{tenant}"

    # Reads (memory only)

    def adapters(self, tenant: str) -> list[Adapter]:
        return sorted((a for a in self._adapters.values() if a.tenant == tenant), key=lambda a: a.name)

    def get(self, tenant: str, name: str) -> Adapter:
        adapter = self.find(tenant, name)
        if adapter is None:
            known = ", ".join(a.name for a in self.adapters(tenant)) or "none"
            raise AdapterNotFound(f"adapter {name!r} does not exist; known adapters: {known}")
        return adapter

    def version(self, tenant: str, name: str, version: str) -> Version:
        adapter = self.get(tenant, name)
        found = adapter.versions.get(version)
        if found is None:
            known = ", ".join(adapter.versions) or "none"
            raise AdapterNotFound(f"adapter {name!r} has no version {version!r}; its versions: {known}")
        return found

    def find(self, tenant: str, name: str) -> Adapter | None:
        return self._adapters.get(adapter_key(tenant, name))

    def served(self, served: str) -> Version | None:
        """The version an engine-side name stands for, of any tenant."""
        key, _, version = served.partition("@")
        adapter = self._adapters.get(key)
        return adapter.versions.get(version) if adapter else None

    def active(self) -> list[Version]:
        """Every tenant's active versions: what every engine must have loaded."""
        return [v for a in self._adapters.values() if (v := a.active_version()) is not None]

    def previous(self, tenant: str, name: str) -> str | None:
        """The version that was active before the current one (and still exists), for rollback."""
        adapter = self.get(tenant, name)
        rows = self._db.execute(
            "SELECT version FROM adapter_activations WHERE name = ? ORDER BY seq DESC", (adapter_key(tenant, name),)
        ).fetchall()
        for (version,) in rows:
            if version != adapter.active and version in adapter.versions:
                return version
        return None

    # Writes, one at a time (the service's lock): the commit and the files in a worker thread,
    # so the event loop never waits on the disk; memory on the loop, where requests read it.

    async def add(self, tenant: str, name: str, facts: AdapterFacts, staged: Path) -> tuple[Version, bool]:
        """Move a validated, staged folder into place as a version; (version, False) if it already exists."""
        version_id = facts.content_hash[:VERSION_CHARS]
        key = adapter_key(tenant, name)
        adapter = self._adapters.get(key)
        if adapter is not None and version_id in adapter.versions:
            await to_thread.run_sync(partial(shutil.rmtree, staged, ignore_errors=True))
            return adapter.versions[version_id], False
        final = self.area(tenant) / name / version_id
        now = time.time()
        stored = asdict(facts)
        await to_thread.run_sync(self._store, key, version_id, stored, now, staged, final)
        if adapter is None:
            adapter = self._adapters[key] = Adapter(tenant, name, now)
        version = Version(tenant, name, version_id, final, stored, now)
        adapter.versions[version_id] = version
        return version, True

    def _store(self, key: str, version_id: str, stored: dict, now: float, staged: Path, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # left by a crash between the move and the commit
            shutil.rmtree(final)
        staged.rename(final)
        self._commit([
            ("INSERT INTO adapters (name, created) VALUES (?, ?) ON CONFLICT (name) DO NOTHING", (key, now)),
            ("INSERT INTO adapter_versions (name, version, facts, created) VALUES (?, ?, ?, ?)",
             (key, version_id, json.dumps(stored), now)),
        ])

    async def set_active(self, version: Version, rag: dict[str, Any] | None = None) -> None:
        """Flip the alias to `version`; with `rag`, set the adapter's retrieval defaults in the same commit,
        so no request sees the new version with the old defaults."""
        key = adapter_key(version.tenant, version.name)
        now = time.time()
        statements = [
            ("UPDATE adapters SET active = ? WHERE name = ?", (version.version, key)),
            ("INSERT INTO adapter_activations (name, version, at) VALUES (?, ?, ?)", (key, version.version, now)),
        ]
        if rag is not None:
            statements.append(self._retrieval_row(key, rag, now))
        await to_thread.run_sync(self._commit, statements)
        adapter = self._adapters[key]
        adapter.active = version.version
        if rag is not None:
            adapter.rag = rag

    async def set_rag(self, adapter: Adapter, rag: dict[str, Any] | None) -> None:
        """Set (or, with None, clear) the adapter's retrieval defaults."""
        key = adapter_key(adapter.tenant, adapter.name)
        statement = (self._retrieval_row(key, rag, time.time()) if rag is not None
                     else ("DELETE FROM adapter_retrieval WHERE name = ?", (key,)))
        await to_thread.run_sync(self._commit, [statement])
        adapter.rag = rag

    @staticmethod
    def _retrieval_row(key: str, rag: dict[str, Any], now: float) -> tuple[str, tuple]:
        return ("INSERT INTO adapter_retrieval (name, rag, updated) VALUES (?, ?, ?) ON CONFLICT (name) "
                "DO UPDATE SET rag = excluded.rag, updated = excluded.updated", (key, json.dumps(rag), now))

    async def store_eval(
        self, version: Version, suite: str, passed: bool, failures: list[str], report: dict[str, Any]
    ) -> EvalResult:
        """Store a suite's result for `version`, replacing that suite's earlier one."""
        result = EvalResult(suite, passed, failures, report, time.time())
        row = json.dumps({"passed": passed, "failures": failures, "report": report})
        await to_thread.run_sync(self._commit, [(
            "INSERT INTO adapter_evals (name, version, suite, result, stored) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (name, version, suite) DO UPDATE SET result = excluded.result, stored = excluded.stored",
            (adapter_key(version.tenant, version.name), version.version, suite, row, result.stored),
        )])
        version.evals[suite] = result
        return result

    async def remove_version(self, found: Version) -> None:
        key = adapter_key(found.tenant, found.name)
        adapter = self._adapters[key]
        if adapter.active == found.version:
            raise AdapterConflict(
                f"{found.pinned} is the active version of {found.name!r}; activate another version first",
                code="version_active",
            )
        # Out of memory before the first await: from here no request can resolve it (and hold it).
        del adapter.versions[found.version]
        try:
            await to_thread.run_sync(self._commit, [
                ("DELETE FROM adapter_versions WHERE name = ? AND version = ?", (key, found.version)),
                ("DELETE FROM adapter_activations WHERE name = ? AND version = ?", (key, found.version)),
            ], found.path)
        except Exception:  # not committed: it still exists
            adapter.versions[found.version] = found
            raise

    async def remove(self, adapter: Adapter) -> None:
        key = adapter_key(adapter.tenant, adapter.name)
        del self._adapters[key]  # before the first await, as in remove_version
        try:
            await to_thread.run_sync(self._commit, [
                ("DELETE FROM adapter_activations WHERE name = ?", (key,)),
                ("DELETE FROM adapters WHERE name = ?", (key,)),
            ], self.area(adapter.tenant) / adapter.name)
        except Exception:  # not committed: it still exists
            self._adapters[key] = adapter
            raise

    def _commit(self, statements: list[tuple[str, tuple]], remove: Path | None = None) -> None:
        """Run `statements` in one transaction, then delete the folder `remove` whose rows they deleted."""
        with self._db.transaction():
            for sql, params in statements:
                self._db.execute(sql, params)
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)

    def _load(self) -> dict[str, Adapter]:
        adapters = {}
        for key, active, created in self._db.execute("SELECT name, active, created FROM adapters"):
            adapters[key] = Adapter(*_split_key(key), created, active)
        for key, version, facts, created in self._db.execute(
            "SELECT name, version, facts, created FROM adapter_versions"
        ):
            adapter = adapters[key]
            path = self.area(adapter.tenant) / adapter.name / version
            adapter.versions[version] = Version(adapter.tenant, adapter.name, version, path, json.loads(facts), created)
        for key, version, suite, result, stored in self._db.execute(
            "SELECT name, version, suite, result, stored FROM adapter_evals"
        ):
            fields = json.loads(result)
            adapters[key].versions[version].evals[suite] = EvalResult(
                suite, fields["passed"], fields["failures"], fields["report"], stored
            )
        for key, rag in self._db.execute("SELECT name, rag FROM adapter_retrieval"):
            adapters[key].rag = json.loads(rag)
        return adapters
