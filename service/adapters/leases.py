"""Which adapter versions requests (and activations in progress) hold right now.

A request takes its lease when it resolves its model, at admission, and gives it
back when its response ends; a held version is never unloaded or deleted.
Taking a lease does not await, so no request can resolve an alias between an
activation's flip and its check for holders.
"""

from __future__ import annotations

import asyncio
from collections import Counter


class Lease:
    def __init__(self, leases: Leases, served: str):
        self._leases = leases
        self.served = served
        self._held = True

    def release(self) -> None:
        if self._held:  # idempotent: error paths and stream ends may both release
            self._held = False
            self._leases._release(self.served)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class Leases:
    def __init__(self) -> None:
        self._count: Counter[str] = Counter()
        self._idle: dict[str, asyncio.Event] = {}

    def acquire(self, served: str) -> Lease:
        self._count[served] += 1
        return Lease(self, served)

    def count(self, served: str) -> int:
        return self._count[served]

    def held(self) -> set[str]:
        return set(self._count)

    async def idle(self, served: str) -> None:
        """Return once no lease on `served` is held."""
        while self._count[served]:
            await self._idle.setdefault(served, asyncio.Event()).wait()

    def _release(self, served: str) -> None:
        self._count[served] -= 1
        if self._count[served] <= 0:
            del self._count[served]
            if (event := self._idle.pop(served, None)) is not None:
                event.set()
