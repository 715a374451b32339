"""The adapter registry's rows on both backends: everything it writes is what a registry opened
later (another process, another gateway) reads back, and deletes cascade."""

from __future__ import annotations

import asyncio
from pathlib import Path

from knowledge.database import Database
from service.adapters.inspection import AdapterFacts
from service.adapters.registry import Registry


def facts(digest: str) -> AdapterFacts:
    return AdapterFacts(digest * 64, 8, 16.0, ["q_proj", "v_proj"], 1234, "base-fp", {"steps": 3}, None,
                        {"collection": "statutes", "top_k": 3})


def staged(root: Path, name: str) -> Path:
    folder = root / "incoming" / name
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(name.encode())
    return folder


def snapshot(registry: Registry, tenant: str) -> list:
    return [(a.name, a.active, a.rag, a.created,
             {v: (x.facts, x.created, x.path, {s: (e.passed, e.failures, e.report, e.stored) for s, e in x.evals.items()})
              for v, x in a.versions.items()})
            for a in registry.adapters(tenant)]


def count(db: Database, table: str) -> int:
    return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_what_one_registry_writes_another_reads_and_deletes_cascade(database_url, tmp_path):
    root = tmp_path / "adapters"
    writer = Registry(Database(database_url), root)

    async def write():
        v1, made = await writer.add("acme", "legal", facts("a"), staged(tmp_path, "one"))
        assert made and v1.path.is_dir()
        again, made = await writer.add("acme", "legal", facts("a"), staged(tmp_path, "one-again"))
        assert (again, made) == (v1, False)
        await writer.set_active(v1, {"collection": "statutes", "top_k": 2})
        await writer.store_eval(v1, "suite", False, ["legal+rag facts 0.5 < 0.9"], {"cells": {}})
        await writer.store_eval(v1, "suite", True, [], {"cells": {"legal+rag": {"facts": 0.95}}})  # replaces
        v2, _ = await writer.add("acme", "legal", facts("b"), staged(tmp_path, "two"))
        await writer.set_active(v2)
        await writer.add("default", "brand", facts("c"), staged(tmp_path, "three"))
        return v1, v2

    v1, v2 = asyncio.run(write())
    assert writer.previous("acme", "legal") == v1.version
    expected = {tenant: snapshot(writer, tenant) for tenant in ("acme", "default")}
    assert expected["acme"][0][1] == v2.version and expected["acme"][0][2] == {"collection": "statutes", "top_k": 2}
    assert expected["acme"][0][4][v1.version][3]["suite"][0] is True

    reader = Registry(Database(database_url), root)  # another process on the same database
    assert {tenant: snapshot(reader, tenant) for tenant in ("acme", "default")} == expected
    assert reader.previous("acme", "legal") == v1.version
    assert sorted(v.served for v in reader.active()) == [f"acme/legal@{v2.version}"]
    reader.close()

    async def remove():
        await writer.remove_version(writer.version("acme", "legal", v1.version))
        await writer.remove(writer.get("acme", "legal"))

    asyncio.run(remove())
    assert not v1.path.exists() and not v2.path.exists()
    db = Database(database_url)
    # The adapter's versions, evals and retrieval defaults went with it; the other tenant's stayed.
    assert [count(db, t) for t in ("adapters", "adapter_versions", "adapter_evals", "adapter_retrieval")] == [1, 1, 0, 0]
    db.close()
    writer.close()
