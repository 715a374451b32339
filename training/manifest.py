"""lorag.json: what made an adapter. The service reads `base_fingerprint` (and refuses another
base); `training` records the rest: the resolved config, the template and tokenizer it was
rendered with, the data, the libraries, the seed, the source commit and the metrics."""

from __future__ import annotations

import hashlib
import subprocess
from importlib.metadata import version
from pathlib import Path

from knowledge.fingerprint import fingerprint
from training.config import TrainConfig
from training.data.masking import Renderer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model")


def manifest(config: TrainConfig, renderer: Renderer, summary: dict, facts: dict) -> dict:
    return {
        "base_fingerprint": fingerprint(config.model),
        "training": {
            "recipe": "lora-sft",
            "config": config.as_dict(),
            "template_sha256": template_hash(renderer),
            "tokenizer_sha256": tokenizer_hash(config.model),
            "data": {
                "train": {"sha256": _file_hash(config.train), "rows": summary["rows"],
                          "trainable_tokens": summary["trainable_tokens"]},
                "eval": None if config.eval is None else {"sha256": _file_hash(config.eval), "rows": summary["eval_rows"]},
            },
            "libraries": {name: version(name) for name in ("torch", "transformers", "peft", "safetensors")},
            "seed": config.seed,
            "commit": _commit(),
            **facts,
        },
    }


def template_hash(renderer: Renderer) -> str:
    return hashlib.sha256(renderer.tokenizer.chat_template.encode()).hexdigest()


def tokenizer_hash(model_dir: Path) -> str:
    """sha256 over the tokenizer's files (name, then bytes), in a fixed order."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _commit() -> str | None:
    """The source commit this code came from, if it runs from a git checkout."""
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() or None if found.returncode == 0 else None
