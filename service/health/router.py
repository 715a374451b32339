from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from service.dependencies import get_engines
from service.engine.pool import EnginePool
from service.errors import envelope

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness: the gateway process is serving."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "No engine is answering."}})
async def readyz(engines: Annotated[EnginePool, Depends(get_engines)]) -> JSONResponse:
    """Readiness: at least one engine answers its health check right now."""
    states = [{"name": e.name, "ready": e.up} for e in await engines.probe()]
    if any(s["ready"] for s in states):
        return JSONResponse({"status": "ready", "engines": states})
    body = envelope("no engine is ready", "engine_unavailable", code="engine_unavailable")
    return JSONResponse({**body, "status": "not ready", "engines": states}, status_code=503)
