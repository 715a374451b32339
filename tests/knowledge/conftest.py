"""Real components for knowledge tests: the packaged embedder (loaded once), and Chroma both
embedded in a temp dir and as one `chroma run` server for the whole session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import chromadb
import pytest
from chromadb.config import Settings as ChromaSettings

from knowledge import Embedder, KnowledgeBase, KnowledgeSettings

CHROMA_MODES = ["persistent", "server"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a `chroma run` server on a free loopback port; stopped at the end of the session."""
    root = tmp_path_factory.mktemp("chroma-server")
    port = free_port()
    chroma = Path(sys.executable).with_name("chroma")
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(chroma), "run", "--path", str(root / "data"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "ANONYMIZED_TELEMETRY": "False"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client = chromadb.HttpClient(
                    host="127.0.0.1", port=port, settings=ChromaSettings(anonymized_telemetry=False)
                )
                client.heartbeat()
                client.close()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chroma run did not start:\n{(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(params=CHROMA_MODES)
def chroma_mode(request: pytest.FixtureRequest) -> str:
    return request.param


def chroma_settings(mode: str, home: Path, request: pytest.FixtureRequest, **overrides) -> KnowledgeSettings:
    """Settings for `home`, with Chroma embedded there or on the session's server."""
    url = request.getfixturevalue("chroma_server") if mode == "server" else None
    return KnowledgeSettings(_env_file=None, home=home, chroma_url=url, **overrides)


@pytest.fixture
def make_settings(chroma_mode: str, tmp_path: Path, request: pytest.FixtureRequest):
    """Settings for a fresh home under tmp_path (the same home on every call of one test)."""

    def make(**overrides) -> KnowledgeSettings:
        return chroma_settings(chroma_mode, tmp_path / "home", request, **overrides)

    return make


@pytest.fixture
def kb(make_settings, embedder: Embedder) -> Iterator[KnowledgeBase]:
    base = KnowledgeBase(make_settings(), embedder=embedder)
    yield base
    base.close()
