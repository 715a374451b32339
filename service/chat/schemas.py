"""Chat request and response shapes (OpenAI's).

Only the fields declared here reach vLLM; any other is a 400 that names it. Declared: OpenAI's
chat fields that vLLM implements, and vLLM's sampling and structured-output extensions. Left
out on purpose: whatever changes how the prompt is rendered or tokenized (`chat_template`,
`chat_template_kwargs`, `add_special_tokens`, `add_generation_prompt`, `continue_final_message`,
`documents`, `mm_processor_kwargs`, `truncate_prompt_tokens`), the engine's scheduling and caches
(`priority`, `cache_salt`, which the gateway sets per tenant, `kv_transfer_params`, `request_id`),
and outputs that read back the prompt piecewise (`prompt_logprobs`, `return_prompt_text`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


_FORBID = ConfigDict(extra="forbid")


class ChatMessage(BaseModel):
    model_config = _FORBID

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or OpenAI content parts ([{"type": "text", "text": ...}]); None only with tool calls.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(None, description="The participant's name (templates that render it).")
    tool_calls: list[dict[str, Any]] | None = Field(None, description="An assistant turn's tool calls.")
    tool_call_id: str | None = Field(None, description="The call a `tool` turn answers.")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if isinstance(self.content, list):
            return "\n".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return ""


class RagOptions(BaseModel):
    """lorag's extension: retrieval from a knowledge collection into the prompt."""

    model_config = ConfigDict(extra="forbid")

    collection: str | None = Field(
        None, description="Collection to search; default: the adapter's retrieval default, else LORAG_RAG_COLLECTION."
    )
    top_k: int | None = Field(None, ge=1, description="Chunks to retrieve; default: LORAG_RAG_TOP_K.")
    filter: dict[str, Any] | None = Field(None, description="Metadata filter, as in the search API.")
    mode: Literal["hybrid", "dense", "keyword"] | None = Field(None, description="Search mode; default: LORAG_RAG_MODE.")
    enabled: bool = Field(True, description="false turns retrieval off for this request.")


class StreamOptions(BaseModel):
    model_config = _FORBID

    include_usage: bool | None = Field(None, description="Send a last chunk with the token usage.")
    continuous_usage_stats: bool | None = Field(None, description="Usage in every chunk (vLLM).")


class StructuredOutputs(BaseModel):
    """vLLM's structured outputs: constrain the answer to one of these."""

    model_config = _FORBID

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON schema.")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="An EBNF grammar.")
    json_object: bool | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
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
    # OpenAI's other fields that vLLM implements.
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias.")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = Field(None, description="text, json_object or json_schema.")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    user: str | None = None
    # vLLM's sampling extensions.
    top_k: int | None = Field(None, ge=-1, description="vLLM: sample from the k likeliest tokens (-1: all).")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM: drop tokens below min_p x the likeliest.")
    repetition_penalty: float | None = Field(None, gt=0, description="vLLM: >1 discourages repeats.")
    min_tokens: int | None = Field(None, ge=0, description="vLLM: generate at least this many tokens.")
    ignore_eos: bool | None = Field(None, description="vLLM: keep generating past the end-of-sequence token.")
    stop_token_ids: list[int] | None = Field(None, description="vLLM: token ids that end the answer.")
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = Field(None, description="vLLM: leave special tokens out of the text.")
    spaces_between_special_tokens: bool | None = None
    allowed_token_ids: list[int] | None = Field(None, description="vLLM: sample only these token ids.")
    bad_words: list[str] | None = Field(None, description="vLLM: words the answer may not contain.")
    structured_outputs: StructuredOutputs | None = None
    echo: bool | None = Field(None, description="vLLM: prefix the answer with the last message if its role matches.")
    return_token_ids: bool | None = Field(None, description="vLLM: token ids of the prompt and the answer.")
    rag: RagOptions | None = Field(
        None, description="Retrieval (lorag extension). Absent: retrieval only if the adapter `model` names has "
        "retrieval defaults (GET /v1/adapters/{name}) or LORAG_RAG_COLLECTION is set."
    )


class Citation(BaseModel):
    index: int = Field(description="The [n] the sources block gave this chunk.")
    doc_id: str
    version: int
    chunk_id: str
    chunk: int
    start: int = Field(description="Where the chunk starts in that version's text, in characters (inclusive).")
    end: int = Field(description="Where it ends (exclusive): the document's text[start:end] is the chunk.")
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
