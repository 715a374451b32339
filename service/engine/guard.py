"""The ASGI middleware lorag adds to every vLLM it starts: the engine key on every route but /health.

vLLM's own key check (`--api-key`, `VLLM_API_KEY`) covers paths under /v1 only; vLLM 0.32
also serves `POST /adapters` (load a LoRA adapter from any path), `/invocations` (generate)
and others outside /v1 to anyone. This runs inside the engine's process: standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

KEY_VARIABLE = "VLLM_API_KEY"
OPEN_PATHS = frozenset({"/health"})  # the liveness probe: says nothing but "up"

_REFUSED = json.dumps({"error": {"message": "this engine answers only its gateway: send its engine key as "
                                            "'Authorization: Bearer <key>'", "type": "authentication_error",
                                 "param": None, "code": "invalid_engine_key"}}).encode()


class EngineGuard:
    """Refuses every HTTP and WebSocket request without `Authorization: Bearer <VLLM_API_KEY>`."""

    def __init__(self, app) -> None:
        key = os.environ.get(KEY_VARIABLE)
        if not key:  # an engine that would answer anyone must not start
            raise RuntimeError(f"{KEY_VARIABLE} is not set: the engine key guard has no key to check")
        self._app = app
        self._digest = hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket") and not self._admits(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(_REFUSED)).encode()),
                (b"www-authenticate", b"Bearer"),
            ]})
            await send({"type": "http.response.body", "body": _REFUSED})
            return
        await self._app(scope, receive, send)

    def _admits(self, scope) -> bool:
        if scope["path"].removeprefix(scope.get("root_path", "")) in OPEN_PATHS:
            return True
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # Digests compared, so the comparison's time says nothing about the key.
        return scheme.lower() == b"bearer" and hmac.compare_digest(hashlib.sha256(token).digest(), self._digest)
