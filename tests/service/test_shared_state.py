"""LORAG_DATABASE_URL: the service's state (documents and chunk text, the adapter registry, API
keys) lives in PostgreSQL, not under LORAG_HOME, so a gateway with another home, started later,
serves the same truth; `lorag db upgrade` migrates it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
from fastapi.testclient import TestClient

from knowledge import KnowledgeSettings
from service import Settings, create_app
from tests.conftest import MODEL_NAME

PASSWORD = "s3cret-pw"


def lorag(home: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LORAG_HOME": str(home), "LORAG_DATABASE_URL": url})


def app(gateway, tiny_model, home: Path, url: str, chroma_url: str):
    settings = Settings(engine_urls=gateway.engine_url(), engine_api_key=gateway.engine_key(), model_name=MODEL_NAME,
                        home=home, model=tiny_model, database_url=url, auth="on")
    knowledge = KnowledgeSettings(_env_file=None, home=home, database_url=url, chroma_url=chroma_url)
    return TestClient(create_app(settings, knowledge))


def test_state_lives_at_the_database_url_and_db_upgrade_migrates_it(gateway, tiny_model, tmp_path, postgres_server,
                                                                     chroma_server):
    url = postgres_server.database(str(tmp_path))
    # With a password, to see that no output shows it (the test server trusts loopback, so any password works).
    secret_url = url.replace("postgres@", f"postgres:{PASSWORD}@")
    upgraded = lorag(tmp_path / "cli", secret_url, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert PASSWORD not in upgraded.stdout + upgraded.stderr
    assert [line.split(": ", 1)[1] for line in upgraded.stdout.splitlines()] == [
        "knowledge at version 4 (4 applied now)", "adapters at version 1 (1 applied now)",
        "api_keys at version 2 (2 applied now)",
    ]
    again = lorag(tmp_path / "cli", secret_url, "db", "upgrade")
    assert again.stdout.count("(0 applied now)") == 3

    made = lorag(tmp_path / "cli", secret_url, "keys", "create", "--tenant", "acme", "--scopes",
                 "knowledge:read,knowledge:write")
    assert made.returncode == 0, made.stderr
    assert PASSWORD not in made.stdout and ":***@" in made.stdout
    bearer = {"Authorization": f"Bearer {made.stdout.strip().splitlines()[-1]}"}

    with app(gateway, tiny_model, tmp_path / "a", secret_url, chroma_server) as a:  # the key made by the CLI works
        assert a.post("/v1/collections", json={"name": "harbour"}, headers=bearer).status_code == 201
        put = a.put("/v1/collections/harbour/documents/tariffs", headers=bearer,
                    json={"text": "The mooring tariff is 55 crowns per metre."})
        assert put.status_code == 201, put.text

    with psycopg.connect(url) as conn:  # in PostgreSQL, nowhere under either home
        assert conn.execute("SELECT doc_id, version FROM documents").fetchall() == [("tariffs", 1)]
    assert not (tmp_path / "a" / "knowledge.db").exists() and not (tmp_path / "a" / "lorag.db").exists()

    with app(gateway, tiny_model, tmp_path / "b", secret_url, chroma_server) as b:  # another gateway, another home
        for mode in ("keyword", "dense", "hybrid"):
            found = b.post("/v1/collections/harbour/search", headers=bearer,
                           json={"query": "mooring tariff", "mode": mode, "top_k": 1})
            assert found.status_code == 200, found.text
            assert [h["doc_id"] for h in found.json()["data"]] == ["tariffs"], mode
        key_id = made.stdout.split()[1]
        revoked = lorag(tmp_path / "cli", secret_url, "keys", "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        assert b.get("/v1/collections", headers=bearer).status_code == 401  # refused at once, by the other process


def test_an_unreachable_database_is_named_without_its_password(tmp_path):
    from service.engine.launcher import free_port

    url = f"postgresql://lorag:{PASSWORD}@127.0.0.1:{free_port()}/lorag"
    for args in (("db", "upgrade"), ("keys", "list")):
        result = lorag(tmp_path, url, *args)
        assert result.returncode == 1
        assert "cannot connect to PostgreSQL at postgresql://lorag:***@127.0.0.1" in result.stderr
        assert PASSWORD not in result.stderr and "Traceback" not in result.stderr
