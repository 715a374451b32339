"""vLLM's chat endpoint, as chat requests reach it: the gateway's hot path, on aiohttp.

Relaying a stream through httpx cost the gateway about 140 µs of CPU per token (an anyio
byte stream, cancel scopes and a pure-Python HTTP parser run for every frame); through
aiohttp (a C parser on asyncio's transport) about 45 µs (bench/stream_relay_bench.py).
On a machine the gateway shares with the engine, that CPU was the engine's throughput.
The other engine calls (adapters, health, models) are few and stay on httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp

from service.engine.pool import Engine
from service.errors import EngineError, EngineRejected, EngineUnavailable, LoragError

log = logging.getLogger("lorag.engine")

_DONE = b"data: [DONE]"
_FINISH_S = 1.0  # for the end of a body whose last event has arrived
# An idle engine connection is reused only well inside the engine's own keep-alive (uvicorn's
# and so vLLM's default: 5 s), so that no request goes out on a connection the engine is closing.
_KEEPALIVE_S = 3.0


class EngineAnswer:
    """An engine's 200 answer, open: read it whole (`json`) or as a stream (`events`), then `close()`."""

    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response

    async def json(self) -> dict[str, Any]:
        try:
            body = await self._response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise EngineError(f"the engine broke off the response: {exc!r}") from exc
        finally:
            self.close()
        try:
            return json.loads(body)
        except ValueError as exc:
            raise EngineError(f"the engine answered with something that is not JSON: {exc}") from exc

    async def events(self) -> AsyncIterator[list[bytes]]:
        """A stream's server-sent events up to `data: [DONE]` (not included), whole: for each read
        from the socket, the events it completed. Then the rest of the body is read (the chunked
        encoding's end, already on its way), so that `close()` keeps the connection: a new one for
        every request cost the gateway a connect and the engine an accept. A body that ends before
        [DONE] raises EngineError."""
        pending = b""
        # Split on the bytes b"\n\n", never with a text line reader: those also break lines at
        # U+2028, U+0085 and the like, which JSON leaves raw inside strings.
        async for block in self._response.content.iter_any():
            *frames, pending = (pending + block).split(b"\n\n")
            events = [frame for frame in frames if frame.strip()]
            if _DONE in events:
                if last := events[:events.index(_DONE)]:
                    yield last
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with asyncio.timeout(_FINISH_S):
                        await self._response.content.read()
                return
            if events:
                yield events
        raise EngineError("the engine ended the stream before it was complete")

    def close(self) -> None:
        """Keeps the connection for the next request if the answer was read to its end; otherwise
        closes it, which is how vLLM learns to abort a request nobody is reading any more."""
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class EngineChat:
    """POST /v1/chat/completions to one engine. Built in the lifespan (the session needs the loop)."""

    def __init__(
        self,
        timeout_s: float,
        on_unreachable: Callable[[Engine], None],
        max_connections: int = 1024,
        headers: Mapping[str, str] | None = None,  # the engine key, on every request
        on_connection: Callable[[], None] = lambda: None,  # a new connection to an engine was opened
    ):
        opened = aiohttp.TraceConfig()

        async def count(*_: object) -> None:
            on_connection()

        opened.on_connection_create_end.append(count)
        self._timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=timeout_s)
        self._on_unreachable = on_unreachable
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, keepalive_timeout=_KEEPALIVE_S),
            # The engine sets no cookies; none may ever pass from one tenant's request to another's.
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=self._timeout,
            headers=headers,
            trace_configs=[opened],
        )

    async def close(self) -> None:
        await self._session.close()

    async def send(self, engine: Engine, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> EngineAnswer:
        """The engine's answer once its status line arrived; any other status becomes our error."""
        try:
            response = await self._session.post(f"{engine.url}/v1/chat/completions", json=body, headers=headers)
        except aiohttp.ClientConnectorError as exc:
            self._on_unreachable(engine)
            raise EngineUnavailable(f"the engine is not reachable: {exc}") from exc
        except asyncio.TimeoutError as exc:
            raise EngineError("the engine did not answer in time") from exc
        except aiohttp.ClientError as exc:  # the engine died between our request and its answer
            raise EngineUnavailable(f"the engine dropped the request: {exc!r}") from exc
        if response.status != 200:
            try:
                raise await _failure(engine, response)
            finally:
                response.close()
        return EngineAnswer(response)


async def _failure(engine: Engine, response: aiohttp.ClientResponse) -> LoragError:
    """Turn an engine's error answer into our error: its 4xx pass through, its 5xx become 502."""
    try:
        text = (await response.read()).decode("utf-8", "replace")
    except (aiohttp.ClientError, asyncio.TimeoutError):
        text = ""
    try:
        payload = json.loads(text)
    except ValueError:
        payload = {}
    payload = payload if isinstance(payload, dict) else {}
    error = payload.get("error") if isinstance(payload.get("error"), dict) else payload
    message = str(error.get("message") or text[:500] or "no message")
    if 400 <= response.status < 500 and response.status != 401:  # 401: it refused our engine key
        return EngineRejected(response.status, message, error.get("param"))
    log.error("engine %s answered %d: %s", engine.name, response.status, message)
    return EngineError(f"the engine failed ({response.status}): {message}")
