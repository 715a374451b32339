"""Chat request and response shapes (OpenAI's); unknown OpenAI fields pass through to vLLM."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or OpenAI content parts ([{"type": "text", "text": ...}]); None only with tool calls.
    content: str | list[dict[str, Any]] | None = None

    def text_length(self) -> int:
        if isinstance(self.content, str):
            return len(self.content)
        if isinstance(self.content, list):
            return sum(len(str(part.get("text", ""))) for part in self.content)
        return 0


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"model": "lorag-demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}
            ]
        },
    )

    model: str = Field(description="The base model's name (see GET /v1/models).")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, description="Output token cap; defaults to the service's limit.")
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    """Response of a non-streaming request; a streaming one sends `chat.completion.chunk` SSE events."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: dict[str, Any] | None = None
