"""The knowledge API in a real `lorag serve` process: crash safety and the `lorag docs` CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from service.engine.launcher import free_port
from tests.documents import pdf_bytes
from tests.gateway import Gateway, knowledge_gateway


@pytest.fixture(params=["persistent", "server"])
def service(request, tmp_path):
    """A real `lorag serve`, its Chroma embedded or the session's `chroma run` server."""
    chroma_url = request.getfixturevalue("chroma_server") if request.param == "server" else None
    gw = knowledge_gateway(tmp_path / "home", chroma_url).start()
    gw.wait_up()
    yield gw
    if gw.proc.poll() is None:
        gw.stop(signal.SIGTERM)


def test_sigkill_mid_ingest_keeps_every_acknowledged_write_once(service, tmp_path):
    url = f"{service.url}/v1/collections/ledger"
    assert httpx.post(f"{service.url}/v1/collections", json={"name": "ledger"}).status_code == 201
    acked: dict[str, int] = {}
    refused: list[dict] = []
    stop = threading.Event()

    def writer() -> None:
        # Bulk requests of 8 documents; ids cycle, so later batches rewrite earlier documents and
        # versions are being cut over when the kill lands.
        with httpx.Client(timeout=60) as http:
            for batch in range(10_000):
                if stop.is_set():
                    return
                lines = []
                for k in range(8):
                    i = batch * 8 + k
                    doc = f"doc{i % 40}"
                    text = f"Ledger entry {doc} marker{i} " + "harbour dues paid in full. " * 40
                    lines.append(json.dumps({"id": doc, "text": text, "metadata": {"doc": doc}}))
                try:
                    response = http.post(f"{url}/documents/bulk", content="\n".join(lines))
                except httpx.HTTPError:
                    return
                if response.status_code == 200:
                    for line, result in zip(lines, response.json()["results"]):
                        if result["status"] not in ("created", "updated"):
                            refused.append(result)
                        item = json.loads(line)
                        acked[item["id"]] = int(item["text"].split("marker")[1].split()[0])

    thread = threading.Thread(target=writer)
    thread.start()
    while len(acked) < 40 and thread.is_alive():
        time.sleep(0.05)
    time.sleep(1.0)  # let rewrites run, then kill mid-write
    service.proc.send_signal(signal.SIGKILL)
    service.proc.wait(30)
    stop.set()
    thread.join(30)
    assert len(acked) == 40 and not refused, refused

    restarted = Gateway(service.model, service.home, env=service.env).start()
    try:
        restarted.wait_up()
        url = f"{restarted.url}/v1/collections/ledger"
        for doc, i in acked.items():
            got = httpx.get(f"{url}/documents/{doc}").json()
            # The acknowledged write or a later one that was in flight: never an older one.
            marker = int(got["text"].split("marker")[1].split()[0])
            assert marker >= i, (doc, marker, i)
            # Every chunk repeats "harbour dues": a search limited to this document returns all of them.
            body = {"query": "harbour dues", "mode": "hybrid", "top_k": 50, "filter": {"doc": doc}}
            mine = httpx.post(f"{url}/search", json=body).json()["data"]
            assert mine, f"{doc} is not searchable after the restart"
            assert {h["doc_id"] for h in mine} == {doc}
            assert {h["version"] for h in mine} == {got["version"]}
            assert len({h["chunk_id"] for h in mine}) == len(mine) == got["chunks"]
    finally:
        restarted.stop(signal.SIGTERM)


