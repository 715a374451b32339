"""ASGI middleware that refuses request bodies over a size limit before anything parses them."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTooLarge, envelope


class BodyLimit:
    """`max_bytes` for every request, `upload_max_bytes` for paths ending in one of `upload_suffixes`."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_max_bytes: int, upload_suffixes: tuple[str, ...]):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_max_bytes = upload_max_bytes
        self.upload_suffixes = upload_suffixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_max_bytes if scope["path"].endswith(self.upload_suffixes) else self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _refuse(send, 400, envelope("Content-Length is not a number", "invalid_request_error"))
                return
            if int(declared) > limit:
                error = BodyTooLarge(limit)
                await _refuse(send, 413, envelope(error.message, error.type, code=error.code))
                return

        # A chunked body has no Content-Length: count as it arrives.
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


async def _refuse(send: Send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
    })
    await send({"type": "http.response.body", "body": payload})
