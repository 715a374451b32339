"""What a hostile client sends gets a 4xx naming what to fix, and loses nothing already stored.

Bodies are written by hand where the JSON itself is the attack (lone surrogates, NaN, deep
nesting), since a JSON encoder would refuse to produce them.
"""

from __future__ import annotations

import json
import signal
import socket
import time

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient

from knowledge import KnowledgeBase, KnowledgeSettings
from knowledge.search import MAX_QUERY_CHARS
from service import Settings, create_app
from service.chat.retrieval import Retrieval, load_builder
from service.chat.schemas import ChatCompletionRequest
from service.engine.launcher import free_port
from tests.chroma import ChromaServer
from tests.conftest import MODEL_NAME
from tests.gateway import knowledge_gateway
from tests.envelope import envelope_error as _error

C = "/v1/collections/harbour"
JSON = {"content-type": "application/json"}
SURROGATE = '"\\ud800"'  # as a JSON escape: valid JSON syntax, not a character


def deep(levels: int) -> str:
    return "[" * levels + "1" + "]" * levels


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    home = tmp_path_factory.mktemp("hostile-home")
    settings = Settings(home=home, engine_urls=f"http://127.0.0.1:{free_port()}", max_body_bytes=200_000)
    with TestClient(create_app(settings, KnowledgeSettings(home=home))) as c:
        assert c.post("/v1/collections", json={"name": "harbour"}).status_code == 201
        assert c.put(f"{C}/documents/keep", json={"text": "The harbour master keeps the tide tables."}).status_code == 201
        yield c


def _unchanged(client) -> None:
    """The document stored before the attack is still there, whole, and found."""
    assert client.get(f"{C}/documents/keep").json()["version"] == 1
    hits = client.post(f"{C}/search", json={"query": "tide tables", "mode": "keyword"}).json()["data"]
    assert [h["doc_id"] for h in hits] == ["keep"]


@pytest.mark.parametrize("keys", [1_001, 3_000, 12_000])
def test_a_wide_filter_is_a_400_naming_the_limit(client, keys):
    # 12,000 keys once crashed the gateway process (segfault); 1,001 to 3,000 were a 500.
    where = {f"k{i}": 1 for i in range(keys)}
    error = _error(client.post(f"{C}/search", json={"query": "tide", "filter": where}), 400)
    assert "more than 32" in error["message"] and error["code"] == "invalid_filter"
    many = {"$or": [{f"a{i}": 1, f"b{i}": 2} for i in range(32)] + [{"c": 1}]}
    assert "list of 1 to 32" in _error(client.post(f"{C}/search", json={"query": "t", "filter": many}), 400)["message"]
    _unchanged(client)


