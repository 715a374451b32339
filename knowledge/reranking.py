"""Reranking: a second, slower judge of the first stage's best candidates.

A cross-encoder reads the query and a passage together, so it sees what a bi-encoder's two
separate vectors cannot (negation, which of two terms modifies which). It costs one forward
pass per candidate, so it only reorders the first `rerank_depth` hits of any mode. No
reranker weights ship with lorag: point LORAG_RERANKER_PATH at a sentence-transformers
CrossEncoder directory (e.g. a downloaded ms-marco-MiniLM-L-6-v2) to turn it on.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class Reranker(Protocol):
    def scores(self, query: str, passages: Sequence[str]) -> Sequence[float]:
        """One relevance score per passage, higher is better."""
        ...


class CrossEncoderReranker:
    """A sentence-transformers CrossEncoder read from a local directory (never the hub)."""

    def __init__(self, path: Path, device: str = "cpu"):
        from sentence_transformers import CrossEncoder  # heavy (torch): not at import time

        if not Path(path).is_dir():
            raise FileNotFoundError(f"reranker directory {path} does not exist (LORAG_RERANKER_PATH)")
        self._model = CrossEncoder(str(path), device=device, local_files_only=True)
        self._lock = threading.Lock()  # one forward pass at a time, as the embedder

    def scores(self, query: str, passages: Sequence[str]) -> Sequence[float]:
        if not passages:
            return []
        with self._lock:
            return self._model.predict([(query, passage) for passage in passages], show_progress_bar=False).tolist()
