"""Graceful shutdown: on SIGTERM, drain before stopping.

uvicorn alone stops listening at the signal, so a load balancer sees refused connections
and no answer saying why. Here the first SIGTERM (or Ctrl-C) starts a drain instead:
the port stays open, `/readyz` and every new API request get 503 `draining` (with
`Connection: close` and `Retry-After`), requests in flight, streams included, run to
their end, and uvicorn's own shutdown starts when none is left or the drain timeout
passes. The lifespan then stops the engine, last. A second signal skips the wait.
"""

from __future__ import annotations

import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from service.connections import limited_protocol
from service.errors import Draining, send_error

# Still answered while draining: a liveness probe must not restart a process that is
# finishing its work, and its metrics are worth scraping until the end.
_OPEN_PATHS = frozenset({"/healthz", "/metrics"})


class Drain:
    """The drain's state, shared by the middleware and the server."""

    def __init__(self) -> None:
        self.started = False
        self.in_flight = 0


class DrainGate:
    """ASGI middleware: counts requests in flight; once the drain has started, turns new ones away."""

    def __init__(self, app: ASGIApp, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.started and scope["path"] not in _OPEN_PATHS:
            await send_error(send, Draining(), {"Connection": "close"})
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, timeout_s: float):
        super().__init__(config)
        self._drain = drain
        self._timeout_s = timeout_s
        self._deadline = 0.0
        self._signal: int | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain.started:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        # Only flags here (this runs in a signal handler); on_tick does the rest.
        self._signal = sig
        self._deadline = time.monotonic() + self._timeout_s
        self._drain.started = True

    async def on_tick(self, counter: int) -> bool:
        if self._signal is not None and not self.should_exit:
            if self._drain.in_flight == 0 or time.monotonic() >= self._deadline:
                # uvicorn's own shutdown, which re-raises the signal at the end for the exit status.
                super().handle_exit(self._signal, None)
        return await super().on_tick(counter)


def serve(
    app: ASGIApp, host: str, port: int, drain: Drain, drain_timeout_s: float, *,
    keepalive_timeout_s: int, header_timeout_s: float, max_connections: int,
) -> None:
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None,
        # After the drain, what is left (only past its timeout) gets a moment, then is cut.
        timeout_graceful_shutdown=2,
        timeout_keep_alive=keepalive_timeout_s,
        http=limited_protocol(header_timeout_s, max_connections),
    )
    DrainingServer(config, drain, drain_timeout_s).run()

