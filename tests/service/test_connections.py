"""Client connections against a real `lorag serve`, over raw sockets: silent and slow connections are
cut, and connections past the cap are answered 503."""

from __future__ import annotations

import json
import signal
import socket
import time

import httpx
import pytest

from tests.gateway import Gateway, knowledge_gateway

MAX_CONNECTIONS = 4
# Socket timeouts only guard against a server that never closes (the old behaviour); they are far
# longer than the gateway's own timeouts and no test asserts how long anything took.
GUARD_S = 60


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    home = tmp_path_factory.mktemp("conn-home")
    gateway = knowledge_gateway(home, env={
        "LORAG_HEADER_TIMEOUT_S": "3", "LORAG_KEEPALIVE_TIMEOUT_S": "1",
        "LORAG_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    }).start()
    gateway.wait_up()
    yield gateway
    gateway.stop(signal.SIGTERM)


def _connect(gw: Gateway) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=GUARD_S)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    """Reads until the server closes the connection; False if the guard timeout passes first."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_connections_that_never_send_a_byte_are_closed(gw):
    silent = [_connect(gw), _connect(gw)]
    assert all(_closed_by_server(sock) for sock in silent)
    assert httpx.get(f"{gw.url}/healthz").status_code == 200


def test_slow_headers_are_cut(gw):
    sock = _connect(gw)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    cut = False
    for _ in range(GUARD_S * 4):  # a header byte every 0.25 s, never the blank line that ends them
        try:
            sock.sendall(b"X")
        except (BrokenPipeError, ConnectionResetError):
            cut = True
            break
        time.sleep(0.25)
    assert cut or _closed_by_server(sock)


def test_an_idle_keep_alive_connection_is_closed_and_requests_in_a_row_are_served(gw):
    sock = _connect(gw)
    for _ in range(3):  # each request completes within the header deadline armed by the last response
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = _response(sock)
        assert status == 200 and headers.get("connection") != "close"
    assert _closed_by_server(sock)


def test_connections_past_the_cap_get_503(gw):
    held = [_connect(gw) for _ in range(MAX_CONNECTIONS)]
    try:
        extra = _connect(gw)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = _response(extra)
        assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert error["code"] == "too_many_connections" and "LORAG_MAX_CONNECTIONS" in error["message"]
        assert _closed_by_server(extra)
    finally:
        for sock in held:
            sock.close()
    # Once those are gone, new connections are served again.
    deadline = time.monotonic() + GUARD_S
    while httpx.get(f"{gw.url}/healthz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
