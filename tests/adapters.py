"""Real peft LoRA adapters for tests, built on a base model folder (nothing is downloaded)."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

# Large enough that greedy decoding of the tiny demo model visibly changes, so canaries can tell.
LORA_B_STD = 0.5


def make_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    nonzero: bool = True,
) -> Path:
    """Save a LoRA adapter for `base_dir` at `out_dir`; `nonzero=False` gives peft's no-op init (B = 0)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=not nonzero)
    peft_model = get_peft_model(model, config)
    if nonzero:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0.0, LORA_B_STD)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    # peft writes a model card too; an adapter upload holds only the adapter files.
    (out_dir / "README.md").unlink(missing_ok=True)
    return out_dir


def pack(folder: Path, fmt: str = "tar.gz") -> bytes:
    """The folder's files archived under a top folder named after it, as "tar.gz", "tar" or "zip"."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    buf = io.BytesIO()
    if fmt == "zip":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in files:
                archive.write(path, f"{folder.name}/{path.name}")
    elif fmt in ("tar", "tar.gz"):
        with tarfile.open(fileobj=buf, mode="w:gz" if fmt == "tar.gz" else "w") as archive:
            for path in files:
                archive.add(path, f"{folder.name}/{path.name}")
    else:
        raise ValueError(f"unknown archive format {fmt!r}; use tar.gz, tar or zip")
    return buf.getvalue()
