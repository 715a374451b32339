"""Domain errors and the one place that maps every error to the envelope.

Envelope (OpenAI's shape): {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Send

from knowledge.errors import (
    CollectionExists,
    CollectionNotFound,
    DocumentNotFound,
    KnowledgeError,
    ReindexRequired,
    ReindexRunning,
    StoreUnavailable,
)
from knowledge.parsing import UnreadableFile, UnsupportedFile

log = logging.getLogger(__name__)


class LoragError(Exception):
    """Base of every error a caller may see; subclasses fix the status and type."""

    status_code = 400
    type = "invalid_request_error"
    retry_after: int | None = None  # seconds; set where retrying later can succeed (503, 429)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def extra_headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None


class InvalidRequest(LoragError):
    pass


class Unauthorized(LoragError):
    status_code = 401
    type = "authentication_error"

    def extra_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(LoragError):
    status_code = 403
    type = "permission_error"

    def __init__(self, message: str):
        super().__init__(message, code="missing_scope")


class LimitExceeded(LoragError):
    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, param=param, code="limit_exceeded")


class BodyTooLarge(LoragError):
    status_code = 413

    def __init__(self, limit: int):
        super().__init__(
            f"request body is larger than {limit} bytes; send less "
            "(limits: LORAG_MAX_BODY_BYTES, LORAG_MAX_UPLOAD_BYTES for uploads and bulk)",
            code="body_too_large",
        )


class ModelNotFound(LoragError):
    status_code = 404
    type = "not_found_error"

    def __init__(self, name: str, known: list[str]):
        super().__init__(
            f"model {name!r} does not exist; known models: {', '.join(known)}", param="model", code="model_not_found"
        )


class Overloaded(LoragError):
    """Every engine has as many requests in flight as the limit allows."""

    status_code = 429
    type = "rate_limit_error"
    retry_after = 1

    def __init__(self, message: str):
        super().__init__(message, code="overloaded")


class TenantLimited(LoragError):
    """The caller's tenant has as many requests in flight, or has used as many tokens this minute,
    as its share allows (`code`: tenant_inflight_limit, tenant_token_limit)."""

    status_code = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, code: str, retry_after: int):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class EngineUnavailable(LoragError):
    status_code = 503
    type = "engine_unavailable"
    retry_after = 5

    def __init__(self, message: str = "the generation engine is not ready; retry shortly"):
        super().__init__(message, code="engine_unavailable")


class Draining(LoragError):
    """The service is shutting down: it lets requests in flight finish and takes no new ones."""

    status_code = 503
    type = "service_unavailable"
    retry_after = 1

    def __init__(self) -> None:
        super().__init__("this instance is shutting down; retry, and another instance will answer", code="draining")


class TooManyConnections(LoragError):
    """More client connections are open than LORAG_MAX_CONNECTIONS allows."""

    status_code = 503
    type = "service_unavailable"
    retry_after = 1

    def __init__(self) -> None:
        super().__init__("too many open connections to this instance (LORAG_MAX_CONNECTIONS); retry shortly, "
                         "or reuse one connection for many requests", code="too_many_connections")


class EngineError(LoragError):
    """The engine answered with a server error or broke the connection."""

    status_code = 502
    type = "engine_error"


class EngineRejected(LoragError):
    """The engine refused the request as invalid (it knows limits we do not, e.g. context length)."""

    def __init__(self, status_code: int, message: str, param: str | None):
        super().__init__(message, param=param, code="engine_rejected")
        self.status_code = status_code
        self.type = "not_found_error" if status_code == 404 else "invalid_request_error"


class AdapterNotFound(LoragError):
    status_code = 404
    type = "not_found_error"

    def __init__(self, message: str):
        super().__init__(message, code="adapter_not_found")


class AdapterConflict(LoragError):
    """The registry's state forbids the change (deleting an active or held version, no version to roll back to)."""

    status_code = 409
    type = "conflict_error"

    def __init__(self, message: str, *, code: str = "adapter_conflict"):
        super().__init__(message, code=code)


class AdapterRejected(LoragError):
    """An uploaded adapter failed validation or its canary; nothing served was touched."""

    status_code = 422

    def __init__(self, message: str, *, code: str, status_code: int = 422):
        super().__init__(message, code=code)
        self.status_code = status_code


class ActivationFailed(LoragError):
    """An engine refused to load a version; the previous version keeps serving."""

    status_code = 502
    type = "engine_error"

    def __init__(self, message: str):
        super().__init__(message, code="activation_failed")


# Knowledge errors are raised by a package that knows nothing of HTTP; their
# status is decided here. Anything not listed is a caller's mistake: 400.
_KNOWLEDGE_STATUS: dict[type[KnowledgeError], tuple[int, str]] = {
    CollectionNotFound: (404, "not_found_error"),
    DocumentNotFound: (404, "not_found_error"),
    CollectionExists: (409, "conflict_error"),
    ReindexRequired: (409, "conflict_error"),
    ReindexRunning: (409, "conflict_error"),
    UnsupportedFile: (415, "invalid_request_error"),
    UnreadableFile: (422, "invalid_request_error"),
    StoreUnavailable: (503, "service_unavailable"),
}
KNOWLEDGE_RETRY_AFTER_S = 5  # sent with a 503: the backing store may be back by then


def _knowledge_status(exc: KnowledgeError) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in _KNOWLEDGE_STATUS:
            return _KNOWLEDGE_STATUS[cls]
    return 400, "invalid_request_error"


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def envelope(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


async def send_error(send: Send, error: LoragError, headers: dict[str, str] | None = None) -> None:
    """The error envelope, sent from ASGI middleware (outside FastAPI's handlers)."""
    payload = json.dumps(envelope(error.message, error.type, error.param, error.code)).encode()
    extra = {**(error.extra_headers() or {}), **(headers or {})}
    await send({
        "type": "http.response.start",
        "status": error.status_code,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                    *((k.lower().encode(), v.encode()) for k, v in extra.items())],
    })
    await send({"type": "http.response.body", "body": payload})


def _respond(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoragError)
    async def _domain(_: Request, exc: LoragError) -> JSONResponse:
        return _respond(exc.status_code, envelope(exc.message, exc.type, exc.param, exc.code), exc.extra_headers())

    @app.exception_handler(KnowledgeError)
    async def _knowledge(_: Request, exc: KnowledgeError) -> JSONResponse:
        status, type_ = _knowledge_status(exc)
        headers = {"Retry-After": str(KNOWLEDGE_RETRY_AFTER_S)} if status == 503 else None
        return _respond(status, envelope(str(exc), type_, code=_snake(type(exc).__name__)), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers malformed requests with 400, and so do we; the first
        # problem is named with its location so the caller knows what to fix.
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "")
            return _respond(400, envelope(f"request body is not valid JSON: {detail}", "invalid_request_error",
                                          code="invalid_json"))
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return _respond(400, envelope(message, "invalid_request_error", param, "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _respond(exc.status_code, envelope(str(exc.detail), type_), getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> JSONResponse:
        # The body did not arrive whole, so nothing was done with it; the answer reaches no one.
        return _respond(400, envelope("the request body did not arrive whole", "invalid_request_error",
                                      code="incomplete_body"))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _respond(500, envelope("internal error; see the service log", "internal_error"))
