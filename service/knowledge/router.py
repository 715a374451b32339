from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile, status

from service.dependencies import get_knowledge
from service.knowledge.schemas import (
    BulkResult,
    CollectionCreate,
    CollectionOut,
    Deleted,
    DocumentOut,
    DocumentPage,
    DocumentPut,
    SearchRequest,
    SearchResponse,
    WriteResultOut,
)
from service.knowledge.service import KnowledgeService

router = APIRouter(prefix="/v1/collections", tags=["knowledge"])
Knowledge = Annotated[KnowledgeService, Depends(get_knowledge)]


def _write_status(response: Response, result: dict) -> dict:
    response.status_code = status.HTTP_201_CREATED if result["status"] == "created" else status.HTTP_200_OK
    return result


@router.post("", response_model=CollectionOut, status_code=status.HTTP_201_CREATED)
async def create_collection(body: CollectionCreate, knowledge: Knowledge) -> dict:
    """Create a collection (409 if it exists)."""
    return await knowledge.create_collection(body.name, body.metadata)


@router.get("")
async def list_collections(knowledge: Knowledge) -> dict:
    """List collections."""
    return {"object": "list", "data": await knowledge.list_collections()}


@router.get("/{name}", response_model=CollectionOut)
async def get_collection(name: str, knowledge: Knowledge) -> dict:
    """Get one collection with its document count."""
    return await knowledge.get_collection(name)


@router.delete("/{name}", response_model=Deleted)
async def delete_collection(name: str, knowledge: Knowledge) -> dict:
    """Delete a collection with all its documents and chunks."""
    await knowledge.delete_collection(name)
    return {"id": name, "object": "collection", "deleted": True}


@router.post("/{name}/search", response_model=SearchResponse)
async def search(name: str, body: SearchRequest, knowledge: Knowledge) -> dict:
    """Search the active version of every document: dense, keyword (BM25) or hybrid (fused)."""
    return await knowledge.search(name, body.query, body.top_k, body.mode, body.filter)


@router.post(
    "/{name}/documents/bulk",
    response_model=BulkResult,
    openapi_extra={"requestBody": {"content": {"application/x-ndjson": {"schema": {"type": "string"}}}}},
)
async def bulk_upsert(name: str, request: Request, knowledge: Knowledge) -> dict:
    """Create or update many documents from JSON lines: {"id", "text", "metadata"?} per line."""
    return await knowledge.put_bulk(name, await request.body())


@router.post("/{name}/files", response_model=WriteResultOut, responses={201: {"model": WriteResultOut}})
async def upload_file(
    name: str,
    response: Response,
    knowledge: Knowledge,
    file: Annotated[UploadFile, File(description=".txt, .md, .html or .pdf")],
    doc_id: Annotated[str | None, Form(description="Document id; default: the file name.")] = None,
    metadata: Annotated[str | None, Form(description="Metadata as a JSON object.")] = None,
) -> dict:
    """Upload a file; its text becomes a document (a new version if the id exists and the text changed)."""
    data = await file.read()
    return _write_status(response, await knowledge.put_file(name, file.filename or "", data, doc_id, metadata))


@router.get("/{name}/documents", response_model=DocumentPage)
async def list_documents(
    name: str,
    knowledge: Knowledge,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="The `next` of the previous page.")] = None,
) -> dict:
    """List documents (active versions), ordered by id, a page at a time."""
    return await knowledge.list_documents(name, limit, after)


@router.put("/{name}/documents/{doc_id:path}", response_model=WriteResultOut, responses={201: {"model": WriteResultOut}})
async def put_document(name: str, doc_id: str, body: DocumentPut, response: Response, knowledge: Knowledge) -> dict:
    """Create or replace a document: changed content becomes the next version, atomically; same content is a no-op."""
    return _write_status(response, await knowledge.put_document(name, doc_id, body.text, body.metadata))


@router.get("/{name}/documents/{doc_id:path}", response_model=DocumentOut)
async def get_document(name: str, doc_id: str, knowledge: Knowledge) -> dict:
    """Get a document's active version with its text."""
    return await knowledge.get_document(name, doc_id)


@router.delete("/{name}/documents/{doc_id:path}", response_model=Deleted)
async def delete_document(name: str, doc_id: str, knowledge: Knowledge) -> dict:
    """Delete a document and every one of its chunks."""
    await knowledge.delete_document(name, doc_id)
    return {"id": doc_id, "object": "document", "deleted": True}
