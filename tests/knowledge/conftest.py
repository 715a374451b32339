"""Real components for knowledge tests: the packaged embedder (loaded once), and Chroma both
embedded in a temp dir and as the session's `chroma run` server (tests/conftest.py)."""

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
