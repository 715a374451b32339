"""Real components for knowledge tests: the packaged embedder (loaded once), and the store both
embedded (SQLite, Chroma in a temp dir) and scaled out (the session's PostgreSQL and `chroma run`
servers, tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from knowledge import Embedder, KnowledgeBase, KnowledgeSettings

CHROMA_MODES = ["persistent", "server"]


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(params=CHROMA_MODES)
def chroma_mode(request: pytest.FixtureRequest) -> str:
    return request.param


def chroma_settings(mode: str, home: Path, request: pytest.FixtureRequest, **overrides) -> KnowledgeSettings:
    """Settings for `home`, the two ways lorag runs: embedded ("persistent": SQLite and Chroma in
    home) or scaled out ("server": a PostgreSQL database of home's own on the session's server,
    and the session's `chroma run` server)."""
    if mode != "server":
        return KnowledgeSettings(_env_file=None, home=home, **overrides)
    database = request.getfixturevalue("postgres_server").database(str(home))
    return KnowledgeSettings(_env_file=None, home=home, chroma_url=request.getfixturevalue("chroma_server"),
                             database_url=database, **overrides)


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
