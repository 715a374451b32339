"""The engines the gateway sends requests to, and whether each one is ready for traffic.

An engine is up when it answers /health *and* its adapters have been brought to the
registry's desired state (the `sync` hook): a restarted replica takes no request
before it has its adapters back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field

import httpx

from service.engine.supervisor import EngineSupervisor
from service.errors import EngineUnavailable

log = logging.getLogger("lorag.engine")

_PROBE_INTERVAL_S = 5.0
_HEALTH_TIMEOUT_S = 2.0
# Health checks in a row that may go unanswered before an engine is taken out. A loaded vLLM
# answers /health late (its API server is busy streaming): one slow answer is load, not an
# outage, and taking the only engine out for it turned every request into a 503 (rag bench,
# 100 M model). An engine that refuses connections, or whose process is gone, is out at once.
_MISSES_BEFORE_DOWN = 3


@dataclass(eq=False)
class Engine:
    name: str
    url: str | None
    up: bool = False
    misses: int = 0  # health checks in a row that got no answer in time
    inflight: int = 0  # this gateway's requests on it, from sending until their answer ends
    # Served names of the adapters loaded on it, as last seen or changed by the gateway.
    loaded: set[str] = field(default_factory=set)
    # Serialises adapter loads and unloads on this engine (vLLM answers 400 to a double load).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


Sync = Callable[[Engine], Awaitable[None]]


class EnginePool:
    """Least outstanding requests over the engines that are up (ties in turn).

    Embedded mode: one engine whose URL and liveness come from the supervisor.
    External mode: the `LORAG_ENGINE_URLS` servers. Both are probed in the background.
    """

    def __init__(self, http: httpx.AsyncClient, urls: list[str] | None = None, supervisor: EngineSupervisor | None = None):
        self._http = http
        self._supervisor = supervisor
        self._engines = [Engine(f"engine-{i}", url) for i, url in enumerate(urls or [None])]
        self._turn = itertools.count()
        self._prober: asyncio.Task | None = None
        self._sync: Sync | None = None

    @classmethod
    def embedded(cls, http: httpx.AsyncClient, supervisor: EngineSupervisor) -> EnginePool:
        return cls(http, supervisor=supervisor)

    @classmethod
    def external(cls, http: httpx.AsyncClient, urls: list[str]) -> EnginePool:
        return cls(http, urls=urls)

    @property
    def engines(self) -> list[Engine]:
        if self._supervisor is not None:
            engine = self._engines[0]
            if engine.url != self._supervisor.url or not self._supervisor.ready:
                engine.up = False  # a new process (or none): nothing is known about it yet
            engine.url = self._supervisor.url
        return self._engines

    def set_sync(self, sync: Sync) -> None:
        """The hook that brings an engine's adapters to the desired state; run before it counts as up."""
        self._sync = sync

    async def start(self) -> None:
        if self._supervisor is not None:
            await self._supervisor.start()
        else:
            await self.probe()
        self._prober = asyncio.create_task(self._probe_forever(), name="engine-prober")

    async def stop(self) -> None:
        if self._prober:
            self._prober.cancel()
        if self._supervisor is not None:
            await self._supervisor.stop()

    def pick(self, model: str | None = None, avoid: Collection[Engine] = ()) -> Engine:
        """The engine that is up (and, for an adapter, has it loaded) with the fewest of this gateway's
        requests in flight, other than those in `avoid`; EngineUnavailable if none. Counting requests,
        not turns: a long generation keeps its engine busy, and the next request goes elsewhere."""
        engines = [e for e in self.engines
                   if e.up and e.url and (model is None or model in e.loaded) and e not in avoid]
        if not engines:
            if model is not None and any(e.up for e in self.engines if e not in avoid):
                raise EngineUnavailable(f"{model} is not loaded on any engine yet; retry shortly")
            raise EngineUnavailable()
        turn = next(self._turn)
        # Rotating where the scan starts spreads ties instead of piling them on the first engine.
        rotated = engines[turn % len(engines):] + engines[: turn % len(engines)]
        return min(rotated, key=lambda e: e.inflight)

    def up(self) -> list[Engine]:
        return [e for e in self.engines if e.up and e.url]

    def mark_down(self, engine: Engine) -> None:
        # A connection failure takes the engine out until a probe finds it healthy and synced again.
        engine.up = False

    async def readiness(self) -> list[Engine]:
        """Engines with fresh states, cheaply: an engine that is up is asked /health again (and
        taken out if it fails); one that is down waits for the background probe, which syncs it."""
        engines = self.engines
        checks = [e for e in engines if e.up]
        for engine, health in zip(checks, await asyncio.gather(*(self._health(e) for e in checks))):
            engine.up = self._still_up(engine, health)
        return engines

    async def probe(self) -> list[Engine]:
        """Check every engine now (health, then adapter sync); returns the engines with fresh states."""
        engines = self.engines
        await asyncio.gather(*(self._check(e) for e in engines))
        return engines

    async def _check(self, engine: Engine) -> None:
        was_up = engine.up
        health = await self._health(engine)
        up = self._still_up(engine, health)
        if health and self._sync is not None:
            try:
                await self._sync(engine)
            except Exception as exc:
                # An engine that was serving keeps serving (requests go only where their adapter is
                # loaded); one coming up waits for the next probe.
                log.warning("engine %s answers but its adapters could not be synced: %s", engine.name, exc)
                # An engine that refuses our key refuses every request too: out at once.
                up = was_up and self._still_up(engine, None) and getattr(exc, "status", None) != 401
        engine.up = up
        if was_up != up and self._supervisor is None:
            log.warning("engine %s (%s) is %s", engine.name, engine.url, "up" if up else "down")

    async def _health(self, engine: Engine) -> bool | None:
        """True: healthy. False: gone (not started, refusing connections, or failing). None: no
        answer in time, which a busy engine may give."""
        if not engine.url or (self._supervisor is not None and not self._supervisor.ready):
            return False
        try:
            response = await self._http.get(f"{engine.url}/health", timeout=_HEALTH_TIMEOUT_S)
            return response.status_code == 200
        except httpx.TimeoutException:
            return None
        except httpx.HTTPError:
            return False

    @staticmethod
    def _still_up(engine: Engine, health: bool | None) -> bool:
        """Whether the engine counts as up after this check; counts (or clears) its misses."""
        if health is None:
            engine.misses += 1
            return engine.up and engine.misses < _MISSES_BEFORE_DOWN
        engine.misses = 0
        return health

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(_PROBE_INTERVAL_S)
            try:
                await self.probe()
            except Exception:
                log.exception("engine probe failed")
