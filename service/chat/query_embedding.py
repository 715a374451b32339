"""Query embeddings for chat retrieval, batched across concurrent requests.

Embedding one short query costs about as much as embedding thirty-two together
(the model's fixed per-call cost dominates), and under load every request
brings one. So requests queue their query, and one worker embeds everything
queued while the previous batch ran, in a single call.

A batch is shared, its failures are not: one text the tokenizer refuses fails the
whole call, so a failed batch is settled again without the texts no tokenizer can
read (each refused with a 400 that says why), and if it still fails, one query at a
time. Only the request whose query fails alone gets its error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from anyio import to_thread

from knowledge import Embedder
from service.errors import InvalidRequest
from service.settings import Settings

log = logging.getLogger("lorag.chat")

MAX_BATCH = 64


class Encoder(Protocol):
    """Texts → L2-normalised float32 vectors of shape (n, dim): the torch Embedder or its ONNX export."""

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def load_query_encoder(settings: Settings, embedder: Embedder) -> Encoder:
    """The encoder LORAG_QUERY_ENCODER names: the embedder itself (torch) or its ONNX export (blocking: seconds)."""
    if settings.query_encoder == "torch":
        log.info("chat queries are embedded with torch (LORAG_QUERY_ENCODER=torch)")
        return embedder
    from knowledge.query_encoder import OnnxEncoder  # onnxruntime: loaded only when chosen

    encoder = OnnxEncoder(embedder, settings.home / "cache" / "query-encoder", threads=settings.torch_threads)
    log.info("chat queries are embedded with ONNX Runtime (%s export %s)",
             "new" if encoder.exported else "cached", encoder.path)
    return encoder


class QueryEmbedder:
    def __init__(self, encoder: Encoder):
        self._encoder = encoder
        self._queue: asyncio.Queue[tuple[str, asyncio.Future]] = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    async def embed(self, query: str) -> np.ndarray:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="query-embedder")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((query, future))
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(q, f) for q, f in batch if not f.cancelled()]
            if batch:
                await self._settle(batch)

    async def _settle(self, batch: list[tuple[str, asyncio.Future]]) -> None:
        """Give every waiter in `batch` its vector or its own error; none hangs, none fails for another's text."""
        try:
            vectors = await to_thread.run_sync(self._encoder.encode, [q for q, _ in batch])
        except Exception as exc:
            readable = []
            for query, future in batch:
                why = unreadable(query)
                if why is None:
                    readable.append((query, future))
                else:
                    _fail(future, InvalidRequest(
                        f"the retrieval query (from the latest user message) cannot be embedded: {why}",
                        param="messages",
                    ))
            if len(readable) < len(batch):  # the refused texts are out: the rest will likely go through together
                if readable:
                    await self._settle(readable)
            elif len(batch) == 1:  # its own failure (a 500, logged with its request)
                _fail(batch[0][1], exc)
            else:
                log.warning("a batch of %d queries failed (%r): embedding them one at a time", len(batch), exc)
                for item in batch:
                    await self._settle([item])
            return
        for (_, future), vector in zip(batch, vectors):
            if not future.done():
                future.set_result(vector)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():  # its request may have gone (cancelled)
        future.set_exception(exc)


def unreadable(text: str) -> str | None:
    """Why no tokenizer can read `text` (a lone surrogate has no UTF-8 form), or None."""
    if not isinstance(text, str):  # not a caller's text: the encoder's error stands
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"it holds a lone surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}, "
                "which is not valid Unicode; send UTF-8 text (surrogates only in pairs)")
    return None