def test_docs_push_a_mixed_folder_and_its_summary(service, tmp_path):
    folder = tmp_path / "docs"
    (folder / "policies").mkdir(parents=True)
    (folder / "notes.txt").write_text("Storm warnings are flown from the east pier.")
    (folder / "policies" / "speed.md").write_text("# Speed\n\nThe limit is 6 knots inside the breakwater.")
    (folder / "page.html").write_text("<p>Customs opens at 7.</p>")
    (folder / "report.pdf").write_bytes(pdf_bytes("Dredging contract runs for 18 months."))
    (folder / "more.jsonl").write_text(
        json.dumps({"id": "j1", "text": "Ferries leave every 20 minutes."}) + "\n"
        + json.dumps({"id": "j2", "text": "Berth 4 is reserved for tankers."}) + "\n"
        + "{broken\n"
    )
    (folder / "garbage.txt").write_bytes(bytes(range(256)) * 4)
    (folder / "contract.docx").write_bytes(b"PK\x03\x04")

    def push() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", "docs", "--url", service.url, "push", str(folder), "--collection", "handbook"],
            capture_output=True, text=True, timeout=300,
        )

    first = push()
    assert first.returncode == 1, first.stderr  # failures make a non-zero exit
    assert "6 created, 0 updated, 0 unchanged, 3 failed" in first.stdout, first.stdout
    assert "garbage.txt: " in first.stdout and "binary" in first.stdout
    assert "contract.docx: unsupported file type .docx" in first.stdout
    assert "more.jsonl:3" in first.stdout
    assert "push → handbook" in first.stderr  # the progress bar

    (folder / "notes.txt").write_text("Storm warnings are now flown from the west pier.")
    second = push()
    assert "0 created, 1 updated, 5 unchanged, 3 failed" in second.stdout, second.stdout

    listing = httpx.get(f"{service.url}/v1/collections/handbook/documents").json()["data"]
    assert sorted(d["doc_id"] for d in listing) == ["j1", "j2", "notes.txt", "page.html", "policies/speed.md", "report.pdf"]

    found = subprocess.run(
        [sys.executable, "-m", "service.cli", "docs", "--url", service.url, "search", "west pier storm",
         "--collection", "handbook", "--top-k", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.startswith("1. notes.txt v2")


def test_docs_cli_says_when_the_service_is_unreachable(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "docs", "--url", f"http://127.0.0.1:{free_port()}", "push", str(tmp_path),
         "--collection", "handbook"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "cannot reach" in result.stderr


def test_docs_push_of_json_lines_ending_on_a_batch_boundary(gateway, tmp_path):
    # 100 lines (one bulk request's worth) and the final newline: nothing is left for a second request.
    lines = [json.dumps({"id": f"tide-{i}", "text": f"High water at berth {i} is at {i % 12} o'clock."})
             for i in range(100)]
    (tmp_path / "tides.jsonl").write_text("\n".join(lines) + "\n")
    pushed = subprocess.run(
        [sys.executable, "-m", "service.cli", "docs", "--url", gateway.url, "push", str(tmp_path / "tides.jsonl"),
         "--collection", "tides"],
        capture_output=True, text=True, timeout=300,
    )
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert "100 created, 0 updated, 0 unchanged, 0 failed" in pushed.stdout, pushed.stdout
    assert httpx.delete(f"{gateway.url}/v1/collections/tides").status_code == 200


def test_a_reindex_stopped_with_the_service_resumes_from_the_cli(tmp_path):
    gw = knowledge_gateway(tmp_path / "home").start()
    try:
        gw.wait_up()
        url = f"{gw.url}/v1/collections/ledger"
        assert httpx.post(f"{gw.url}/v1/collections", json={"name": "ledger"}).status_code == 201
        for start in range(0, 320, 80):  # 320 documents: 10 copy batches
            lines = [json.dumps({"id": f"entry-{i:03d}", "text": f"Ledger entry {i}: " + "dues paid at berth. " * 12})
                     for i in range(start, start + 80)]
            assert httpx.post(f"{url}/documents/bulk", content="\n".join(lines), timeout=300).status_code == 200
        started = httpx.post(f"{url}/reindex", json={"chunking": {"size": 32, "overlap": 4}})
        assert started.status_code == 202, started.text
        while (status := httpx.get(url).json()["reindex"])["copied"] < 64:
            assert status["state"] == "running", status
            time.sleep(0.05)
        code, _ = gw.stop(signal.SIGTERM)  # mid-reindex: the service stops at the next batch
        assert code in (0, -signal.SIGTERM), gw.log_tail()
        assert "the reindex of 'ledger' stopped with the service" in gw.log_tail()
    finally:
        if gw.proc.poll() is None:
            gw.stop(signal.SIGKILL)

    restarted = Gateway(gw.model, gw.home, env=gw.env).start()
    try:
        restarted.wait_up()
        url = f"{restarted.url}/v1/collections/ledger"
        got = httpx.get(url).json()
        assert got["chunking"]["size"] == 240 and got["reindex"]["state"] == "interrupted", got
        done_before = got["reindex"]["reused"]
        assert 64 <= done_before < 320
        hits = httpx.post(f"{url}/search", json={"query": "ledger entry 7 dues", "top_k": 3}).json()["data"]
        assert hits and all(h["start"] == 0 and h["end"] > 250 for h in hits)  # the old index: a chunk a document
        resumed = subprocess.run(
            [sys.executable, "-m", "service.cli", "docs", "--url", restarted.url, "reindex", "ledger",
             "--size", "32", "--overlap", "4"],
            capture_output=True, text=True, timeout=600,
        )
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"reindexed 320 documents ({320 - done_before} embedded again, {done_before} resumed)" in resumed.stdout
        assert "reindex ledger" in resumed.stderr  # the progress bar
        got = httpx.get(url).json()
        assert (got["chunking"]["size"], got["documents"], got["reindex"]["state"]) == (32, 320, "done")
        hits = httpx.post(f"{url}/search", json={"query": "ledger entry 7 dues", "top_k": 3}).json()["data"]
        assert hits and all(h["end"] - h["start"] < 200 for h in hits)  # the new index: 32-token chunks
    finally:
        restarted.stop(signal.SIGTERM)
