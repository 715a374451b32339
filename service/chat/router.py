from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse

from service.chat.schemas import ChatCompletion, ChatCompletionRequest
from service.chat.service import ChatService
from service.dependencies import get_chat

router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def create_chat_completion(
    request: ChatCompletionRequest, chat: Annotated[ChatService, Depends(get_chat)]
) -> JSONResponse | StreamingResponse:
    """Create a chat completion (OpenAI-compatible); `stream: true` answers with server-sent events."""
    admission = await chat.admit(request)
    if request.stream:
        return StreamingResponse(await chat.open_stream(admission), media_type="text/event-stream")
    return JSONResponse(await chat.complete(admission))
