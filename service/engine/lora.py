"""vLLM's runtime LoRA endpoints, as the gateway (their only caller) uses them.

Every version is loaded under its own unique name and never reloaded in place:
vLLM's in-place reload keeps stale cached state.
"""

from __future__ import annotations

from typing import Any

import httpx

from service.engine.pool import Engine

_ADMIN_TIMEOUT = httpx.Timeout(120.0, connect=5.0)
KEY_REFUSED = ("the engine refused lorag's engine key: set LORAG_ENGINE_API_KEY to the key the engine was "
               "started with (its VLLM_API_KEY)")


class EngineCallFailed(Exception):
    """An adapter call failed on one engine; the message says which and why.

    `status` is the engine's HTTP status, or None when it could not be reached at all.
    """

    def __init__(self, message: str, status: int | None = None, detail: str = ""):
        super().__init__(message)
        self.status = status
        self.detail = detail


class LoraEndpoints:
    def __init__(self, http: httpx.AsyncClient):
        self._http = http

    async def loaded(self, engine: Engine) -> set[str]:
        """Names of the LoRA adapters the engine serves now (its /v1/models entries with a parent)."""
        body = await self._call(engine, "GET", "/v1/models")
        return {m["id"] for m in body.get("data", []) if m.get("parent")}

    async def load(self, engine: Engine, name: str, path: str) -> None:
        try:
            await self._call(engine, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        except EngineCallFailed as exc:
            # Loaded by an earlier attempt whose answer we lost: a name is one version's content,
            # always loaded from its one final path, so the loaded copy is this one.
            if not (exc.status == 400 and f"'{name}' has already been loaded" in exc.detail):
                raise
        engine.loaded.add(name)

    async def unload(self, engine: Engine, name: str) -> None:
        # Forgotten first: a request that pins it meanwhile must see it missing and load it again.
        engine.loaded.discard(name)
        try:
            await self._call(engine, "POST", "/v1/unload_lora_adapter", {"lora_name": name})
        except EngineCallFailed as exc:
            if exc.status != 404:  # 404: not loaded there (any more), which is what we wanted
                raise

    async def complete(self, engine: Engine, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
        """Greedy completion with log-probabilities: what the canary compares."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1}
        return await self._call(engine, "POST", "/v1/completions", body)

    async def _call(self, engine: Engine, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        try:
            response = await self._http.request(method, f"{engine.url}{path}", json=body, timeout=_ADMIN_TIMEOUT)
        except httpx.HTTPError as exc:
            raise EngineCallFailed(f"{engine.name}: {path} failed: {exc!r}") from exc
        if response.status_code == 401:
            raise EngineCallFailed(f"{engine.name}: {path} answered 401: {KEY_REFUSED}", 401, KEY_REFUSED)
        if response.status_code != 200:
            detail = response.text[:500]
            raise EngineCallFailed(f"{engine.name}: {path} answered {response.status_code}: {detail}",
                                   response.status_code, detail)
        try:
            body = response.json()
        except ValueError:  # e.g. unload answers with plain text
            return {}
        return body if isinstance(body, dict) else {}
