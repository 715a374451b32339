"""Typed accessors for the objects the lifespan keeps on `app.state`.

All `async def`: FastAPI runs a plain `def` dependency on its thread pool, a thread hop
(two context switches and the GIL handed over) per dependency per request, for a getattr."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from knowledge.documents import DEFAULT_TENANT

from service.adapters.service import AdapterService
from service.auth.keys import ApiKey
from service.chat.service import ChatService
from service.engine.pool import EnginePool
from service.knowledge.service import KnowledgeService
from service.metrics import Metrics
from service.models.catalog import ModelCatalog


async def get_chat(request: Request) -> ChatService:
    return request.app.state.chat


async def get_catalog(request: Request) -> ModelCatalog:
    return request.app.state.catalog


async def get_engines(request: Request) -> EnginePool:
    return request.app.state.engines


async def get_knowledge(request: Request) -> KnowledgeService:
    return request.app.state.knowledge


async def get_adapters(request: Request) -> AdapterService:
    return request.app.state.adapters


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_api_key(request: Request) -> ApiKey | None:
    """The caller's key, as the route's guard checked it; None when auth is off."""
    return getattr(request.state, "api_key", None)


async def get_tenant(key: Annotated[ApiKey | None, Depends(get_api_key)]) -> str:
    """The caller's tenant: its key's, or the default tenant's when auth is off (loopback only).
    Every name a request carries (collection, adapter, model) is resolved inside it."""
    return key.tenant if key is not None else DEFAULT_TENANT


Caller = Annotated[ApiKey | None, Depends(get_api_key)]
Tenant = Annotated[str, Depends(get_tenant)]
