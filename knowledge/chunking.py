"""Split a document into overlapping windows of embedder tokens, cut at word boundaries.

Offsets are characters into the original text, so a chunk can always be traced back
(`text[chunk.start:chunk.end] == chunk.text`) and cited.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    start: int  # character offset into the document, inclusive
    end: int  # character offset, exclusive


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
