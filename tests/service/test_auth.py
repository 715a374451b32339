"""API keys and scopes on every API route, in-process with auth on (no engine is needed to be refused)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.testclient import TestClient

import service
from knowledge.database import Database
from service import Settings, create_app
from service.auth.guard import Guard
from service.auth.keys import SCOPES, KeyStore
from service.errors import Unauthorized
from service.engine.launcher import free_port
from tests.conftest import MODEL_NAME

OPEN = {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def needed_scope(method: str, path: str) -> str:
    if path == "/metrics":
        return "metrics"
    if path.startswith("/v1/adapters"):
        return "adapters:admin"
    if path.startswith("/v1/collections"):
        return "knowledge:read" if method == "GET" or path.endswith("/search") else "knowledge:write"
    return "chat"


@pytest.fixture(scope="module")
def app_and_home(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    home = tmp_path_factory.mktemp("auth-home")
    settings = Settings(engine_urls=f"http://127.0.0.1:{free_port()}", model=tiny_model, model_name=MODEL_NAME,
                        home=home, auth="on")
    with TestClient(create_app(settings)) as client:
        yield client, home


def calls(client: TestClient) -> list[tuple[str, str]]:
    """(method, concrete path) for every API route the app has: a new route is checked too."""
    found = []
    for route in client.app.routes:
        if isinstance(route, APIRoute) and route.path not in OPEN:
            path = re.sub(r"\{[^}]+\}", "x1", route.path)
            found += [(method, path) for method in sorted(route.methods)]
    return found


def test_every_api_route_needs_a_valid_key_with_its_scope(app_and_home):
    client, home = app_and_home
    store = KeyStore(Database.sqlite(home / "lorag.db"))
    revoked_key, revoked = store.create("acme", list(SCOPES))
    store.revoke(revoked_key.id)
    routes = calls(client)
    assert len(routes) >= 20 and ("POST", "/v1/chat/completions") in routes

    for method, path in routes:
        scope = needed_scope(method, path)
        _, right = store.create("acme", [scope])
        _, others = store.create("acme", [s for s in SCOPES if s != scope])
        missing = client.request(method, path)
        assert missing.status_code == 401, (method, path, missing.text)
        assert missing.json()["error"]["code"] == "missing_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"
        for token in ("lorag_0123456789abcdef_" + "x" * 43, revoked, "not-a-key", right.replace("_", "-")):
            bad = client.request(method, path, headers={"Authorization": f"Bearer {token}"})
            assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key", (method, path)
        wrong_scheme = client.request(method, path, headers={"Authorization": f"Basic {right}"})
        assert wrong_scheme.status_code == 401, (method, path)
        forbidden = client.request(method, path, headers={"Authorization": f"Bearer {others}"})
        assert forbidden.status_code == 403, (method, path, forbidden.text)
        assert forbidden.json()["error"]["code"] == "missing_scope" and scope in forbidden.json()["error"]["message"]
        admitted = client.request(method, path, headers={"Authorization": f"Bearer {right}"})
        assert admitted.status_code not in (401, 403), (method, path, admitted.text)
    store.close()


def test_health_stays_open_and_metrics_take_the_operators_scope(app_and_home):
    client, home = app_and_home
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503  # no engine here, but no key is asked for
    store = KeyStore(Database.sqlite(home / "lorag.db"))
    _, operator = store.create("ops", ["metrics"])
    store.close()
    scraped = client.get("/metrics", headers={"Authorization": f"Bearer {operator}"})  # as Prometheus scrapes
    assert scraped.status_code == 200 and "lorag_engine_up" in scraped.text


def test_metrics_auth_setting_decides_whether_metrics_need_a_key(tmp_path):
    # auto: a key exactly when API keys are required; key: always (even on loopback); open: never.
    cases = {("auto", "127.0.0.1"): False, ("auto", "0.0.0.0"): True, ("key", "127.0.0.1"): True,
             ("open", "0.0.0.0"): False}
    for (mode, host), wanted in cases.items():
        assert Settings(metrics_auth=mode, host=host).metrics_key_required is wanted, (mode, host)
    store = KeyStore(Database.sqlite(tmp_path / "lorag.db"))
    _, token = store.create("ops", ["metrics"])
    operator = HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)
    keyed_metrics_only = Guard(store, required=False, metrics_required=True)
    assert asyncio.run(keyed_metrics_only.check(None, "chat")) is None
    with pytest.raises(Unauthorized):
        asyncio.run(keyed_metrics_only.check(None, "metrics"))
    assert asyncio.run(keyed_metrics_only.check(operator, "metrics")).tenant == "ops"
    open_metrics = Guard(store, required=True, metrics_required=False)
    assert asyncio.run(open_metrics.check(None, "metrics")) is None
    with pytest.raises(Unauthorized):
        asyncio.run(open_metrics.check(None, "chat"))
    store.close()


def lorag(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LORAG_HOME": str(home), **env})


def stored_bytes(db: Path) -> bytes:
    """The store's files as they lie on disk, read by another process: opening and closing them in
    this one would drop its SQLite locks on them (POSIX locks are per process), and the app's open
    connection would go on reading a stale snapshot."""
    files = [str(p) for p in (db, db.with_name(db.name + "-wal")) if p.exists()]
    return subprocess.run(["cat", *files], capture_output=True, check=True).stdout


def test_keys_cli_creates_lists_and_revokes_and_the_service_honours_it(app_and_home):
    client, home = app_and_home
    created = lorag(home, "keys", "create", "--tenant", "acme", "--scopes", "chat,knowledge:read")
    assert created.returncode == 0, created.stderr
    key_id, token = created.stdout.split()[1], created.stdout.splitlines()[-1]
    listed = lorag(home, "keys", "list").stdout
    assert re.search(rf"{key_id}\s+acme\s+chat,knowledge:read\s.*active", listed), listed
    assert token not in listed and token.split("_")[-1] not in stored_bytes(home / "lorag.db").decode("latin-1")
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/v1/collections", headers=headers).status_code == 200
    assert client.post("/v1/collections", json={"name": "nope"}, headers=headers).status_code == 403

    assert lorag(home, "keys", "revoke", key_id).returncode == 0
    assert "revoked" in lorag(home, "keys", "list").stdout
    assert client.get("/v1/collections", headers=headers).status_code == 401  # at once, no restart
    again = lorag(home, "keys", "revoke", key_id)
    assert again.returncode == 1 and "no active key" in again.stderr
    bad = lorag(home, "keys", "create", "--tenant", "acme", "--scopes", "chat,root")
    assert bad.returncode == 1 and "unknown or no scopes ['root']" in bad.stderr


def test_auth_off_is_refused_on_any_address_but_loopback(tmp_path):
    for env, flags in (({"LORAG_HOST": "0.0.0.0"}, ()), ({}, ("--host", "10.1.2.3"))):
        result = lorag(tmp_path, "serve", *flags, LORAG_AUTH="off", **env)
        assert result.returncode == 2
        assert "LORAG_AUTH=off with LORAG_HOST=" in result.stderr and "Listen on 127.0.0.1" in result.stderr
    assert Settings(host="0.0.0.0").auth_required and not Settings(host="127.0.0.1").auth_required
    assert Settings(host="::1", auth="off").loopback


def test_a_key_past_its_expiry_is_refused_with_when_it_expired(app_and_home):
    client, home = app_and_home
    created = lorag(home, "keys", "create", "--tenant", "acme", "--scopes", "knowledge:read", "--expires", "12h")
    assert created.returncode == 0, created.stderr
    key_id, token = created.stdout.split()[1], created.stdout.splitlines()[-1]
    assert "expires " in created.stdout
    fresh = client.get("/v1/collections", headers={"Authorization": f"Bearer {token}"})
    assert fresh.status_code == 200, fresh.text
    # A key whose moment has come (no test waits twelve hours): the store takes any expiry.
    store = KeyStore(Database.sqlite(home / "lorag.db"))
    _, lapsed = store.create("acme", ["knowledge:read"], expires=time.time() - 60)
    store.close()
    refused = client.get("/v1/collections", headers={"Authorization": f"Bearer {lapsed}"})
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    error = refused.json()["error"]
    assert error["code"] == "expired_api_key" and re.search(r"expired at \d{4}-\d\d-\d\d \d\d:\d\d UTC", error["message"])
    listed = lorag(home, "keys", "list").stdout
    assert re.search(rf"{key_id}\s.*expires \d{{4}}-\d\d-\d\d \d\d:\d\d UTC\s+active", listed), listed
    assert re.search(r"expires \d{4}-\S+ \S+ UTC\s+expired", listed), listed
    for bad in ("tomorrow", "2001-01-01", "-3d"):
        result = lorag(home, "keys", "create", "--tenant", "acme", "--scopes", "chat", "--expires", bad)
        assert result.returncode == 2 and "--expires" in result.stderr, (bad, result.stderr)


def test_a_key_store_from_before_expiry_opens_and_its_keys_still_work(tmp_path):
    old = sqlite3.connect(tmp_path / "lorag.db")
    old.executescript(
        "CREATE TABLE api_keys (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, scopes TEXT NOT NULL, "
        "secret_sha256 TEXT NOT NULL, created REAL NOT NULL, revoked REAL);"
        f"INSERT INTO api_keys VALUES ('0123456789abcdef', 'acme', '[\"chat\"]', '{hashlib.sha256(b'x' * 43).hexdigest()}', 1, NULL);"
    )
    old.commit()
    old.close()
    store = KeyStore(Database.sqlite(tmp_path / "lorag.db"))
    key = store.verify("lorag_0123456789abcdef_" + "x" * 43)
    assert key is not None and key.tenant == "acme" and key.expires is None and not key.expired
    store.close()


def test_keys_cli_finds_the_services_store_from_any_working_directory(tmp_path):
    # No LORAG_HOME: the default home, which must not depend on where the command runs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAG_")}
    env |= {"XDG_DATA_HOME": str(tmp_path / "data"), "PYTHONPATH": str(Path(service.__file__).parent.parent)}
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()

    def keys(cwd: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "service.cli", "keys", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=60)

    created = keys(first, "create", "--tenant", "acme", "--scopes", "chat")
    assert created.returncode == 0, created.stderr
    store = tmp_path / "data" / "lorag" / "lorag.db"
    assert str(store) in created.stdout and store.exists()
    key_id = created.stdout.split()[1]
    assert key_id in keys(second, "list").stdout
    assert keys(second, "revoke", key_id).returncode == 0
    assert "revoked" in keys(first, "list").stdout
    assert not (first / "var").exists() and not (second / "var").exists()
