"""Who may call what: `Authorization: Bearer <key>` checked against the key store, scope by route."""

from __future__ import annotations

import re
from collections.abc import Callable

from anyio import to_thread
from fastapi import Depends, Request
from fastapi.params import Depends as DependsParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth.keys import ApiKey, KeyStore, utc
from service.errors import Forbidden, Unauthorized

# auto_error=False: a missing or malformed header is our 401 in the envelope, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="An API key from `lorag keys create`; 401 (`missing_api_key`, "
                     "`invalid_api_key`, `expired_api_key`) without a valid one.")
_SEARCH = re.compile(r"/v1/collections/[^/]+/search")


class Guard:
    def __init__(self, keys: KeyStore, required: bool, metrics_required: bool):
        self._keys = keys
        self.required = required
        # /metrics has its own setting (LORAG_METRICS_AUTH): it may be open with keys on, or keyed with them off.
        self.metrics_required = metrics_required

    async def check(self, credentials: HTTPAuthorizationCredentials | None, scope: str) -> ApiKey | None:
        """The caller's key (None when the scope needs none); Unauthorized or Forbidden otherwise."""
        if not (self.metrics_required if scope == "metrics" else self.required):
            return None
        if credentials is None:
            raise Unauthorized("no API key: send 'Authorization: Bearer <key>' (keys come from `lorag keys create`)",
                               code="missing_api_key")
        # A SQLite read and a hash: in a worker thread, so a slow disk never stalls the event loop.
        key = await to_thread.run_sync(self._keys.verify, credentials.credentials)
        if key is None:
            raise Unauthorized("the API key is not valid: unknown, revoked or mistyped", code="invalid_api_key")
        if key.expired:
            raise Unauthorized(f"this key expired at {utc(key.expires)}; ask for a new one (`lorag keys create`)",
                               code="expired_api_key")
        if scope not in key.scopes:
            raise Forbidden(f"this key lacks the {scope!r} scope (it has: {', '.join(key.scopes)})")
        return key


def knowledge_scope(request: Request) -> str:
    """Reading (GET, search) or changing the knowledge base."""
    if request.method == "GET" or (request.method == "POST" and _SEARCH.fullmatch(request.url.path)):
        return "knowledge:read"
    return "knowledge:write"


def require(scope: str | Callable[[Request], str]) -> DependsParam:
    """A route dependency that admits callers whose key has `scope` (or the scope the request needs)."""

    async def guard(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
    ) -> ApiKey | None:
        needed = scope(request) if callable(scope) else scope
        key = await request.app.state.guard.check(credentials, needed)
        request.state.api_key = key
        return key

    return Depends(guard)
