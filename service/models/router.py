from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service.dependencies import Tenant, get_catalog
from service.json_body import JsonRoute
from service.models.catalog import ModelCatalog
from service.models.schemas import ModelList

router = APIRouter(tags=["models"], route_class=JsonRoute)


@router.get("/v1/models", response_model=ModelList)
async def list_models(catalog: Annotated[ModelCatalog, Depends(get_catalog)], tenant: Tenant) -> dict:
    """List the models that `model` may name: the base model and the caller's tenant's adapters (OpenAI list shape)."""
    return {"object": "list", "data": catalog.listing(tenant)}
