"""Split a document into overlapping windows of embedder tokens, cut at word boundaries.

Offsets are characters into the original text, so a chunk can always be traced back
(`text[chunk.start:chunk.end] == chunk.text`) and cited.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

from tokenizers import Tokenizer

from knowledge.errors import ReindexRequired

STRATEGIES = ("tokens",)


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    start: int  # character offset into the document, inclusive
    end: int  # character offset, exclusive


@dataclass(frozen=True)
class Chunking:
    """How a collection's chunks were cut and embedded; recorded with the collection, so that
    every write to it cuts the same way and a change is an explicit reindex."""

    size: int  # largest chunk, in embedder tokens
    overlap: int  # tokens shared by consecutive chunks
    strategy: str  # "tokens": windows cut at word starts
    title_key: str | None  # metadata key embedded before each chunk, as context
    embedder: str  # Embedder.identity of the model that made the vectors

    def check(self, max_tokens: int) -> None:
        """Raise ValueError, saying what to change, if these settings cannot be used."""
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 8 <= self.size <= max_tokens:
            raise ValueError(f"chunk size must be an integer from 8 to {max_tokens} (the embedder's window), got {self.size!r}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or not 0 <= self.overlap < self.size:
            raise ValueError(f"chunk overlap must be an integer from 0 to size - 1 ({self.size - 1}), got {self.overlap!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"chunking strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.title_key is not None and (not isinstance(self.title_key, str) or not self.title_key.strip()):
            raise ValueError(f"title_key must be a metadata key or null, got {self.title_key!r}")

    def require_embedder(self, collection: str, identity: str) -> None:
        """Refuse to mix two models' vectors in one collection, or to query one's with the other's."""
        if self.embedder != identity:
            raise ReindexRequired(collection, self.embedder, identity)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Chunking:
        return cls(**json.loads(text))

    def changed(self, **changes: object) -> Chunking:
        """A copy with the given fields replaced (None values leave a field alone, except title_key,
        where "" means none)."""
        fields = {k: v for k, v in changes.items() if v is not None}
        if fields.get("title_key") == "":
            fields["title_key"] = None
        return replace(self, **fields)


class Chunker:
    """Windows of at most `size` tokens; consecutive windows share at most `overlap` tokens."""

    def __init__(self, tokenizer: object, size: int, overlap: int):
        if size < 1 or not 0 <= overlap < size:
            raise ValueError(f"need 0 <= overlap < size, got size={size}, overlap={overlap}")
        self.size = size
        self.overlap = overlap
        # A private copy of the fast tokenizer with truncation and padding off: the embedder's
        # tokenizer is configured per call by sentence-transformers, and sharing one Rust
        # tokenizer whose settings change under concurrent threads fails ("Already borrowed").
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not isinstance(backend, Tokenizer):
            raise TypeError(f"need a Hugging Face fast tokenizer, got {type(tokenizer).__name__}")
        self._tokenizer = Tokenizer.from_str(backend.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    def count(self, text: str) -> int:
        """Tokens in `text`, without special tokens."""
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def split(self, text: str) -> list[Chunk]:
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        offsets, words = encoding.offsets, encoding.word_ids
        n = len(offsets)
        if n == 0:
            # Nothing the tokenizer keeps (e.g. only control characters): one chunk, so the
            # document still exists in the index.
            start = len(text) - len(text.lstrip())
            end = len(text.rstrip())
            return [Chunk(0, text[start:end], start, end)] if end > start else []

        # A window may only start or end where a word starts, so that re-tokenizing a chunk's
        # text gives the same tokens (a lone "##ing" would not).
        word_start = [i == 0 or words[i] is None or words[i] != words[i - 1] for i in range(n)]
        chunks: list[Chunk] = []
        a = 0
        while True:
            b = min(a + self.size, n)
            if b < n:
                cut = b
                while cut > a and not word_start[cut]:
                    cut -= 1
                if cut > a:  # else one word is longer than a window: cut inside it
                    b = cut
            start, end = offsets[a][0], offsets[b - 1][1]
            chunks.append(Chunk(len(chunks), text[start:end], start, end))
            if b >= n:
                return chunks
            nxt = max(b - self.overlap, a + 1)
            while nxt < b and not word_start[nxt]:
                nxt += 1
            a = nxt
