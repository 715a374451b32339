"""Chat: admit a request (limits, model), send it to an engine, relay the answer."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from service.chat.retrieval import Grounding, Retrieval
from service.chat.schemas import ChatCompletionRequest
from service.engine.pool import Engine, EnginePool
from service.errors import EngineError, EngineRejected, EngineUnavailable, LimitExceeded, LoragError, envelope
from service.models.catalog import ModelCatalog
from service.settings import Settings

log = logging.getLogger("lorag.chat")

_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Admission:
    """A request that passed the limits: the body for the engine and, with retrieval, its grounding."""

    body: dict[str, Any]
    grounding: Grounding | None = None


class ChatService:
    def __init__(
        self,
        settings: Settings,
        engines: EnginePool,
        catalog: ModelCatalog,
        http: httpx.AsyncClient,
        retrieval: Retrieval,
    ):
        self._settings = settings
        self._engines = engines
        self._catalog = catalog
        self._http = http
        self._retrieval = retrieval

    async def admit(self, request: ChatCompletionRequest) -> Admission:
        """Check the request against the limits, retrieve if asked, and build the body the engine gets."""
        s = self._settings
        if len(request.messages) > s.max_messages:
            raise LimitExceeded(
                f"{len(request.messages)} messages is more than the limit of {s.max_messages}; "
                "send fewer (LORAG_MAX_MESSAGES)",
                param="messages",
            )
        for i, message in enumerate(request.messages):
            if len(message.text()) > s.max_message_chars:
                raise LimitExceeded(
                    f"message {i} has {len(message.text())} characters, more than the limit of "
                    f"{s.max_message_chars}; shorten it (LORAG_MAX_MESSAGE_CHARS)",
                    param=f"messages.{i}.content",
                )
        for field in ("max_tokens", "max_completion_tokens"):
            asked = getattr(request, field)
            if asked is not None and asked > s.max_tokens:
                raise LimitExceeded(
                    f"{field}={asked} is more than the limit of {s.max_tokens}; ask for fewer (LORAG_MAX_TOKENS)",
                    param=field,
                )
        if request.n is not None and request.n > s.max_n:
            raise LimitExceeded(f"n={request.n} is more than the limit of {s.max_n} (LORAG_MAX_N)", param="n")

        body = request.model_dump(exclude_unset=True, exclude={"rag"})
        body["model"] = self._catalog.resolve(request.model)
        if request.max_tokens is None and request.max_completion_tokens is None:
            body["max_tokens"] = s.max_tokens
        if not self._retrieval.wanted(request):
            return Admission(body)
        max_tokens = body.get("max_completion_tokens") or body["max_tokens"]
        grounding = await self._retrieval.ground(request, max_tokens)
        body["messages"] = grounding.messages
        return Admission(body, grounding)

    async def complete(self, admission: Admission) -> dict[str, Any]:
        response = await self._send(admission.body, stream=False)
        try:
            await response.aread()
        except httpx.HTTPError as exc:
            raise EngineError(f"the engine broke off the response: {exc}") from exc
        finally:
            await response.aclose()
        try:
            answer = response.json()
        except ValueError as exc:
            raise EngineError(f"the engine answered with something that is not JSON: {exc}") from exc
        if admission.grounding is not None:
            answer["citations"] = admission.grounding.citations
            answer["rag"] = admission.grounding.summary
        return answer

    async def open_stream(self, admission: Admission) -> AsyncIterator[bytes]:
        """Start the engine's stream; errors before the first byte still become a plain HTTP error."""
        response = await self._send(admission.body, stream=True)
        return self._relay(response, admission.grounding)

    async def _send(self, body: dict[str, Any], stream: bool) -> httpx.Response:
        engine = self._engines.pick()
        request = self._http.build_request(
            "POST", f"{engine.url}/v1/chat/completions", json=body, timeout=self._timeout()
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.ConnectError as exc:
            self._engines.mark_down(engine)
            raise EngineUnavailable(f"the engine is not reachable: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise EngineError(f"the engine did not answer in time ({exc.__class__.__name__})") from exc
        except httpx.TransportError as exc:  # the engine died between our request and its answer
            raise EngineUnavailable(f"the engine dropped the request: {exc!r}") from exc
        except Exception as exc:
            # httpcore can fail outside its own error types when the engine's socket vanishes
            # mid-request (seen: AttributeError on a closed socket); still the engine's failure.
            log.exception("engine request failed")
            raise EngineUnavailable(f"the engine dropped the request: {exc!r}") from exc
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
            raise _engine_failure(engine, response)
        return response

    async def _relay(self, response: httpx.Response, grounding: Grounding | None) -> AsyncIterator[bytes]:
        """Re-emit the engine's SSE events whole; a broken stream ends with an error event and [DONE].

        With retrieval, one more chunk (no choices; `citations` and `rag`) goes just before [DONE].
        """
        event: list[str] = []
        done = False
        head: dict[str, Any] | None = None  # id, created, model of the stream, for the citations chunk
        try:
            async for line in response.aiter_lines():
                if line:
                    event.append(line)
                    continue
                if not event:
                    continue
                frame, event = "\n".join(event), []
                if frame == "data: [DONE]":
                    done = True
                    break
                if head is None and grounding is not None and frame.startswith("data: {"):
                    first = json.loads(frame[len("data: "):])
                    head = {k: first.get(k) for k in ("id", "created", "model")}
                yield f"{frame}\n\n".encode()
            if not done:
                raise EngineError("the engine ended the stream before it was complete")
            if grounding is not None:
                chunk = {**(head or {}), "object": "chat.completion.chunk", "choices": [],
                         "citations": grounding.citations, "rag": grounding.summary}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
        except Exception as exc:  # whatever broke, the client gets a whole error frame and [DONE]
            message = exc.message if isinstance(exc, LoragError) else f"the engine stream broke: {exc!r}"
            log.warning("stream aborted: %s", message)
            error = envelope(message, "engine_error", code="engine_stream_broken")
            yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            await response.aclose()
        yield _DONE

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self._settings.engine_timeout_s, connect=5.0)


def _engine_failure(engine: Engine, response: httpx.Response) -> LoragError:
    """Turn an engine's error answer into our error: its 4xx pass through, its 5xx become 502."""
    try:
        payload = response.json()
    except ValueError:
        payload = {}
    error = payload.get("error") if isinstance(payload.get("error"), dict) else payload
    message = str(error.get("message") or response.text[:500] or "no message")
    if 400 <= response.status_code < 500:
        return EngineRejected(response.status_code, message, error.get("param"))
    log.error("engine %s answered %d: %s", engine.name, response.status_code, message)
    return EngineError(f"the engine failed ({response.status_code}): {message}")
