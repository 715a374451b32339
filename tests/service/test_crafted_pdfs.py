"""Crafted PDFs through a real `lorag serve`: each is a 422 within the reader's limits, and the gateway
serves the next request with its memory untouched (the reader runs in a child process)."""

from __future__ import annotations

import signal
import zlib
from pathlib import Path

import httpx
import pytest

from tests.documents import pdf_bytes
from tests.gateway import Gateway, knowledge_gateway

C = "/v1/collections/uploads"
FONT = "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
MEMORY_MB = 256


def _assemble(objects: list[bytes | str]) -> bytes:
    """Objects 1..n with a correct xref table; object 1 is the catalog."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + (body.encode() if isinstance(body, str) else body) + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def _stream(data: bytes, extra: str = "") -> bytes:
    return f"<< /Length {len(data)} {extra} >>\nstream\n".encode() + data + b"\nendstream"


def _page(contents: int, parent: int = 2) -> str:
    return (f"<< /Type /Page /Parent {parent} 0 R /MediaBox [0 0 612 792] /Contents {contents} 0 R "
            "/Resources << /Font << /F1 3 0 R >> >> >>")


def _pages(contents: list[int], first_page: int) -> str:
    kids = " ".join(f"{first_page + i} 0 R" for i in range(len(contents)))
    return f"<< /Type /Pages /Kids [{kids}] /Count {len(contents)} >>"


def deep_nesting() -> bytes:
    """A text array nested 100,000 deep: pypdf's parser recurses once per level."""
    content = b"BT /F1 12 Tf 72 720 Td " + b"[" * 100_000 + b"(x)" + b"]" * 100_000 + b" TJ ET"
    return _assemble(["<< /Type /Catalog /Pages 2 0 R >>", _pages([5], 4), FONT, _page(5), _stream(content)])


def broken_xref() -> bytes:
    """An xref table pointing past the end of a file that holds no objects at all."""
    return (b"%PDF-1.4\nxref\n0 3\n0000000000 65535 f \n0000009999 00000 n \n0000099999 00000 n \n"
            b"trailer\n<< /Size 3 /Root 1 0 R >>\nstartxref\n9\n%%EOF\n")


def flate_bomb(pages: int = 40) -> bytes:
    """20 kB that inflate to 2.8 GB: 40 pages whose contents, twice deflated, are 70 MB of spaces
    each (under pypdf's 75 MB per-stream limit, so only a limit on the whole reader stops it)."""
    blob = zlib.compress(zlib.compress(b" " * 70_000_000, 9), 9)
    objects: list[bytes | str] = ["<< /Type /Catalog /Pages 2 0 R >>", _pages([0] * pages, 4), FONT]
    for i in range(pages):
        objects.append(_page(4 + pages + i))
    objects += [_stream(blob, "/Filter [/FlateDecode /FlateDecode]")] * pages
    return _assemble(objects)


def page_tree_loop() -> bytes:
    """Two page-tree nodes, each the other's kid."""
    return _assemble([
        "<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [4 0 R] /Count 1 >>", FONT,
        "<< /Type /Pages /Kids [2 0 R] /Parent 2 0 R /Count 1 >>",
    ])


def endless() -> bytes:
    """1,000 pages sharing one content stream of 200,000 operators: minutes of parsing in 300 kB."""
    blob = zlib.compress(b"BT /F1 12 Tf " + b"0 0 Td " * 200_000 + b"ET", 9)
    objects: list[bytes | str] = ["<< /Type /Catalog /Pages 2 0 R >>", _pages([0] * 1000, 5), FONT,
                                  _stream(blob, "/Filter /FlateDecode")]
    objects += [_page(4)] * 1000
    return _assemble(objects)


CRAFTED = {
    "deep-nesting": (deep_nesting, "nested too deeply"),
    "broken-xref": (broken_xref, "not a readable PDF"),
    "flate-bomb": (flate_bomb, f"{MEMORY_MB} MiB"),
    "page-tree-loop": (page_tree_loop, "not a readable PDF"),
    "endless": (endless, "longer than"),
}


def _peak_rss(pid: int) -> int:
    """The process's high-water resident set, in bytes (children not included)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def _upload(gw: Gateway, name: str, data: bytes) -> httpx.Response:
    # The client's timeout is only a guard against a gateway that never answers (the old behaviour).
    return httpx.post(f"{gw.url}{C}/files", files={"file": (name, data)}, timeout=300)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    home = tmp_path_factory.mktemp("pdf-home")
    gateway = knowledge_gateway(home, env={
        "LORAG_PDF_TIMEOUT_S": "10", "LORAG_PDF_MEMORY_MB": str(MEMORY_MB), "LORAG_PDF_MAX_PAGES": "1200",
        "LORAG_MAX_DOCUMENT_CHARS": "50000",
    }).start()
    gateway.wait_up()
    assert httpx.post(f"{gateway.url}/v1/collections", json={"name": "uploads"}).status_code == 201
    # One normal upload first, so the one-time allocations (embedder, stores) are behind us.
    assert _upload(gateway, "warm.pdf", pdf_bytes("Warm-up page.")).status_code == 201
    yield gateway
    gateway.stop(signal.SIGTERM)


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_pdf_is_422_and_the_gateway_carries_on(gw, case):
    build, reason = CRAFTED[case]
    before = _peak_rss(gw.proc.pid)
    response = _upload(gw, f"{case}.pdf", build())
    assert response.status_code == 422, response.text
    # The parsing happened elsewhere: the gateway's own peak memory did not move by the file's cost.
    assert _peak_rss(gw.proc.pid) - before < 128 << 20
    error = response.json()["error"]
    assert error["code"] == "unreadable_file" and f"{case}.pdf" in error["message"], error
    assert reason in error["message"], error
    assert gw.proc.poll() is None and httpx.get(f"{gw.url}/healthz").status_code == 200
    good = _upload(gw, f"after-{case}.pdf", pdf_bytes(f"Berth {case} reopens at dawn."))
    assert good.status_code == 201, good.text
    text = httpx.get(f"{gw.url}{C}/documents/after-{case}.pdf").json()["text"]
    assert f"Berth {case} reopens at dawn." in text


def test_pdf_page_and_text_limits_are_400s_that_name_the_setting(gw):
    pages = _assemble(["<< /Type /Catalog /Pages 2 0 R >>", _pages([0] * 1201, 5), FONT,
                       _stream(b"BT /F1 12 Tf 72 720 Td (one page of many) Tj ET"), *[_page(4)] * 1201])
    response = _upload(gw, "thick.pdf", pages)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "thick.pdf" in error["message"] and "LORAG_PDF_MAX_PAGES" in error["message"], error
    long = pdf_bytes("harbour " * 7000)  # 56,000 characters on one page, over LORAG_MAX_DOCUMENT_CHARS
    response = _upload(gw, "long.pdf", long)
    assert response.status_code == 400 and "LORAG_MAX_DOCUMENT_CHARS" in response.json()["error"]["message"]
