"""ASGI middleware that refuses request bodies over a size limit before anything parses them."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTooLarge, InvalidRequest, send_error


class BodyLimit:
    """`max_bytes` for every request, `upload_max_bytes` for those whose "METHOD /path" `upload_paths` matches whole."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_max_bytes: int, upload_paths: str):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_max_bytes = upload_max_bytes
        self.upload_paths = re.compile(upload_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = f"{scope['method']} {scope['path']}"  # PUT .../documents/bulk is a document called "bulk"
        limit = self.upload_max_bytes if self.upload_paths.fullmatch(route) else self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await send_error(send, InvalidRequest("Content-Length is not a number"))
                return
            if int(declared) > limit:
                await send_error(send, BodyTooLarge(limit))
                return
        else:
            # A chunked body has no Content-Length: read it here, up to the limit, and replay it.
            # (Raising from inside FastAPI's body parsing would come out as a generic 400.)
            chunks, received, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    # The client left before its last chunk: a body that did not arrive whole is
                    # not processed (the first lines of a bulk upload would be written), and
                    # there is no one to answer.
                    return
                chunks.append(message.get("body", b""))
                received += len(chunks[-1])
                if received > limit:
                    await send_error(send, BodyTooLarge(limit))
                    return
                more = message.get("more_body", False)
            body, upstream, replayed = b"".join(chunks), receive, False

            async def replay() -> Message:
                nonlocal replayed
                if replayed:
                    return await upstream()  # after the body: disconnects
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            receive = replay

        await self.app(scope, receive, send)
