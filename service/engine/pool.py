"""The engines the gateway sends requests to, and whether each one is answering."""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

import httpx

from service.engine.supervisor import EngineSupervisor
from service.errors import EngineUnavailable

log = logging.getLogger("lorag.engine")

_PROBE_INTERVAL_S = 5.0


@dataclass
class Engine:
    name: str
    url: str | None
    up: bool = False


class EnginePool:
    """Round-robin over the engines that are up.

    Embedded mode: one engine whose URL and state come from the supervisor.
    External mode: the `LORAG_ENGINE_URLS` servers, probed on /health in the background.
    """

    def __init__(self, http: httpx.AsyncClient, urls: list[str] | None = None, supervisor: EngineSupervisor | None = None):
        self._http = http
        self._supervisor = supervisor
        self._external = [Engine(f"engine-{i}", url) for i, url in enumerate(urls or [])]
        self._turn = itertools.count()
        self._prober: asyncio.Task | None = None

    @classmethod
    def embedded(cls, http: httpx.AsyncClient, supervisor: EngineSupervisor) -> EnginePool:
        return cls(http, supervisor=supervisor)

    @classmethod
    def external(cls, http: httpx.AsyncClient, urls: list[str]) -> EnginePool:
        return cls(http, urls=urls)

    @property
    def engines(self) -> list[Engine]:
        if self._supervisor is not None:
            return [Engine("engine-0", self._supervisor.url, self._supervisor.ready)]
        return self._external

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

    def pick(self) -> Engine:
        """The next engine that is up; EngineUnavailable when none is."""
        engines = [e for e in self.engines if e.up and e.url]
        if not engines:
            raise EngineUnavailable()
        return engines[next(self._turn) % len(engines)]

    def mark_down(self, engine: Engine) -> None:
        # A connection failure in external mode takes the engine out until the next probe.
        for e in self._external:
            if e.url == engine.url:
                e.up = False

    async def probe(self) -> list[Engine]:
        """Ask every engine's /health now; returns the engines with fresh states."""
        engines = self.engines
        results = await asyncio.gather(*(self._healthy(e) for e in engines))
        for engine, healthy in zip(engines, results):
            if engine in self._external and engine.up != healthy:
                log.warning("engine %s (%s) is %s", engine.name, engine.url, "up" if healthy else "down")
            engine.up = healthy
        return engines

    async def _healthy(self, engine: Engine) -> bool:
        if not engine.url or (self._supervisor is not None and not self._supervisor.ready):
            return False
        try:
            response = await self._http.get(f"{engine.url}/health", timeout=2.0)
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(_PROBE_INTERVAL_S)
            await self.probe()
