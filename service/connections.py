"""Client connections: a deadline for each request's headers and a cap on open connections.

uvicorn closes a keep-alive connection that stays silent after a response
(`timeout_keep_alive`), but nothing else: a connection that never sends a byte, or
sends its headers a byte at a time, is held open forever, and enough of them take
every file descriptor. Here every connection must finish a request's headers
within `header_timeout_s` of opening or of its previous response, or it is closed;
and a connection opened past `max_connections` has its request answered 503
`too_many_connections` (with `Retry-After` and `Connection: close`).
"""

from __future__ import annotations

import asyncio

from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol  # httptools if installed, else h11

from service.errors import TooManyConnections, send_error


async def _refuse(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await send_error(send, TooManyConnections(), {"Connection": "close"})


class _Limited(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    header_timeout_s: float
    max_connections: int
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:  # this one included
            self.app = _refuse
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()  # the next request's headers are due from now

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed)

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        # A request whose headers arrived is the app's (and the body limit's) to finish; only a
        # connection still waiting for, or in the middle of, a request's headers is cut.
        in_request = self.cycle is not None and not self.cycle.response_complete
        if not in_request and not getattr(self, "pipeline", None) and not self.transport.is_closing():
            self.transport.close()


def limited_protocol(header_timeout_s: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (`Config(http=...)`) with these limits."""
    return type("LimitedHTTPProtocol", (_Limited,), {
        "header_timeout_s": header_timeout_s, "max_connections": max_connections,
    })
