"""API keys: stored hashed in the service's SQL store (knowledge.database), each bound to a tenant and scopes.

A key is `lorag_<id>_<secret>`: the id finds the row, the secret (32 random bytes) is checked
against its sha256. A slow hash buys nothing for secrets this long, and a lookup costs
microseconds on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from knowledge.database import Database

# "metrics" is the operator's: it reads every tenant's series on /metrics, whichever tenant the key is for.
SCOPES = ("chat", "knowledge:read", "knowledge:write", "adapters:admin", "metrics")
TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_KEY = re.compile(r"lorag_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")



def _limits_and_expiry(db: Database) -> None:
    # Added after the table first shipped: a database that already has them keeps them.
    # NULL limits: the settings apply (see service/chat/fair_share.py). expires: unix time from
    # which the key is refused; NULL: never.
    for column, kind in (("max_inflight", "INTEGER"), ("tokens_per_minute", "INTEGER"), ("expires", "DOUBLE PRECISION")):
        db.add_column("api_keys", column, kind)


# Migration steps (knowledge.database), only ever appended to.
MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS api_keys (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, scopes TEXT NOT NULL, "
    "secret_sha256 TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, revoked DOUBLE PRECISION)",
    _limits_and_expiry,
)


class KeyRefused(ValueError):
    """A key cannot be created or revoked as asked; the message says why."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant: str
    scopes: tuple[str, ...]
    created: float
    revoked: float | None = None
    # Fair-share limits of this key's own, replacing the settings' (0: none); None: the settings'.
    max_inflight: int | None = None
    tokens_per_minute: int | None = None
    expires: float | None = None

    @property
    def expired(self) -> bool:
        return self.expires is not None and self.expires <= time.time()


def utc(timestamp: float) -> str:
    """A timestamp as people read it, in UTC: 2027-01-31 18:00 UTC."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


class KeyStore:
    def __init__(self, database: Database):
        """Keys in `database`, which the store owns (closes) from here on."""
        self._db = database
        database.migrate("api_keys", MIGRATIONS)

    def close(self) -> None:
        self._db.close()

    def create(
        self,
        tenant: str,
        scopes: list[str],
        *,
        max_inflight: int | None = None,
        tokens_per_minute: int | None = None,
        expires: float | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key (refused from `expires`, a unix time, if given) and its token; the token is shown
        once and never stored."""
        if not TENANT.fullmatch(tenant):
            raise KeyRefused(f"tenant {tenant!r} is not valid: 1-63 lowercase letters, digits, '_' or '-'")
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise KeyRefused(f"unknown or no scopes {unknown}; choose from {', '.join(SCOPES)}")
        for name, limit in (("max_inflight", max_inflight), ("tokens_per_minute", tokens_per_minute)):
            if limit is not None and limit < 0:
                raise KeyRefused(f"{name} must be 0 (no limit) or more, not {limit}")
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        key = ApiKey(key_id, tenant, tuple(sorted(set(scopes))), time.time(), None, max_inflight, tokens_per_minute,
                     expires)
        self._db.execute(
            "INSERT INTO api_keys (id, tenant, scopes, secret_sha256, created, max_inflight, tokens_per_minute, "
            "expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key.id, tenant, json.dumps(key.scopes), _digest(secret), key.created, max_inflight, tokens_per_minute,
             expires),
        )
        return key, f"lorag_{key_id}_{secret}"

    def keys(self) -> list[ApiKey]:
        rows = self._db.execute(
            "SELECT id, tenant, scopes, created, revoked, max_inflight, tokens_per_minute, expires FROM api_keys "
            "ORDER BY created"
        )
        return [ApiKey(i, t, tuple(json.loads(s)), c, r, m, k, e) for i, t, s, c, r, m, k, e in rows]

    def revoke(self, key_id: str) -> None:
        changed = self._db.execute(
            "UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), key_id)
        ).rowcount
        if not changed:
            raise KeyRefused(f"no active key with id {key_id!r}")

    def verify(self, token: str) -> ApiKey | None:
        """The key a token belongs to, if it is well-formed, known, matching and not revoked (it may
        have expired: the caller says so)."""
        match = _KEY.fullmatch(token)
        if match is None:
            return None
        row = self._db.execute(
            "SELECT tenant, scopes, secret_sha256, created, revoked, max_inflight, tokens_per_minute, expires "
            "FROM api_keys WHERE id = ?", (match[1],)
        ).fetchone()
        if row is None or row[4] is not None or not hmac.compare_digest(row[2], _digest(match[2])):
            return None
        return ApiKey(match[1], row[0], tuple(json.loads(row[1])), row[3], None, row[5], row[6], row[7])


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
