"""Chat queries are embedded in shared batches, but a query that fails, fails alone.

On the real embedder (torch and its ONNX export) and on the real gateway: concurrent
good and bad queries, and every good one gets its vector or its answer.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from knowledge import Embedder
from knowledge.query_encoder import MIN_COSINE, OnnxEncoder
from service.chat.query_embedding import QueryEmbedder, load_query_encoder
from service.errors import InvalidRequest
from service.settings import Settings
from tests.conftest import MODEL_NAME

GOOD = [f"When does ferry number {i} leave from pier {i % 5}?" for i in range(16)]
# Lone surrogates: Python strings that no UTF-8 tokenizer can take (the fast tokenizer raises TypeError).
BAD = ["lone \ud800 high surrogate", "\udfff", "reversed pair \udc00\ud83d", "tail\ud800"]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module", params=["torch", "onnx"])
def encoder(request, embedder, tmp_path_factory):
    if request.param == "torch":
        return embedder
    return OnnxEncoder(embedder, tmp_path_factory.mktemp("query-encoder"))


def embed_all(encoder, queries: list) -> list:
    """Every query submitted at once, so they share one batch (the worker starts after all are queued)."""

    async def run():
        embedder = QueryEmbedder(encoder)
        try:
            return await asyncio.gather(*(embedder.embed(q) for q in queries), return_exceptions=True)
        finally:
            await embedder.close()

    return asyncio.run(run())


def test_good_queries_in_a_batch_with_unreadable_ones_all_succeed(embedder, encoder):
    queries = [q for pair in zip(GOOD[::4], BAD) for q in pair] + GOOD  # bad ones spread through the batch
    results = embed_all(encoder, queries)
    for query, result in zip(queries, results):
        if query in BAD:
            assert isinstance(result, InvalidRequest), (query, result)
            assert result.param == "messages" and "lone surrogate" in result.message
        else:
            assert isinstance(result, np.ndarray), (query, result)
            assert float(result @ embedder.encode([query])[0]) >= MIN_COSINE


def test_a_query_the_encoder_fails_on_for_another_reason_fails_alone(embedder, encoder):
    # Not text at all: the encoder raises on it, and no diagnosis applies; the batch is
    # embedded one query at a time and only this one gets the encoder's error.
    queries = GOOD[:5] + [12345] + GOOD[5:10]
    results = embed_all(encoder, queries)
    assert not isinstance(results[5], (np.ndarray, InvalidRequest)) and isinstance(results[5], Exception)
    assert all(isinstance(r, np.ndarray) for i, r in enumerate(results) if i != 5), results


def test_the_setting_chooses_the_runtime(embedder, tmp_path):
    assert Settings(_env_file=None).query_encoder == "onnx"
    assert load_query_encoder(Settings(_env_file=None, home=tmp_path, query_encoder="torch"), embedder) is embedder
    onnx = load_query_encoder(Settings(_env_file=None, home=tmp_path), embedder)
    assert isinstance(onnx, OnnxEncoder) and onnx.path.parent == tmp_path / "cache" / "query-encoder"


def test_concurrent_chats_with_bad_queries_do_not_fail_good_ones(gateway):
    """16 good chats with retrieval beside 4 whose user text holds a lone surrogate: good ones 200, bad ones 400."""
    assert httpx.post(f"{gateway.url}/v1/collections", json={"name": "isolation"}).status_code in (201, 409)
    put = httpx.put(f"{gateway.url}/v1/collections/isolation/documents/ferry",
                    json={"text": "The night ferry leaves at 23:15 from pier 4."})
    assert put.status_code in (200, 201), put.text

    def body(text: str) -> dict:
        return {"model": MODEL_NAME, "messages": [{"role": "user", "content": text}], "max_tokens": 2,
                "rag": {"collection": "isolation", "mode": "dense"}}

    async def run():
        async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
            texts = [q for pair in zip(GOOD[::4], BAD) for q in pair] + GOOD[1::4] + GOOD[2::4] + GOOD[3::4]
            # json.dumps writes a lone surrogate as the escape "\ud800", as a hostile client would.
            responses = await asyncio.gather(*(
                client.post("/v1/chat/completions", content=json.dumps(body(t)),
                            headers={"content-type": "application/json"})
                for t in texts
            ))
            return texts, responses

    texts, responses = asyncio.run(run())
    for text, response in zip(texts, responses):
        if text in BAD:
            assert response.status_code == 400, (text, response.status_code, response.text)
            assert response.json()["error"]["message"]
        else:
            assert response.status_code == 200, (text, response.status_code, response.text)
            assert [c["doc_id"] for c in response.json()["citations"]] == ["ferry"]


def test_the_gateway_embeds_queries_with_the_onnx_export(gateway):
    """The default runtime: the export is cached under LORAG_HOME, and chat retrieval is served with it."""
    exports = list((gateway.home / "cache" / "query-encoder").glob("*.onnx"))
    assert len(exports) == 1, exports
    assert "chat queries are embedded with ONNX Runtime" in gateway.log_path.read_text(errors="replace")