@pytest.mark.parametrize(
    ("request_args", "param"),
    [
        (("put", f"{C}/documents/s1", '{"text": "ok", "metadata": {"k": %s}}' % SURROGATE), "metadata.k"),
        (("put", f"{C}/documents/s1", '{"text": %s}' % SURROGATE), "text"),
        (("put", f"{C}/documents/s1", '{"text": "ok", "metadata": {%s: 1}}' % SURROGATE), "metadata.\ufffd"),
        (("post", "/v1/collections", '{"name": "sur", "metadata": {"k": %s}}' % SURROGATE), "metadata.k"),
        (("post", f"{C}/search", '{"query": "tide", "filter": {"k": %s}}' % SURROGATE), "filter.k"),
        (("post", f"{C}/search", '{"query": "tide", "filter": {"k": {"$in": ["a", %s]}}}' % SURROGATE),
         "filter.k.$in.1"),
        (("post", f"{C}/search", '{"query": "a\\udc00b"}'), "query"),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field(client, request_args, param):
    method, url, body = request_args
    error = _error(client.request(method, url, content=body, headers=JSON), 400)
    assert error["code"] == "invalid_unicode" and error["param"] == param and "surrogate" in error["message"]
    _error(client.get("/v1/collections/sur"), 404)
    _error(client.get(f"{C}/documents/s1"), 404)
    _unchanged(client)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_standard_numbers_are_a_400(client, number):
    body = '{"text": "ok", "metadata": {"k": %s}}' % number
    error = _error(client.put(f"{C}/documents/n1", content=body, headers=JSON), 400)
    assert error["code"] == "non_finite_number"
    _error(client.get(f"{C}/documents/n1"), 404)


def test_deep_nesting_is_a_400(client):
    body = '{"text": "ok", "metadata": %s}' % deep(50_000)
    assert _error(client.put(f"{C}/documents/d1", content=body, headers=JSON), 400)["code"] == "too_deep"
    assert _error(client.put(f"{C}/documents/d1", content=f'{{"text": {deep(65)}}}', headers=JSON), 400)[
        "code"] == "too_deep"
    _unchanged(client)


def test_bad_bulk_lines_fail_alone_and_every_result_is_true(client):
    lines = [
        json.dumps({"id": "bulk-good", "text": "Pilots board at the outer buoy at dawn."}),
        '{"id": %s, "text": "a forged id"}' % SURROGATE,
        '{"id": "bulk-meta", "text": "x", "metadata": {"k": %s}}' % SURROGATE,
        '{"id": "bulk-nan", "text": "x", "metadata": {"k": NaN}}',
        '{"id": "bulk-deep", "text": "x", "metadata": %s}' % deep(1_000),
        json.dumps({"id": "bulk-good-2", "text": "The breakwater light flashes twice."}),
    ]
    # Once a 500 (the second line's error result could not be encoded) after the first was written.
    response = client.post(f"{C}/documents/bulk", content="\n".join(lines), headers={"content-type": "application/x-ndjson"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["summary"] == {"created": 2, "updated": 0, "unchanged": 0, "failed": 4}
    by_line = {r["line"]: r for r in body["results"]}
    assert "surrogate" in by_line[2]["error"] and "surrogate" in by_line[3]["error"]
    assert "NaN" in by_line[4]["error"] and "levels deep" in by_line[5]["error"]
    for doc_id in ("bulk-good", "bulk-good-2"):  # what was reported written is there and searchable
        assert client.get(f"{C}/documents/{doc_id}").status_code == 200
    hits = client.post(f"{C}/search", json={"query": "outer buoy pilots", "mode": "keyword"}).json()["data"]
    assert hits[0]["doc_id"] == "bulk-good"
    for doc_id in ("bulk-meta", "bulk-nan", "bulk-deep"):
        _error(client.get(f"{C}/documents/{doc_id}"), 404)


@pytest.mark.parametrize(
    ("metadata", "code"),
    [('{"k": %s}' % SURROGATE, "invalid_unicode"), (deep(1_000), "too_deep"), ('{"k": NaN}', "non_finite_number")],
)
def test_bad_multipart_metadata_is_a_400(client, metadata, code):
    files = {"file": ("m.txt", b"Mooring lines are doubled in a gale.")}
    error = _error(client.post(f"{C}/files", files=files, data={"metadata": metadata, "doc_id": "m1"}), 400)
    assert error["param"] == "metadata" and error["code"] == code
    _error(client.get(f"{C}/documents/m1"), 404)


def test_two_file_parts_are_refused(client):
    files = [("file", ("a.txt", b"first file")), ("file", ("b.txt", b"second file"))]
    error = _error(client.post(f"{C}/files", files=files, data={"doc_id": "two"}), 400)
    assert error["param"] == "file" and error["code"] == "duplicate_field"
    _error(client.get(f"{C}/documents/two"), 404)


def test_a_text_file_with_nul_bytes_is_a_422_as_documented(client):
    data = b"Harbour dues are paid monthly. " * 20 + b"\x00" + b" More text."
    error = _error(client.post(f"{C}/files", files={"file": ("nul.txt", data)}, data={"doc_id": "nul"}), 422)
    assert "NUL" in error["message"]
    _error(client.get(f"{C}/documents/nul"), 404)


def test_a_bulk_upload_cut_short_writes_nothing(tmp_path):
    gw = knowledge_gateway(tmp_path / "home").start()
    try:
        gw.wait_up()
        assert httpx.post(f"{gw.url}/v1/collections", json={"name": "cut"}).status_code == 201
        first = json.dumps({"id": "half", "text": "Only the first line of the body arrived."}) + "\n"
        with socket.create_connection(("127.0.0.1", gw.port)) as raw:
            raw.sendall(
                b"POST /v1/collections/cut/documents/bulk HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
                + f"{len(first):x}\r\n{first}\r\n".encode()
            )
            time.sleep(0.5)  # the first chunk is read; then the client goes away without the last
        # A complete write sent after the cut one, so that the cut one had its chance to land.
        line = json.dumps({"id": "whole", "text": "A complete body."})
        assert httpx.post(f"{gw.url}/v1/collections/cut/documents/bulk", content=line).status_code == 200
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert httpx.get(f"{gw.url}/v1/collections/cut/documents/half").status_code == 404
            time.sleep(0.3)
        assert httpx.get(f"{gw.url}/v1/collections/cut").json()["documents"] == 1
    finally:
        gw.stop(signal.SIGTERM)


def test_a_chroma_server_that_is_down_is_a_503_and_loses_nothing(tmp_path):
    chroma = ChromaServer(tmp_path / "chroma").start()
    settings = Settings(home=tmp_path / "home", engine_urls=f"http://127.0.0.1:{free_port()}")
    try:
        with TestClient(create_app(settings, KnowledgeSettings(home=tmp_path / "home", chroma_url=chroma.url))) as c:
            assert c.post("/v1/collections", json={"name": "ferry"}).status_code == 201
            assert c.put("/v1/collections/ferry/documents/a", json={"text": "The night ferry leaves at 22:40."}).status_code == 201
            chroma.stop()
            for response in (
                c.post("/v1/collections/ferry/search", json={"query": "night ferry", "mode": "dense"}),
                c.put("/v1/collections/ferry/documents/b", json={"text": "The day ferry leaves at 08:10."}),
                c.post("/v1/collections", json={"name": "other"}),
            ):
                error = _error(response, 503)
                assert error["code"] == "store_unavailable" and response.headers["retry-after"]
            chroma.start()  # the same data folder and port
            hits = c.post("/v1/collections/ferry/search", json={"query": "night ferry", "mode": "dense"}).json()["data"]
            assert [h["doc_id"] for h in hits] == ["a"]
            _error(c.get("/v1/collections/ferry/documents/b"), 404)
            _error(c.get("/v1/collections/other"), 404)
    finally:
        chroma.stop()


def test_a_user_turn_longer_than_a_search_query_is_cut_for_the_query(tiny_model, tmp_path):
    # A context long enough for the turn: only the search query has a length limit here.
    settings = Settings(home=tmp_path, model=tiny_model, engine_max_model_len=100_000)
    question = "filler words " * 1_500 + "When does the night ferry leave?"
    assert len(question) > MAX_QUERY_CHARS
    request = ChatCompletionRequest(
        model=MODEL_NAME, messages=[{"role": "user", "content": question}], rag={"collection": "ferries", "top_k": 1}
    )

    async def ground():
        retrieval = Retrieval(kb, load_builder(settings), settings)
        try:
            return await retrieval.ground(request, 16, tenant="default")
        finally:
            await retrieval.close()

    with KnowledgeBase(KnowledgeSettings(home=tmp_path)) as kb:
        kb.create_collection("ferries")
        kb.put_document("ferries", "timetable", "The night ferry leaves at 22:40 from pier 3.")
        kb.put_document("ferries", "fares", "A return fare costs twelve euros.")
        for mode in ("keyword", "dense", "hybrid"):
            request.rag.mode = mode
            grounding = anyio.run(ground)  # before: a 400, "query has ... characters"
            assert grounding.summary["query_cut"] is True and grounding.summary["query_chars"] <= MAX_QUERY_CHARS
            assert [c["doc_id"] for c in grounding.citations] == ["timetable"], mode
            assert question in grounding.messages[-1]["content"]  # the model still gets the whole turn


# Chat, on the session's real gateway and vLLM.


def _chat(gateway, body: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", content=body, headers=JSON, timeout=60)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ('{"model": "%s", "messages": [{"role": "user", "content": %s}]}' % (MODEL_NAME, SURROGATE),
         "messages.0.content", "invalid_unicode"),
        ('{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}'
         % (MODEL_NAME, SURROGATE), "messages.0.content.0.text", "invalid_unicode"),
        ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}' % MODEL_NAME,
         None, "non_finite_number"),
        ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}' % MODEL_NAME,
         None, "non_finite_number"),
        ('{"model": "%s", "messages": %s}' % (MODEL_NAME, deep(5_000)), None, "too_deep"),
    ],
)
def test_hostile_chat_bodies_are_a_400(gateway, body, param, code):
    response = _chat(gateway, body)
    error = _error(response, 400)
    assert error["code"] == code and error["param"] == param
    # The gateway is still serving.
    ok = _chat(gateway, json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
    assert ok.status_code == 200, ok.text
