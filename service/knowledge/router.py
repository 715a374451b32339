from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile, status

from service.dependencies import Tenant, get_knowledge
from service.errors import InvalidRequest
from service.json_body import JsonRoute
from service.knowledge.schemas import (
    BulkResult,
    CollectionCreate,
    CollectionOut,
    Deleted,
    DocumentOut,
    DocumentPage,
    DocumentPut,
    ReindexRequest,
    SearchRequest,
    SearchResponse,
    WriteResultOut,
)
from service.knowledge.service import KnowledgeService

router = APIRouter(prefix="/v1/collections", tags=["knowledge"], route_class=JsonRoute)
Knowledge = Annotated[KnowledgeService, Depends(get_knowledge)]


def _write_status(response: Response, result: dict) -> dict:
    response.status_code = status.HTTP_201_CREATED if result["status"] == "created" else status.HTTP_200_OK
    return result


@router.post("", response_model=CollectionOut, status_code=status.HTTP_201_CREATED)
async def create_collection(body: CollectionCreate, knowledge: Knowledge, tenant: Tenant) -> dict:
    """Create a collection in the caller's tenant (409 if the tenant has one of that name)."""
    chunking = body.chunking.model_dump(exclude_none=True) if body.chunking else None
    return await knowledge.create_collection(body.name, body.metadata, chunking, tenant=tenant)


@router.get("")
async def list_collections(knowledge: Knowledge, tenant: Tenant) -> dict:
    """List the caller's tenant's collections."""
    return {"object": "list", "data": await knowledge.list_collections(tenant=tenant)}


@router.get("/{name}", response_model=CollectionOut)
async def get_collection(name: str, knowledge: Knowledge, tenant: Tenant) -> dict:
    """Get one collection with its document count."""
    return await knowledge.get_collection(name, tenant=tenant)


@router.delete("/{name}", response_model=Deleted)
async def delete_collection(name: str, knowledge: Knowledge, tenant: Tenant) -> dict:
    """Delete a collection with all its documents and chunks."""
    await knowledge.delete_collection(name, tenant=tenant)
    return {"id": name, "object": "collection", "deleted": True}


@router.post("/{name}/reindex", response_model=CollectionOut, status_code=status.HTTP_202_ACCEPTED)
async def reindex(name: str, knowledge: Knowledge, tenant: Tenant, body: ReindexRequest | None = None) -> dict:
    """Rebuild every document's chunks and vectors (new chunking, or this service's embedder) in the
    background; searches see the old index until one atomic cut-over. Poll the collection's `reindex`."""
    chunking = body.chunking.model_dump(exclude_none=True) if body and body.chunking else None
    return await knowledge.reindex(name, chunking, tenant=tenant)


@router.post("/{name}/search", response_model=SearchResponse)
async def search(name: str, body: SearchRequest, knowledge: Knowledge, tenant: Tenant) -> dict:
    """Search the active version of every document: dense, keyword (BM25) or hybrid (fused)."""
    return await knowledge.search(name, body.query, body.top_k, body.mode, body.filter, tenant=tenant)


@router.post(
    "/{name}/documents/bulk",
    response_model=BulkResult,
    openapi_extra={"requestBody": {"content": {"application/x-ndjson": {"schema": {"type": "string"}}}}},
)
async def bulk_upsert(name: str, request: Request, knowledge: Knowledge, tenant: Tenant) -> dict:
    """Create or update many documents from JSON lines: {"id", "text", "metadata"?} per line."""
    return await knowledge.put_bulk(name, await request.body(), tenant=tenant)


@router.post("/{name}/files", response_model=WriteResultOut, responses={201: {"model": WriteResultOut}})
async def upload_file(
    name: str,
    request: Request,
    response: Response,
    knowledge: Knowledge,
    tenant: Tenant,
    file: Annotated[UploadFile, File(description=".txt, .md, .html or .pdf")],
    doc_id: Annotated[str | None, Form(description="Document id; default: the file name.")] = None,
    metadata: Annotated[str | None, Form(description="Metadata as a JSON object.")] = None,
) -> dict:
    """Upload a file; its text becomes a document (a new version if the id exists and the text changed)."""
    # FastAPI keeps the last of several parts of one name; a second file would be dropped unseen.
    for field in ("file", "doc_id", "metadata"):
        if len((await request.form()).getlist(field)) > 1:
            raise InvalidRequest(f"the upload has more than one {field!r} part; send one file per request",
                                 param=field, code="duplicate_field")
    data = await file.read()
    written = await knowledge.put_file(name, file.filename or "", data, doc_id, metadata, tenant=tenant)
    return _write_status(response, written)


@router.get("/{name}/documents", response_model=DocumentPage)
async def list_documents(
    name: str,
    knowledge: Knowledge,
    tenant: Tenant,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="The `next` of the previous page.")] = None,
) -> dict:
    """List documents (active versions), ordered by id, a page at a time."""
    return await knowledge.list_documents(name, limit, after, tenant=tenant)


@router.put("/{name}/documents/{doc_id:path}", response_model=WriteResultOut, responses={201: {"model": WriteResultOut}})
async def put_document(
    name: str, doc_id: str, body: DocumentPut, response: Response, knowledge: Knowledge, tenant: Tenant
) -> dict:
    """Create or replace a document: changed content becomes the next version, atomically; same content is a no-op."""
    written = await knowledge.put_document(name, doc_id, body.text, body.metadata, tenant=tenant)
    return _write_status(response, written)


@router.get("/{name}/documents/{doc_id:path}", response_model=DocumentOut)
async def get_document(name: str, doc_id: str, knowledge: Knowledge, tenant: Tenant) -> dict:
    """Get a document's active version with its text."""
    return await knowledge.get_document(name, doc_id, tenant=tenant)


@router.delete("/{name}/documents/{doc_id:path}", response_model=Deleted)
async def delete_document(name: str, doc_id: str, knowledge: Knowledge, tenant: Tenant) -> dict:
    """Delete a document and every one of its chunks."""
    await knowledge.delete_document(name, doc_id, tenant=tenant)
    return {"id": doc_id, "object": "document", "deleted": True}
