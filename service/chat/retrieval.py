"""Retrieval for chat: search the knowledge base for the latest user turn(s) and ground the prompt.

The sources block is assembled by knowledge.prompting with the served model's own
tokenizer, so the budget is counted in the tokens the engine will see.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from anyio import CapacityLimiter, to_thread
from jinja2 import TemplateError

from knowledge import KnowledgeBase
from knowledge.prompting import Neutraliser, PromptBuilder
from knowledge.search import MAX_QUERY_CHARS
from service.chat.query_embedding import Encoder, QueryEmbedder
from service.chat.schemas import ChatCompletionRequest
from service.errors import EngineUnavailable, InvalidRequest
from service.settings import Settings

log = logging.getLogger("lorag.chat")


@dataclass(frozen=True)
class Grounding:
    messages: list[dict[str, Any]]
    citations: list[dict[str, Any]]
    summary: dict[str, Any]  # collection, sources used/dropped, timings: returned as the response's `rag`


class Retrieval:
    def __init__(
        self, kb: KnowledgeBase, builder: PromptBuilder | None, settings: Settings, encoder: Encoder | None = None
    ):
        """`encoder` embeds the queries (load_query_encoder); default: the knowledge base's embedder."""
        self._kb = kb
        self._builder = builder
        self._settings = settings
        self._queries = QueryEmbedder(encoder or kb.embedder)
        # One search at a time: thirty-two at once in worker threads fought over the GIL, and a
        # 2 ms search took up to a second at the tail (rag bench, 32 concurrent requests).
        self._cpu = CapacityLimiter(1)

    async def close(self) -> None:
        await self._queries.close()

    def neutraliser(self) -> Neutraliser:
        """The served tokenizer's special-token neutraliser: every chat needs it, with retrieval or not."""
        if self._builder is None:
            raise EngineUnavailable(
                "chat needs the served model's tokenizer to keep its special tokens out of supplied text, and "
                f"none could be loaded from {self._settings.model_path}: set LORAG_MODEL to a local copy of "
                "the model (or of its tokenizer)"
            )
        return self._builder.neutraliser

    def wanted(self, request: ChatCompletionRequest, declared: dict[str, Any] | None = None) -> bool:
        """Retrieve if the request says so, else if its adapter declares a collection, else if settings name one."""
        if request.rag is not None:
            return request.rag.enabled
        return bool((declared or {}).get("collection") or self._settings.rag_collection)

    async def ground(
        self,
        request: ChatCompletionRequest,
        max_tokens: int,
        declared: dict[str, Any] | None = None,
        *,
        tenant: str,
    ) -> Grounding:
        """Search (the collection is looked up in the caller's `tenant`) and build the grounded messages.
        Each option comes from the request, else from the adapter's retrieval defaults (`declared`: set
        through the adapter API, else its version's lorag.json `rag`), else from settings."""
        s, rag, declared = self._settings, request.rag, declared or {}

        def option(name: str) -> Any:
            asked = getattr(rag, name) if rag else None
            return asked if asked is not None else declared.get(name)

        collection = option("collection") or s.rag_collection
        if collection is None:
            raise InvalidRequest(
                "retrieval needs a collection: pass rag.collection, or set LORAG_RAG_COLLECTION", param="rag.collection"
            )
        if self._builder is None:
            raise EngineUnavailable(
                "retrieval needs the served model's tokenizer to fit sources in its context, and none could be "
                f"loaded from {s.model_path}: set LORAG_MODEL to a local copy of the model (or of its tokenizer)"
            )
        users = [m for m in request.messages if m.role == "user"]
        query = "\n".join(m.text() for m in users[-s.rag_query_turns:]).strip()
        if not query:
            raise InvalidRequest("retrieval needs a user message with text to search for", param="messages")
        # A turn may be longer than a search query may be: search for its end, where the
        # question usually is, cut at a word boundary.
        cut = len(query) > MAX_QUERY_CHARS
        if cut:
            tail = query[-MAX_QUERY_CHARS:]
            if not query[-MAX_QUERY_CHARS - 1].isspace():  # the cut fell inside a word: drop its end
                tail = tail.split(None, 1)[-1]
            query = tail.strip()
        messages = [m.model_dump(exclude_unset=True) for m in request.messages]
        top_k = option("top_k") or s.rag_top_k
        mode = option("mode") or s.rag_mode
        filter_ = option("filter")
        started = time.perf_counter()
        vector = await self._queries.embed(query) if mode != "keyword" else None
        embed_ms = (time.perf_counter() - started) * 1000  # includes waiting for the batch

        def run() -> Grounding:
            # Search and prompt assembly together, in one worker thread: both are CPU work.
            result = self._kb.search(
                collection, query, top_k=top_k, mode=mode, filter=filter_, query_embedding=vector, tenant=tenant
            )
            started = time.perf_counter()
            try:
                prompt = self._builder.build(messages, result.hits, max_tokens)
            except TemplateError as exc:  # e.g. a template that demands strict user/assistant turns
                raise InvalidRequest(
                    f"the model's chat template refused these messages with the sources added: {exc}",
                    param="messages",
                ) from None
            prompt_ms = (time.perf_counter() - started) * 1000
            citations = [asdict(src) for src in prompt.sources]  # Source's fields are the citation's
            summary = {
                "collection": collection,
                "mode": mode,
                "sources": len(prompt.sources),
                "dropped": len(prompt.dropped),
                "prompt_tokens": prompt.prompt_tokens,
                "query_chars": len(query),
                "query_cut": cut,
                "timings_ms": {
                    "embed": round(embed_ms, 3),
                    "search": round(result.timings.search_ms, 3),
                    "prompt": round(prompt_ms, 3),
                },
            }
            return Grounding(prompt.messages, citations, summary)

        return await to_thread.run_sync(run, limiter=self._cpu)


def load_builder(settings: Settings) -> PromptBuilder | None:
    """The prompt builder with the served model's tokenizer; None (logged) when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(settings.model_path), local_files_only=True)
    except (OSError, ValueError) as exc:
        log.warning("no tokenizer at %s (%s): chat retrieval is unavailable", settings.model_path, exc)
        return None
    return PromptBuilder(tokenizer, settings.engine_max_model_len, settings.rag_system_template)
