"""The knowledge HTTP API, in-process, over real Chroma, SQLite and the real embedder."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from fastapi.testclient import TestClient

from knowledge import KnowledgeSettings
from service import Settings, create_app
from service.engine.launcher import free_port
from tests.documents import pdf_bytes
from tests.envelope import envelope_error as _error

C = "/v1/collections/harbour"


@pytest.fixture(scope="module", params=["persistent", "server"])
def client(request, tmp_path_factory):
    """The gateway in-process, its Chroma embedded or the session's `chroma run` server."""
    home = tmp_path_factory.mktemp("kb-home")
    chroma_url = request.getfixturevalue("chroma_server") if request.param == "server" else None
    # No engine is needed for the knowledge API: point at a closed port (external mode starts nothing).
    settings = Settings(
        home=home, engine_urls=f"http://127.0.0.1:{free_port()}", max_body_bytes=200_000,
        max_upload_bytes=300_000, max_bulk_documents=20,
    )
    knowledge = KnowledgeSettings(
        home=home, chroma_url=chroma_url, max_document_chars=50_000, chunk_tokens=64, chunk_overlap=8
    )
    with TestClient(create_app(settings, knowledge)) as c:
        assert c.post("/v1/collections", json={"name": "harbour"}).status_code == 201
        yield c


def _search(client, query: str, **kw) -> list[dict]:
    response = client.post(f"{C}/search", json={"query": query, **kw})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_collections_lifecycle(client):
    assert client.post("/v1/collections", json={"name": "scratch", "metadata": {"team": "ops"}}).status_code == 201
    _error(client.post("/v1/collections", json={"name": "scratch"}), 409)
    names = [c["name"] for c in client.get("/v1/collections").json()["data"]]
    assert {"harbour", "scratch"} <= set(names)
    got = client.get("/v1/collections/scratch").json()
    assert got["metadata"] == {"team": "ops"} and got["documents"] == 0
    assert client.delete("/v1/collections/scratch").json()["deleted"] is True
    _error(client.get("/v1/collections/scratch"), 404)
    _error(client.put("/v1/collections/scratch/documents/a", json={"text": "x"}), 404)


@pytest.mark.parametrize("name", ["ab", "Upper", "-lead", "has space", "x" * 64, "dot.name"])
def test_bad_collection_names_are_refused(client, name):
    error = _error(client.post("/v1/collections", json={"name": name}), 400)
    assert "name" in error["message"]


def test_document_versions_cut_over_and_old_text_is_gone(client):
    first = client.put(f"{C}/documents/tariffs", json={"text": "The mooring tariff is 40 crowns per metre."})
    assert first.status_code == 201 and first.json()["status"] == "created" and first.json()["version"] == 1
    same = client.put(f"{C}/documents/tariffs", json={"text": "The mooring tariff is 40 crowns per metre."})
    assert same.status_code == 200 and same.json()["status"] == "unchanged" and same.json()["version"] == 1
    changed = client.put(f"{C}/documents/tariffs", json={"text": "The mooring tariff is 55 crowns per metre."})
    assert changed.json()["status"] == "updated" and changed.json()["version"] == 2

    doc = client.get(f"{C}/documents/tariffs").json()
    assert doc["version"] == 2 and "55 crowns" in doc["text"]
    for mode in ("dense", "keyword", "hybrid"):
        hits = [h for h in _search(client, "mooring tariff crowns", mode=mode, top_k=10) if h["doc_id"] == "tariffs"]
        assert hits and all(h["version"] == 2 and "40 crowns" not in h["text"] for h in hits), mode

    assert client.delete(f"{C}/documents/tariffs").json()["deleted"] is True
    _error(client.get(f"{C}/documents/tariffs"), 404)
    assert not [h for h in _search(client, "mooring tariff", top_k=10) if h["doc_id"] == "tariffs"]


def test_document_ids_may_be_paths(client):
    assert client.put(f"{C}/documents/policies/ferry.md", json={"text": "Night ferries run hourly."}).status_code == 201
    assert client.get(f"{C}/documents/policies/ferry.md").json()["doc_id"] == "policies/ferry.md"


