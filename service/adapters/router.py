from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile, status

from service.adapters.schemas import (
    Activate, ActivationOut, AdapterList, AdapterOut, Deleted, EvalIn, EvalOut, RagDefault, UploadOut,
)
from service.adapters.service import AdapterService, describe_eval
from service.dependencies import Tenant, get_adapters
from service.json_body import JsonRoute

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], route_class=JsonRoute)
Adapters = Annotated[AdapterService, Depends(get_adapters)]


@router.get("", response_model=AdapterList)
async def list_adapters(adapters: Adapters, tenant: Tenant) -> dict:
    """List the tenant's adapters with their versions and where each version is loaded."""
    # Without the evals' full reports: a listing of every version would grow with them.
    data = [adapters.describe(a, reports=False) for a in adapters.registry.adapters(tenant)]
    return {"object": "list", "data": data}


@router.get("/{name}", response_model=AdapterOut)
async def get_adapter(name: str, adapters: Adapters, tenant: Tenant) -> dict:
    """One adapter: its versions (with full eval reports), the active one, each version's state on every engine."""
    return adapters.describe(adapters.registry.get(tenant, name))


@router.post(
    "/{name}/versions",
    response_model=UploadOut,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": UploadOut, "description": "These exact files are already a version."}},
)
async def upload_version(
    name: str,
    response: Response,
    adapters: Adapters,
    tenant: Tenant,
    file: Annotated[
        UploadFile | None, File(description="A .tar, .tar.gz or .zip of adapter_config.json, "
                                "adapter_model.safetensors and optionally lorag.json.")
    ] = None,
    path: Annotated[
        str | None, Form(description="Instead of a file: a folder inside your tenant's adapters folder, "
                         "LORAG_ADAPTERS_ROOT (default tenant) or LORAG_ADAPTERS_ROOT/@TENANT.")
    ] = None,
    activate: Annotated[bool, Query(description="Activate the version once it is registered.")] = False,
) -> dict:
    """Upload a version: validated, then canary-checked on an engine; nothing served changes unless `activate`."""
    archive = await file.read() if file is not None else None
    version, created, report = await adapters.upload(tenant, name, archive, path, activate)
    if not created:
        response.status_code = status.HTTP_200_OK
    return {"status": "created" if created else "unchanged", "version": adapters.describe_version(version),
            "activation": report}


@router.post("/{name}/activate", response_model=ActivationOut)
async def activate_version(name: str, body: Activate, adapters: Adapters, tenant: Tenant) -> dict:
    """Hot-swap: load the version on every engine, flip `name` to it, unload the old one when idle;
    with `rag`, set the adapter's retrieval defaults in the same change."""
    rag = body.rag.model_dump(exclude_none=True) if body.rag is not None else None
    return await adapters.activate(tenant, name, body.version, rag)


@router.put("/{name}/rag", response_model=AdapterOut)
async def set_rag(name: str, body: RagDefault, adapters: Adapters, tenant: Tenant) -> dict:
    """Set the retrieval defaults chat uses with this adapter when a request has no `rag` (422: unknown collection)."""
    return adapters.describe(await adapters.set_rag(tenant, name, body.model_dump(exclude_none=True)))


@router.delete("/{name}/rag", response_model=AdapterOut)
async def clear_rag(name: str, adapters: Adapters, tenant: Tenant) -> dict:
    """Clear the adapter's retrieval defaults: its versions' lorag.json `rag`, then LORAG_RAG_*, apply again."""
    return adapters.describe(await adapters.set_rag(tenant, name, None))


@router.put("/{name}/versions/{version}/eval", response_model=EvalOut)
async def store_eval(name: str, version: str, body: EvalIn, adapters: Adapters, tenant: Tenant) -> dict:
    """Store an eval suite's result with a version, replacing that suite's earlier one; shown by GET /v1/adapters."""
    result = await adapters.store_eval(tenant, name, version, body.suite, body.passed, body.failures, body.report)
    return describe_eval(result)


@router.post("/{name}/rollback", response_model=ActivationOut)
async def rollback(name: str, adapters: Adapters, tenant: Tenant) -> dict:
    """Activate the version that was active before the current one."""
    return await adapters.rollback(tenant, name)


@router.delete("/{name}/versions/{version}", response_model=Deleted)
async def delete_version(name: str, version: str, adapters: Adapters, tenant: Tenant) -> dict:
    """Delete a version (409 while it is active or requests hold it)."""
    await adapters.delete_version(tenant, name, version)
    return {"adapter": name, "version": version}


@router.delete("/{name}", response_model=Deleted)
async def delete_adapter(name: str, adapters: Adapters, tenant: Tenant) -> dict:
    """Delete an adapter and all its versions (409 while requests hold any of them)."""
    await adapters.delete(tenant, name)
    return {"adapter": name}
