"""The base model's fingerprint: one function, so that training records exactly what the
service checks an adapter's declared base against (service.adapters.inspection)."""

from __future__ import annotations

import hashlib
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