def test_list_documents_pages_through_everything_once(client):
    client.post("/v1/collections", json={"name": "paged"})
    for i in range(5):
        client.put(f"/v1/collections/paged/documents/d{i}", json={"text": f"notice number {i}"})
    seen, after = [], None
    while True:
        page = client.get("/v1/collections/paged/documents", params={"limit": 2, **({"after": after} if after else {})})
        assert page.status_code == 200
        seen += [d["doc_id"] for d in page.json()["data"]]
        after = page.json()["next"]
        if after is None:
            break
    assert seen == [f"d{i}" for i in range(5)]


def test_bulk_json_lines_reports_each_line(client):
    lines = [
        json.dumps({"id": "b1", "text": "Berth 4 is reserved for tankers.", "metadata": {"kind": "berth"}}),
        "{not json",
        json.dumps({"id": "b2", "text": "Pilots board at the outer buoy."}),
        json.dumps({"id": "b3"}),
        "",
        json.dumps({"id": "b4", "text": "   "}),
    ]
    response = client.post(f"{C}/documents/bulk", content="\n".join(lines), headers={"content-type": "application/x-ndjson"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["summary"] == {"created": 2, "updated": 0, "unchanged": 0, "failed": 3}
    by_line = {r["line"]: r for r in body["results"]}
    assert by_line[1]["status"] == "created" and by_line[3]["status"] == "created"
    assert all(by_line[n]["status"] == "failed" and by_line[n]["error"] for n in (2, 4, 6))
    assert client.get(f"{C}/documents/b1").json()["metadata"] == {"kind": "berth"}


def test_bulk_lines_split_on_newlines_only_and_must_be_utf8(client):
    # U+2028 is legal inside a JSON string; a line splitter that treats it as a newline breaks the line.
    line = json.dumps({"id": "sep", "text": "Berth 9\u2028is closed."}, ensure_ascii=False)
    body = client.post(f"{C}/documents/bulk", content=line.encode()).json()
    assert body["summary"]["created"] == 1, body
    assert client.get(f"{C}/documents/sep").json()["text"] == "Berth 9\u2028is closed."
    latin1 = json.dumps({"id": "l1", "text": "Gebühr"}, ensure_ascii=False).encode("latin-1")
    assert _error(client.post(f"{C}/documents/bulk", content=latin1), 400)["code"] == "invalid_encoding"
    _error(client.get(f"{C}/documents/l1"), 404)


def test_a_document_id_cannot_unlock_the_upload_limit(client):
    # The upload limit (300 kB here) applies to the upload routes only, not to ids ending in /files.
    response = client.put(f"{C}/documents/x/files", json={"text": "x" * 250_000})
    assert _error(response, 413)["code"] == "body_too_large"
    # Nor a document called "bulk": only POST .../documents/bulk is the bulk upload.
    response = client.put(f"{C}/documents/bulk", json={"text": "x" * 250_000})
    assert _error(response, 413)["code"] == "body_too_large"


def test_bulk_limits(client):
    _error(client.post(f"{C}/documents/bulk", content=b"\n\n"), 400)
    many = "\n".join(json.dumps({"id": f"m{i}", "text": "x"}) for i in range(21))
    _error(client.post(f"{C}/documents/bulk", content=many), 400)


def test_file_uploads_of_every_supported_type(client):
    files = {
        "notes.txt": b"Storm warnings are flown from the east pier.",
        "guide.md": b"# Guide\n\nThe speed limit is **6 knots** inside the breakwater.",
        "page.html": b"<html><head><style>p{}</style><script>var secret=1;</script></head>"
                     b"<body><p>Customs opens at 7.</p></body></html>",
        "report.pdf": pdf_bytes("Dredging contract runs for 18 months.", "Second page of the report."),
    }
    for name, data in files.items():
        response = client.post(f"{C}/files", files={"file": (name, data)}, data={"metadata": '{"source": "upload"}'})
        assert response.status_code == 201, (name, response.text)
    assert "Customs opens at 7." in client.get(f"{C}/documents/page.html").json()["text"]
    assert "secret" not in client.get(f"{C}/documents/page.html").json()["text"]
    report = client.get(f"{C}/documents/report.pdf").json()
    assert "18 months" in report["text"] and "Second page" in report["text"]
    assert report["metadata"] == {"source": "upload"}
    hits = _search(client, "dredging contract months", mode="keyword")
    assert hits[0]["doc_id"] == "report.pdf"


BAD_UPLOADS = [
    ("binary garbage named .txt", "garbage.txt", bytes(range(256)) * 8, 422),
    ("a broken PDF", "broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\ngarbage", 422),
    ("an empty file", "empty.txt", b"", 422),
    ("an unsupported type", "contract.docx", b"PK\x03\x04 not really", 415),
    ("latin-1 text", "legacy.txt", "Kronen für Anlegeplätze".encode("latin-1"), 422),
]


@pytest.mark.parametrize(("case", "name", "data", "status"), BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads_get_a_4xx_and_touch_nothing(client, case, name, data, status):
    client.put(f"{C}/documents/keep", json={"text": "The harbour master is Ines Duarte."})
    before = client.get(f"{C}/documents/keep").json()
    error = _error(client.post(f"{C}/files", files={"file": (name, data)}, data={"doc_id": "keep"}), status)
    assert name in error["message"]
    assert client.get(f"{C}/documents/keep").json() == before


def test_oversized_inputs(client):
    _error(client.put(f"{C}/documents/big", json={"text": "harbour " * 7000}), 400)  # over max_document_chars
    _error(client.put(f"{C}/documents/big", json={"text": "x" * 250_000}), 413)  # over max_body_bytes
    _error(client.post(f"{C}/files", files={"file": ("big.txt", b"a" * 310_000)}), 413)  # over max_upload_bytes
    _error(client.get(f"{C}/documents/big"), 404)


def test_an_oversized_chunked_body_is_a_413(client):
    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"text": "'
        for _ in range(30):
            yield b"x" * 10_000
        yield b'"}'

    response = client.put(f"{C}/documents/chunked", content=chunks(), headers={"content-type": "application/json"})
    assert _error(response, 413)["code"] == "body_too_large"


@pytest.mark.parametrize(
    ("body", "param_hint"),
    [
        ({"query": "ferry", "filter": {"kind": {"$regex": "x"}}}, "$regex"),
        ({"query": "ferry", "filter": {"$and": []}}, "$and"),
        ({"query": "ferry", "filter": {"_doc_id": "x"}}, "_doc_id"),
        ({"query": "ferry", "mode": "fuzzy"}, "mode"),
        ({"query": ""}, "query"),
        ({"query": "ferry", "top_k": 0}, "top_k"),
    ],
)
def test_bad_searches_are_400(client, body, param_hint):
    error = _error(client.post(f"{C}/search", json=body), 400)
    assert param_hint in error["message"] or error["param"] == param_hint


def test_filters_keep_documents_out(client):
    client.put(f"{C}/documents/en", json={"text": "The ferry fare is 3 crowns.", "metadata": {"lang": "en"}})
    client.put(f"{C}/documents/fr", json={"text": "The ferry fare is 3 crowns.", "metadata": {"lang": "fr"}})
    for mode in ("dense", "keyword", "hybrid"):
        docs = {h["doc_id"] for h in _search(client, "ferry fare", mode=mode, top_k=20, filter={"lang": "en"})}
        assert "en" in docs and "fr" not in docs, mode


def test_unknown_collection_search_is_404(client):
    _error(client.post("/v1/collections/nowhere/search", json={"query": "x"}), 404)


def _reindexed(client, name: str, body: dict | None = None) -> dict:
    """POST the reindex, then poll the collection until it ends; its final `reindex`."""
    started = client.post(f"/v1/collections/{name}/reindex", json=body)
    assert started.status_code == 202, started.text
    assert started.json()["reindex"]["state"] in ("running", "done")
    for _ in range(600):
        status = client.get(f"/v1/collections/{name}").json()["reindex"]
        if status["state"] != "running":
            return status
        time.sleep(0.1)
    raise AssertionError(f"the reindex of {name} did not end: {status}")


def test_collections_record_their_chunking_and_reindex_changes_it(client):
    created = client.post("/v1/collections", json={"name": "tides", "chunking": {"size": 16, "overlap": 0}})
    assert created.status_code == 201, created.text
    chunking = created.json()["chunking"]
    assert (chunking["size"], chunking["overlap"], chunking["strategy"], chunking["title_key"]) == (16, 0, "tokens", "title")
    assert chunking["embedder"] == client.app.state.knowledge._kb.embedder.identity
    text = " ".join(f"High water at berth {i} comes at {i % 12} o'clock." for i in range(12))
    assert client.put("/v1/collections/tides/documents/table", json={"text": text}).json()["chunks"] > 4

    status = _reindexed(client, "tides", {"chunking": {"size": 64, "title_key": ""}})
    assert status["state"] == "done" and (status["documents"], status["copied"]) == (1, 1), status
    got = client.get("/v1/collections/tides").json()
    assert (got["chunking"]["size"], got["chunking"]["overlap"], got["chunking"]["title_key"]) == (64, 0, None)
    doc = client.get("/v1/collections/tides/documents/table").json()
    assert doc["version"] == 1 and doc["chunks"] == 3
    hits = client.post("/v1/collections/tides/search", json={"query": "berth 7 high water", "top_k": 10}).json()["data"]
    assert {h["index"] for h in hits} == {0, 1, 2}
    assert _reindexed(client, "tides")["state"] == "done"  # no body: rebuilt as is
    assert client.get("/v1/collections/tides").json()["chunking"]["size"] == 64
    assert client.delete("/v1/collections/tides").status_code == 200


@pytest.mark.parametrize(
    ("body", "hint"),
    [
        ({"chunking": {"size": 3}}, "from 8 to 254"),
        ({"chunking": {"overlap": 64}}, "from 0 to size - 1"),
        ({"chunking": {"strategy": "pages"}}, "strategy"),
        ({"chunking": {"tokens": 64}}, "tokens"),
        ({"size": 64}, "size"),
    ],
)
def test_bad_chunking_is_a_400_and_changes_nothing(client, body, hint):
    error = _error(client.post(f"{C}/reindex", json=body), 400)
    assert hint in error["message"] or hint in (error["param"] or ""), error
    error = _error(client.post("/v1/collections", json={"name": "badchunks", **body}), 400)
    assert hint in error["message"] or hint in (error["param"] or ""), error
    _error(client.get("/v1/collections/badchunks"), 404)
    reindex = client.get(C).json()["reindex"]
    assert reindex is None or reindex["state"] == "done"  # nothing was started (another test may have run one)


def test_reindex_conflicts_and_unknown_collections(client):
    _error(client.post("/v1/collections/nowhere/reindex"), 404)
    kb = client.app.state.knowledge._kb
    job = kb.reindex("harbour")  # claimed, as by a reindex under way
    error = _error(client.post(f"{C}/reindex"), 409)
    assert error["code"] == "reindex_running" and "already being reindexed" in error["message"]
    assert client.get(C).json()["reindex"]["state"] == "running"
    assert job.run().state == "done"
    assert client.get(C).json()["reindex"]["state"] == "done"


def test_a_collection_of_another_embedder_answers_409_until_reindexed(client):
    assert client.post("/v1/collections", json={"name": "moved"}).status_code == 201
    client.put("/v1/collections/moved/documents/pilot", json={"text": "Pilots board at the outer buoy."})
    database = client.app.state.knowledge._kb.settings.database_path
    with sqlite3.connect(database) as conn:
        conn.execute("UPDATE collections SET chunking = json_set(chunking, '$.embedder', 'old-model:768d:0')"
                     " WHERE name = 'moved'")
    error = _error(client.post("/v1/collections/moved/search", json={"query": "pilots"}), 409)
    assert error["code"] == "reindex_required" and "lorag docs reindex moved" in error["message"]
    _error(client.put("/v1/collections/moved/documents/tug", json={"text": "Tugs wait at berth 2."}), 409)
    keyword = client.post("/v1/collections/moved/search", json={"query": "pilots", "mode": "keyword"})
    assert keyword.status_code == 200 and keyword.json()["data"][0]["doc_id"] == "pilot"
    assert _reindexed(client, "moved")["state"] == "done"
    assert client.post("/v1/collections/moved/search", json={"query": "pilots"}).json()["data"][0]["doc_id"] == "pilot"
    assert client.delete("/v1/collections/moved").status_code == 200
