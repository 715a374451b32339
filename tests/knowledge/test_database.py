"""The SQL store on both backends: versioned migrations, and the key store over it, on SQLite
and on a real PostgreSQL server."""

from __future__ import annotations

import threading
import time

import pytest

from knowledge.database import Database, DatabaseError
from service.auth.keys import KeyRefused, KeyStore
from service.engine.launcher import free_port

STEPS = (
    "CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
    ("INSERT INTO things (id, name) VALUES (1, 'first')", "INSERT INTO things (id, name) VALUES (2, 'second')"),
)


def test_migrations_run_once_in_order_and_only_the_new_steps_later(database_url):
    db = Database(database_url)
    assert db.version("things") == 0
    assert db.migrate("things", STEPS) == 2
    assert db.migrate("things", STEPS) == 0  # opening again changes nothing
    db.close()

    db = Database(database_url)
    later = (*STEPS, lambda d: d.add_column("things", "size", "INTEGER"), "UPDATE things SET size = id * 10")
    assert db.migrate("things", later) == 2
    assert db.version("things") == 4
    assert db.execute("SELECT id, name, size FROM things ORDER BY id").fetchall() == [(1, "first", 10), (2, "second", 20)]
    assert db.version("other") == 0  # versions are per component

    with pytest.raises(DatabaseError, match="things schema is at version 4, newer than this lorag knows"):
        db.migrate("things", STEPS)
    db.close()


def test_a_failing_step_leaves_the_schema_as_it_was(database_url):
    db = Database(database_url)
    db.migrate("things", STEPS[:1])
    broken = (*STEPS, "INSERT INTO things (id, name) VALUES (1, 'duplicate')")
    with pytest.raises(Exception, match="(?i)unique|duplicate"):
        db.migrate("things", broken)
    # Step 2 ran before step 3 failed: the transaction takes both back, and neither is recorded.
    assert db.version("things") == 1
    assert db.execute("SELECT COUNT(*) FROM things").fetchone()[0] == 0
    assert db.migrate("things", STEPS) == 1
    db.close()


def test_processes_opening_at_once_apply_each_step_once(database_url):
    Database(database_url).close()  # the SQLite file exists before the race, as a deployed one would
    slow = (
        "CREATE TABLE opened (n INTEGER)",
        lambda d: (time.sleep(0.3), d.execute("INSERT INTO opened (n) VALUES (1)")),
    )
    errors, ran = [], []

    def open_and_migrate():
        try:
            db = Database(database_url)
            ran.append(db.migrate("race", slow))
            db.close()
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=open_and_migrate) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(ran) == [0, 0, 2]
    db = Database(database_url)
    assert db.execute("SELECT COUNT(*) FROM opened").fetchone()[0] == 1
    db.close()


def test_a_transaction_commits_together_or_not_at_all(database_url):
    db = Database(database_url)
    db.migrate("things", STEPS[:1])
    with pytest.raises(RuntimeError):
        with db.transaction():
            db.execute("INSERT INTO things (id, name) VALUES (?, ?)", (7, "100% kept?"))
            raise RuntimeError("cut short")
    assert db.execute("SELECT COUNT(*) FROM things").fetchone()[0] == 0
    with db.transaction():
        db.execute("INSERT INTO things (id, name) VALUES (?, ?)", (7, "100% kept?"))  # '%' and '?' in values
    assert db.execute("SELECT name FROM things WHERE id = ?", (7,)).fetchone() == ("100% kept?",)
    db.close()


def test_keys_written_by_one_store_are_seen_and_revoked_across_stores(database_url):
    a, b = KeyStore(Database(database_url)), KeyStore(Database(database_url))  # two gateways, one database
    key, token = a.create("acme", ["chat"], max_inflight=2, expires=time.time() + 3600.25)
    seen = b.verify(token)
    assert seen == key
    assert seen.created == key.created and seen.expires == key.expires  # double precision, not float4
    b.revoke(key.id)
    assert a.verify(token) is None
    with pytest.raises(KeyRefused, match="no active key"):
        a.revoke(key.id)
    assert [k.id for k in a.keys()] == [key.id] and a.keys()[0].revoked is not None
    a.close()
    b.close()


def test_bad_urls_are_refused_with_the_reason_and_no_password():
    with pytest.raises(DatabaseError, match="neither sqlite:///PATH nor postgresql://"):
        Database("mysql://root@localhost/lorag")
    port = free_port()  # nothing listens there
    with pytest.raises(DatabaseError, match=rf"cannot connect to PostgreSQL at postgresql://lorag:\*\*\*@127.0.0.1:{port}/x") as caught:
        Database(f"postgresql://lorag:hunter2@127.0.0.1:{port}/x")
    assert "hunter2" not in str(caught.value)
