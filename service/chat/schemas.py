"""Chat request and response shapes (OpenAI's); unknown OpenAI fields pass through to vLLM."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or OpenAI content parts ([{"type": "text", "text": ...}]); None only with tool calls.
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if isinstance(self.content, list):
            return "\n".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return ""


class RagOptions(BaseModel):
    """lorag's extension: retrieval from a knowledge collection into the prompt."""

    model_config = ConfigDict(extra="forbid")

    collection: str | None = Field(None, description="Collection to search; default: LORAG_RAG_COLLECTION.")
    top_k: int | None = Field(None, ge=1, description="Chunks to retrieve; default: LORAG_RAG_TOP_K.")
    filter: dict[str, Any] | None = Field(None, description="Metadata filter, as in the search API.")
    mode: Literal["hybrid", "dense", "keyword"] | None = Field(None, description="Search mode; default: LORAG_RAG_MODE.")
    enabled: bool = Field(True, description="false turns retrieval off for this request.")


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
    rag: RagOptions | None = Field(
        None, description="Retrieval (lorag extension). Absent: retrieval only if LORAG_RAG_COLLECTION is set."
    )


class Citation(BaseModel):
    index: int = Field(description="The [n] the sources block gave this chunk.")
    doc_id: str
    version: int
    chunk_id: str
    chunk: int
    score: float
    snippet: str


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    """Response of a non-streaming request; a streaming one sends `chat.completion.chunk` SSE events."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: dict[str, Any] | None = None
    citations: list[Citation] | None = Field(
        None, description="Sources placed in the prompt (with retrieval); streamed in one chunk before [DONE]."
    )
    rag: dict[str, Any] | None = Field(None, description="Retrieval summary: collection, sources used and dropped, timings.")
