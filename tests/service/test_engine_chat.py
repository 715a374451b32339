"""EngineChat's stream reading, against an HTTP server whose timing the test sets.

vLLM itself sends its `data: [DONE]` event and the end of the chunked body as two writes; on a
quiet machine both arrive in one read, under load often in two. The real engine cannot be made
to split them on demand, so this server does, byte for byte as vLLM frames a stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from service.engine.chat import EngineChat
from service.engine.pool import Engine
from service.errors import EngineError

EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"x\xe2\x80\xa8y"}}]}'  # U+2028 inside: not a line end
CHUNK = EVENT + b"\n\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Engineish:
    """Answers every POST with a stream of `pieces` (one write each, `pause` between); with
    `hang_up`, closes the connection after them."""

    def __init__(self, pieces: list[bytes], pause: float = 0.05, hang_up: bool = False):
        self.pieces, self.pause, self.hang_up = pieces, pause, hang_up
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                for piece in self.pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(self.pause)
                if self.hang_up:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class Client:
    """An EngineChat on `Engineish`, counting the connections it opens."""

    def __init__(self, port: int):
        self.opened = 0
        self.engine = Engine("engineish", f"http://127.0.0.1:{port}", up=True)
        self.chat = EngineChat(10.0, on_unreachable=lambda _: None, on_connection=self._opened)

    def _opened(self) -> None:
        self.opened += 1

    async def stream(self) -> list[list[bytes]]:
        answer = await self.chat.send(self.engine, {"stream": True})
        try:
            return [events async for events in answer.events()]
        finally:
            answer.close()


@asynccontextmanager
async def serving(engine: Engineish) -> AsyncIterator[Client]:
    server = await asyncio.start_server(engine.handle, "127.0.0.1", 0)
    client = Client(server.sockets[0].getsockname()[1])
    try:
        yield client
    finally:
        await client.chat.close()
        server.close()


def test_a_stream_read_to_done_leaves_its_connection_for_the_next_request():
    # [DONE] in one write, the body's end 50 ms later: the connection is kept only if it is read.
    engine = Engineish([_chunked(CHUNK), _chunked(b"data: [DONE]\n\n"), b"0\r\n\r\n"])

    async def scenario() -> None:
        async with serving(engine) as client:
            for _ in range(3):
                assert await client.stream() == [[EVENT]]
            assert engine.connections == 1
            assert client.opened == 1  # what the gateway's metric counts

    asyncio.run(scenario())


def test_events_split_across_reads_arrive_whole_and_together_when_read_together():
    half = len(CHUNK) // 2
    engine = Engineish([_chunked(CHUNK[:half]), _chunked(CHUNK[half:] + CHUNK + CHUNK),
                        _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"])

    async def scenario() -> None:
        async with serving(engine) as client:
            assert await client.stream() == [[EVENT] * 3]

    asyncio.run(scenario())


@pytest.mark.parametrize("hang_up", [False, True], ids=["body ends", "connection drops"])
def test_a_stream_that_ends_before_done_is_an_error_after_its_events(hang_up):
    engine = Engineish([_chunked(CHUNK)] if hang_up else [_chunked(CHUNK), b"0\r\n\r\n"], hang_up=hang_up)

    async def scenario() -> None:
        async with serving(engine) as client:
            answer = await client.chat.send(client.engine, {"stream": True})
            seen = []
            # The relay turns either into an error event for its client.
            with pytest.raises(EngineError if not hang_up else aiohttp.ClientPayloadError):
                async for events in answer.events():
                    seen.append(events)
            answer.close()
            assert seen == [[EVENT]]

    asyncio.run(scenario())
