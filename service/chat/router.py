from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from service.chat.schemas import ChatCompletion, ChatCompletionRequest
from service.chat.service import Admission, ChatService, Relay
from service.dependencies import Caller, Tenant, get_chat
from service.json_body import JsonRoute

router = APIRouter(tags=["chat"], route_class=JsonRoute)


class RelayResponse(StreamingResponse):
    """Server-sent events relayed from the engine, closed however the response ends
    (finished, client gone, or never started)."""

    def __init__(self, relay: Relay):
        super().__init__(relay, media_type="text/event-stream")
        self._relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._relay.close()


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {"content": {"text/event-stream": {}}},
        429: {"description": "Too many requests: `overloaded` (the engines' limit), `tenant_inflight_limit` or "
              "`tenant_token_limit` (the tenant's fair share); retry after `Retry-After` seconds."},
    },
)
async def create_chat_completion(
    request: ChatCompletionRequest,
    chat: Annotated[ChatService, Depends(get_chat)],
    tenant: Tenant,
    key: Caller,
    http: Request,
) -> Response:
    """Create a chat completion (OpenAI-compatible); `stream: true` answers with server-sent events."""
    admission = await chat.admit(request, tenant, key)
    if request.stream:
        return RelayResponse(await chat.open_stream(admission))
    answer = await _complete_while_connected(chat, admission, http)
    return JSONResponse(answer) if answer is not None else Response(status_code=499)  # 499: nobody reads it


async def _complete_while_connected(chat: ChatService, admission: Admission, http: Request) -> dict | None:
    """The answer, or None if the client left first: then the engine request is cancelled, its
    connection closed, and vLLM aborts the generation instead of finishing it for nobody."""
    answer = asyncio.ensure_future(chat.complete(admission))
    gone = asyncio.ensure_future(_disconnect(http))
    try:
        await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        answer.cancel()  # a no-op once it has finished
        await asyncio.wait((answer,))  # its cleanup runs: the request ended, the engine connection closed
    return None if answer.cancelled() else answer.result()  # result() raises the request's own error


async def _disconnect(http: Request) -> None:
    """Return once the client has gone. The body has been read: what the server sends next is the disconnect."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
