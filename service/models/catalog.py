"""The model names clients may ask for, and what each one means to the engine.

`model` is the base model's name, an adapter's name (its active version, resolved
once, at admission) or `name@version` (pinned). Adapter names are the caller's
tenant's own: another tenant's adapters are not there, for listing or for chat.
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

    tenant: str  # the caller's
    served: str
    version: Version | None = None
    # The retrieval defaults for a request without `rag` (the adapter's, else the version's lorag.json),
    # resolved with the version: a change made while the request runs does not reach it.
    rag: dict[str, Any] | None = None

    @property
    def shown(self) -> str:
        """The model name the client sees in the answer: never another tenant's key."""
        return self.version.pinned if self.version else self.served

    @property
    def labels(self) -> tuple[str, str, str]:
        """(tenant, adapter, version) metric labels; the base model is (tenant, its name, "base")."""
        return self.version.labels if self.version else (self.tenant, self.served, "base")


class ModelCatalog:
    def __init__(self, base: str, registry: Registry):
        self._base = base
        self._registry = registry
        self._created = int(time.time())

    @property
    def base(self) -> str:
        return self._base

    def names(self, tenant: str) -> list[str]:
        return [card["id"] for card in self.listing(tenant)]

    def resolve(self, tenant: str, name: str) -> Target:
        """The target for a client's `model`; ModelNotFound lists the names the tenant knows."""
        if name == self._base:
            return Target(tenant, self._base)
        adapter_name, pinned, version = name.partition("@")
        adapter = self._registry.find(tenant, adapter_name)
        if adapter is not None:
            if pinned and version in adapter.versions:
                found = adapter.versions[version]
                return Target(tenant, found.served, found, adapter.retrieval(found))
            if not pinned:
                active = adapter.active_version()
                if active is None:
                    raise AdapterConflict(
                        f"adapter {name!r} has no active version; activate one, or name a version as "
                        f"{name}@VERSION ({', '.join(adapter.versions)})",
                        code="no_active_version",
                    )
                return Target(tenant, active.served, active, adapter.retrieval(active))
        raise ModelNotFound(name, self.names(tenant))

    def listing(self, tenant: str) -> list[dict]:
        cards = [{"id": self._base, "object": "model", "created": self._created, "owned_by": "lorag"}]
        for adapter in self._registry.adapters(tenant):
            active = adapter.active_version()
            if active is not None:
                cards.append({"id": adapter.name, "object": "model", "created": int(adapter.created),
                              "owned_by": "lorag", "parent": self._base, "version": active.version})
            for v in adapter.versions.values():
                cards.append({"id": v.pinned, "object": "model", "created": int(v.created), "owned_by": "lorag",
                              "parent": self._base, "version": v.version})
        return cards
