"""lorag.json: what made an adapter. The service reads `base_fingerprint` (and refuses another
base); `training` records the rest: the resolved config, the template and tokenizer it was
rendered with, the data, the libraries, the seed, the source commit and the metrics."""

from __future__ import annotations

import hashlib
import subprocess
from importlib.metadata import version
from pathlib import Path

from knowledge.fingerprint import fingerprint, template_hash, tokenizer_hash
from training.config import TrainConfig

def manifest(config: TrainConfig, summary: dict, facts: dict) -> dict:
    return {
        "base_fingerprint": fingerprint(config.model),
        "training": {
            "recipe": "lora-sft",
            "config": config.as_dict(),
            "template_sha256": template_hash(config.model),
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
