"""Session-wide real components: the tiny demo model, one lorag gateway with its vLLM engine, a
`chroma run` server and a PostgreSQL server."""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chroma import ChromaServer
from tests.gateway import Gateway
from tests.postgres import PostgresServer
from training.demo.base import build_base

# Small limits so that every limit is cheap to cross in tests.
LIMITS = {
    "LORAG_MAX_TOKENS": "512",
    "LORAG_MAX_N": "2",
    "LORAG_MAX_MESSAGES": "8",
    "LORAG_MAX_MESSAGE_CHARS": "2000",
    "LORAG_MAX_BODY_BYTES": "65536",
    "LORAG_MAX_UPLOAD_BYTES": "1048576",
    "LORAG_MAX_INFLIGHT_PER_ENGINE": "24",
}
MODEL_NAME = "tiny-demo"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base(tmp_path_factory.mktemp("models") / "tiny", variant="tiny", seed=0)


@pytest.fixture(scope="session")
def gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """One `lorag serve` (embedded vLLM) shared by the session; stopping it must leave no engine behind."""
    gw = Gateway(
        tiny_model,
        tmp_path_factory.mktemp("home"),
        env={**LIMITS, "LORAG_MODEL_NAME": MODEL_NAME, "LORAG_ENGINE_MAX_MODEL_LEN": "1024"},
    ).start()
    try:
        gw.wait_ready()
    except BaseException:
        gw.stop(signal.SIGKILL)
        raise
    yield gw
    code, left = gw.stop(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells why it ended.
    assert code in (0, -signal.SIGTERM), f"lorag exited with {code} on SIGTERM:\n{gw.log_tail()}"
    assert not left, f"engine processes left after lorag stopped: {left}"


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a `chroma run` server on a free loopback port; stopped at the end of the session."""
    server = ChromaServer(tmp_path_factory.mktemp("chroma-server")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    # Outside pytest's temp root, which only this user may enter: the server may run as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="lorag-postgres-"))
    server = PostgresServer(root).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend: a SQLite file, or a new database on the session's server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lorag.db'}"
    return request.getfixturevalue("postgres_server").database(str(tmp_path))
