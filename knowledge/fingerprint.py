"""The base model's fingerprint, chat template hash and tokenizer hash: one function each, so
that training records exactly what the service checks an adapter against
(service.adapters.inspection)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

SAMPLE_BYTES = 1 << 20


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def fingerprint(model_dir: Path) -> str:
    """Full sha256 hex identifying the base model's weights, cheap enough to compute at every start.

    Hashed: config.json's bytes, then for each *.safetensors file in name order its
    name, its size, its JSON header and 1 MiB taken from the middle of its data.
    The header pins every tensor's name, dtype and shape; the sample tells apart
    weights with identical shapes (another seed, another fine-tune) without
    reading gigabytes.
    """
    digest = hashlib.sha256()

    def field(data: bytes) -> None:  # length-prefixed, so fields cannot run into each other
        digest.update(struct.pack("<Q", len(data)) + data)

    field((model_dir / "config.json").read_bytes())
    for path in weight_files(model_dir):
        size = path.stat().st_size
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = f.read(header_len)
            data_start = 8 + header_len
            data_len = max(size - data_start, 0)
            f.seek(data_start + max(data_len - SAMPLE_BYTES, 0) // 2)
            sample = f.read(SAMPLE_BYTES)
        for part in (path.name.encode(), str(size).encode(), header, sample):
            field(part)
    return digest.hexdigest()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model")


def template_hash(model_dir: Path) -> str:
    """sha256 hex of the chat template the model folder gives transformers (and so vLLM):
    chat_template.jinja, else tokenizer_config.json's chat_template; of "" if it has none."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        text = jinja.read_text(encoding="utf-8")
    else:
        config = model_dir / "tokenizer_config.json"
        found = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
        text = found if isinstance(found, str) else json.dumps(found, sort_keys=True) if found else ""
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_hash(model_dir: Path) -> str:
    """sha256 hex over the tokenizer's files (name, then bytes), in a fixed order."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file():
            data = path.read_bytes()
            digest.update(struct.pack("<Q", len(name)) + name.encode() + struct.pack("<Q", len(data)) + data)
    return digest.hexdigest()
