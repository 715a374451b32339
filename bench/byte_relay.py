"""The cheapest relay there is: TCP bytes copied from one socket to the other, nothing parsed.

    .venv/bin/python -m bench.byte_relay UPSTREAM_HOST UPSTREAM_PORT LISTEN_PORT

The stream relay benchmark runs rounds through it as a third target. Whatever any gateway
does, it at least reads each frame from the engine and writes it to the client; this relay
does only that (asyncio protocols on uvloop, one read and one write a frame), so its
throughput is the ceiling for a relay process on the machine at hand, and the gap
between it and direct is what the machine charges for relaying at all.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class Upstream(asyncio.Protocol):
    """The connection to the engine: what it sends goes straight to the client."""

    def __init__(self, client: asyncio.Transport):
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class Client(asyncio.Protocol):
    """A client's connection: opens one to the engine and copies both ways."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.engine: asyncio.Transport | None = None
        self.early: list[bytes] = []  # what the client sent before the engine connection was up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        asyncio.ensure_future(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self.engine, _ = await loop.create_connection(lambda: Upstream(self.transport), self.host, self.port)
        for data in self.early:
            self.engine.write(data)

    def data_received(self, data: bytes) -> None:
        if self.engine is None:
            self.early.append(data)
        else:
            self.engine.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.engine is not None:
            self.engine.close()


async def serve(host: str, port: int, listen: int) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: Client(host, port), "127.0.0.1", listen)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
