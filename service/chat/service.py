"""Chat: admit a request (limits, model), send it to an engine, relay the answer."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from service.auth.keys import ApiKey
from service.chat.fair_share import FairShare, Slot
from service.chat.retrieval import Grounding, Retrieval
from service.chat.schemas import ChatCompletionRequest
from service.engine.chat import EngineAnswer, EngineChat
from service.engine.pool import Engine, EnginePool
from service.errors import EngineError, EngineUnavailable, LimitExceeded, LoragError, Overloaded, envelope
from service.adapters.leases import Lease
from service.adapters.service import AdapterService
from service.metrics import Metrics
from service.models.catalog import ModelCatalog, Target
from service.request_id import current_request_id
from service.settings import Settings

log = logging.getLogger("lorag.chat")

_DONE = b"data: [DONE]\n\n"


@dataclass
class Admission:
    """A request that passed the limits: its target (held until the response ends), the body for
    the engine and, with retrieval, its grounding."""

    target: Target
    lease: Lease | None
    slot: Slot  # the tenant's fair share, released with the tokens used when the request ends
    body: dict[str, Any]
    started: float
    wants_usage: bool = False  # the client asked for the usage chunk in its stream
    grounding: Grounding | None = None
    waiting: bool = False  # sent to an engine that has not answered yet (the queue-depth gauge)
    streamed: int = 0  # stream frames relayed, about a token each: the charge when no usage arrives
    engine: Engine | None = None  # where it was sent; its in-flight count is ours until the end
    ended: bool = False


class ChatService:
    def __init__(
        self,
        settings: Settings,
        engines: EnginePool,
        catalog: ModelCatalog,
        adapters: AdapterService,
        engine_chat: EngineChat,
        retrieval: Retrieval,
        metrics: Metrics,
        fair_share: FairShare,
    ):
        self._settings = settings
        self._engines = engines
        self._catalog = catalog
        self._adapters = adapters
        self._engine_chat = engine_chat
        self._retrieval = retrieval
        self._metrics = metrics
        self._fair_share = fair_share
        self._in_flight = 0  # admitted and not yet ended
        # Per instance: a salt nobody outside this process can compute (vLLM's advice), the same for
        # a tenant's requests while it runs, so a tenant still hits its own cached prefixes.
        self._salt_key = secrets.token_bytes(32)

    def _salt(self, tenant: str) -> str:
        """The tenant's vLLM `cache_salt`: hex (vLLM refuses `/` and `@`), 64 characters (its limit: 128)."""
        return hmac.new(self._salt_key, tenant.encode(), hashlib.sha256).hexdigest()

    async def admit(self, request: ChatCompletionRequest, tenant: str, key: ApiKey | None = None) -> Admission:
        """Check the limits (the tenant's share: its key's or the settings'), resolve (in the caller's
        tenant) and hold the model's version, retrieve if asked, build the engine's body."""
        self._check_limits(request)
        s = self._settings
        # Only declared fields exist (the schema forbids others); a null means the engine's default.
        dumped = request.model_dump(exclude_unset=True, exclude={"rag"}, by_alias=True)
        body = {k: v for k, v in dumped.items() if v is not None}
        # Every string a template renders, with retrieval or without: no special token's text.
        neutraliser = self._retrieval.neutraliser()
        body["messages"] = [neutraliser.message(m) for m in body["messages"]]
        if "tools" in body:
            body["tools"] = neutraliser.value(body["tools"])
        # Tenants never share the engine's prefix cache: a cache hit is a timing signal that
        # tells one tenant another's prompt.
        body["cache_salt"] = self._salt(tenant)
        # Resolved once, here: the request keeps this version to its end, whatever is activated meanwhile.
        target = self._catalog.resolve(tenant, request.model)
        # The tenant's share first: a tenant at its own limit is told so, whatever the engines' load.
        slot = self._fair_share.take(tenant, key)
        # vLLM queues without bound; past this many, a quick 429 beats a slow timeout.
        capacity = s.max_inflight_per_engine * max(1, len(self._engines.up()))
        if self._in_flight >= capacity:
            slot.release(0)
            raise Overloaded(
                f"{self._in_flight} requests are in flight, the most the engines take "
                f"({s.max_inflight_per_engine} per engine, LORAG_MAX_INFLIGHT_PER_ENGINE); retry after a second"
            )
        self._in_flight += 1
        self._metrics.in_flight.inc()
        admission = Admission(target, self._adapters.hold(target), slot, body, time.perf_counter())
        try:
            await self._adapters.ensure_loaded(target)
            body["model"] = target.served
            if request.max_tokens is None and request.max_completion_tokens is None:
                body["max_tokens"] = s.max_tokens
            if request.stream:
                options = body.get("stream_options") or {}
                admission.wants_usage = bool(options.get("include_usage"))
                options = {k: v for k, v in options.items() if v is not None}
                body["stream_options"] = {**options, "include_usage": True}  # for the token metrics
            if self._retrieval.wanted(request, target.rag):
                max_tokens = body.get("max_completion_tokens") or body["max_tokens"]
                admission.grounding = await self._retrieval.ground(request, max_tokens, target.rag, tenant=tenant)
                body["messages"] = admission.grounding.messages
                for stage, ms in admission.grounding.summary["timings_ms"].items():
                    self._metrics.retrieval.labels(tenant, stage).observe(ms / 1000)
        except BaseException:
            self.end(admission, "rejected")
            raise
        return admission

    def end(self, admission: Admission, outcome: str, usage: dict[str, Any] | None = None) -> None:
        """Release the request's version and record it; only the first call counts."""
        if admission.ended:
            return
        admission.ended = True
        self._answered(admission)
        self._release_engine(admission)
        self._in_flight -= 1
        self._metrics.in_flight.dec()
        if admission.lease is not None:
            admission.lease.release()
        labels = admission.target.labels
        self._metrics.requests.labels(*labels, outcome).inc()
        self._metrics.latency.labels(*labels).observe(time.perf_counter() - admission.started)
        used = None
        for kind in ("prompt", "completion"):
            count = (usage or {}).get(f"{kind}_tokens")
            if isinstance(count, int):
                self._metrics.tokens.labels(*labels, kind).inc(count)
                used = (used or 0) + count
        # Without the engine's usage (the client left, the stream broke): what was streamed.
        admission.slot.release(admission.streamed if used is None else used)

    def _answered(self, admission: Admission, first_token: bool = False) -> None:
        """The engine's first answer arrived (or the request ended without one)."""
        if admission.waiting:
            admission.waiting = False
            self._metrics.waiting.dec()
            if first_token:
                self._metrics.first_token.labels(*admission.target.labels).observe(
                    time.perf_counter() - admission.started
                )

    def _check_limits(self, request: ChatCompletionRequest) -> None:
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

    async def complete(self, admission: Admission) -> dict[str, Any]:
        outcome, answer = "error", None
        try:
            answer = await (await self._send(admission)).json()
            answer["model"] = admission.target.shown
            outcome = "ok"
        except asyncio.CancelledError:  # the client went away (chat router): the engine request is closed
            outcome = "cancelled"
            raise
        finally:
            self.end(admission, outcome, answer.get("usage") if answer else None)
        if admission.grounding is not None:
            answer["citations"] = admission.grounding.citations
            answer["rag"] = admission.grounding.summary
        return answer

    async def open_stream(self, admission: Admission) -> Relay:
        """Start the engine's stream; errors before the first byte still become a plain HTTP error."""
        try:
            answer = await self._send(admission)
        except BaseException:
            self.end(admission, "error")
            raise
        return Relay(self._relay(answer, admission), answer, lambda: self.end(admission, "cancelled"))

    async def _send(self, admission: Admission) -> EngineAnswer:
        """Send to the least busy engine; one that cannot be reached, or drops the request before
        its status line, is left for the next (nothing has reached the client yet)."""
        target = admission.target
        tried: list[Engine] = []
        failure: EngineUnavailable | None = None
        admission.waiting = True
        self._metrics.waiting.inc()
        while True:
            try:
                engine = self._engines.pick(target.served if target.version else None, avoid=tried)
            except EngineUnavailable:
                if failure is not None:  # every engine was tried: the last one's own reason
                    raise failure from None
                raise
            admission.engine = engine
            engine.inflight += 1
            try:
                # One id from the client to the engine's log: vLLM names its request after it.
                return await self._engine_chat.send(engine, admission.body,
                                                    headers={"X-Request-Id": current_request_id()})
            except EngineUnavailable as exc:
                self._release_engine(admission)
                tried.append(engine)
                failure = exc
                log.warning("engine %s failed before answering (%s); trying another", engine.name, exc.message)

    @staticmethod
    def _release_engine(admission: Admission) -> None:
        if admission.engine is not None:
            admission.engine.inflight -= 1
            admission.engine = None

    async def _relay(self, answer: EngineAnswer, admission: Admission) -> AsyncGenerator[bytes, None]:
        """Re-emit the engine's SSE events whole; a broken stream ends with an error event and [DONE].

        With retrieval, one more chunk (no choices; `citations` and `rag`) goes just before [DONE].
        The usage chunk (always asked for, for the metrics) is passed on only if the client asked.
        Frames that arrive together leave together: one write to the client for each read from
        the engine, whose cost (a system call and the ASGI send chain) is per write, not per byte.
        """
        grounding = admission.grounding
        target = admission.target
        # Another tenant's engine-side name ("acme/legal@v") is shown as the client knows it ("legal@v").
        renamed = (f'"model":"{target.served}"'.encode(), f'"model":"{target.shown}"'.encode())
        head: dict[str, Any] | None = None  # id, created, model of the stream, for the citations chunk
        usage: dict[str, Any] | None = None
        outcome = "cancelled"  # unless it completes or breaks: the client went away
        try:
            async for events in answer.events():
                out = []
                for frame in events:
                    if renamed[0] != renamed[1]:
                        frame = frame.replace(*renamed)
                    if head is None and grounding is not None and frame.startswith(b"data: {"):
                        first = json.loads(frame[len(b"data: "):])
                        head = {k: first.get(k) for k in ("id", "created", "model")}
                    if b'"choices":[]' in frame and b'"usage"' in frame:
                        usage = json.loads(frame[len(b"data: "):]).get("usage")
                        if not admission.wants_usage:
                            continue
                    elif admission.waiting:
                        self._answered(admission, first_token=True)
                    out.append(frame)
                if out:
                    admission.streamed += len(out)
                    out.append(b"")
                    yield b"\n\n".join(out)
            if grounding is not None:
                chunk = {**(head or {}), "object": "chat.completion.chunk", "choices": [],
                         "citations": grounding.citations, "rag": grounding.summary}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            outcome = "ok"
        except Exception as exc:  # whatever broke, the client gets a whole error frame and [DONE]
            message = exc.message if isinstance(exc, LoragError) else f"the engine stream broke: {exc!r}"
            outcome = "error"
            log.warning("stream aborted: %s", message)
            error = envelope(message, "engine_error", code="engine_stream_broken")
            yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            # Also reached when the client goes away (the generator is closed): the version is released.
            self.end(admission, outcome, usage)
            answer.close()
        yield _DONE


class Relay:
    """An open engine stream: iterate it for the client's frames; `close()` must follow, whatever
    happened. A generator that never started runs no `finally`, so closing it alone would leave the
    version held and the engine generating for nobody."""

    def __init__(self, frames: AsyncGenerator[bytes, None], answer: EngineAnswer, end: Callable[[], None]):
        self._frames = frames
        self._answer = answer
        self._end = end

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._frames

    async def close(self) -> None:
        await self._frames.aclose()
        self._end()  # a no-op when the relay already ended the request
        self._answer.close()  # aborts the engine's request if it is still running
