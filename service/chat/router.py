from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from service.chat.schemas import ChatCompletion, ChatCompletionRequest
from service.chat.service import ChatService, Relay
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
    request: ChatCompletionRequest, chat: Annotated[ChatService, Depends(get_chat)], tenant: Tenant, key: Caller
) -> JSONResponse | StreamingResponse:
    """Create a chat completion (OpenAI-compatible); `stream: true` answers with server-sent events."""
    admission = await chat.admit(request, tenant, key)
    if request.stream:
        return RelayResponse(await chat.open_stream(admission))
    return JSONResponse(await chat.complete(admission))
