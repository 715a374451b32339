"""The model names clients may ask for, and what each one means to the engine.

`model` is the base model's name, an adapter's name (its active version, resolved
once, at admission) or `name@version` (pinned).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from service.adapters.registry import Registry, Version
from service.errors import AdapterConflict, ModelNotFound


@dataclass(frozen=True)
class Target:
    """What a request's `model` resolved to: the engine-side name and, for an adapter, its version."""

    served: str
    version: Version | None = None

    @property
    def labels(self) -> tuple[str, str]:
        """(adapter, version) metric labels; the base model is (its name, "base")."""
        return (self.version.name, self.version.version) if self.version else (self.served, "base")

    @property
    def rag(self) -> dict[str, Any] | None:
        """The retrieval defaults the adapter version declared, if any."""
        return self.version.facts.get("rag") if self.version else None


class ModelCatalog:
    def __init__(self, base: str, registry: Registry):
        self._base = base
        self._registry = registry
        self._created = int(time.time())

    @property
    def base(self) -> str:
        return self._base

    def names(self) -> list[str]:
        return [card["id"] for card in self.listing()]

    def resolve(self, name: str) -> Target:
        """The target for a client's `model`; ModelNotFound lists the known names."""
        if name == self._base:
            return Target(self._base)
        adapter_name, pinned, version = name.partition("@")
        adapter = self._registry.find(adapter_name)
        if adapter is not None:
            if pinned and version in adapter.versions:
                return Target(name, adapter.versions[version])
            if not pinned:
                active = adapter.active_version()
                if active is None:
                    raise AdapterConflict(
                        f"adapter {name!r} has no active version; activate one, or name a version as "
                        f"{name}@VERSION ({', '.join(adapter.versions)})",
                        code="no_active_version",
                    )
                return Target(active.served, active)
        raise ModelNotFound(name, self.names())

    def listing(self) -> list[dict]:
        cards = [{"id": self._base, "object": "model", "created": self._created, "owned_by": "lorag"}]
        for adapter in self._registry.adapters():
            active = adapter.active_version()
            if active is not None:
                cards.append({"id": adapter.name, "object": "model", "created": int(adapter.created),
                              "owned_by": "lorag", "parent": self._base, "version": active.version})
            for v in adapter.versions.values():
                cards.append({"id": v.served, "object": "model", "created": int(v.created), "owned_by": "lorag",
                              "parent": self._base, "version": v.version})
        return cards
