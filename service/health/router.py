from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.auth.guard import require
from service.dependencies import get_engines, get_metrics
from service.engine.pool import EnginePool
from service.errors import envelope
from service.metrics import Metrics

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness: the gateway process is serving."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "No engine is answering."}})
async def readyz(engines: Annotated[EnginePool, Depends(get_engines)]) -> JSONResponse:
    """Readiness: at least one engine answers its health check right now and has its adapters."""
    states = [{"name": e.name, "ready": e.up} for e in await engines.readiness()]
    if any(s["ready"] for s in states):
        return JSONResponse({"status": "ready", "engines": states})
    body = envelope("no engine is ready", "engine_unavailable", code="engine_unavailable")
    return JSONResponse({**body, "status": "not ready", "engines": states}, status_code=503)


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[require("metrics")],
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}},
               401: {"description": "No valid key, where LORAG_METRICS_AUTH asks for one."},
               403: {"description": "The key lacks the 'metrics' scope."}},
)
async def metrics(registry: Annotated[Metrics, Depends(get_metrics)]) -> Response:
    """Prometheus metrics of every tenant (operator's 'metrics' scope): requests, tokens, latency, queue, engines."""
    return Response(registry.exposition(), media_type=CONTENT_TYPE_LATEST)
