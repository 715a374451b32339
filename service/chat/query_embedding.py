"""Query embeddings for chat retrieval, batched across concurrent requests.

Embedding one short query costs about as much as embedding thirty-two together
(the model's fixed per-call cost dominates), and under load every request
brings one. So requests queue their query, and one worker embeds everything
queued while the previous batch ran, in a single call.
"""

from __future__ import annotations

import asyncio

import numpy as np
from anyio import to_thread

from knowledge import Embedder

MAX_BATCH = 64


class QueryEmbedder:
    def __init__(self, embedder: Embedder):
        self._embedder = embedder
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
            if not batch:
                continue
            try:
                vectors = await to_thread.run_sync(self._embedder.encode, [q for q, _ in batch])
            except Exception as exc:  # every waiter gets the failure, none hangs
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), vector in zip(batch, vectors):
                if not future.done():
                    future.set_result(vector)
