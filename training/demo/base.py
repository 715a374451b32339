"""Build the demo base model: a small Llama with its own BPE tokenizer and chat template.

Nothing is downloaded: the tokenizer is trained on the demo corpus and the
weights are initialised from a seed, so the same seed gives the same files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from training.demo.corpus import corpus

log = logging.getLogger(__name__)

MANIFEST = "lorag-demo.json"

# Role markers are single tokens so a turn boundary can never be split or forged
# by ordinary text; <|end|> closes a turn and is the model's EOS.
SPECIAL_TOKENS = ["<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Variant:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int  # head_dim = hidden_size / heads must be one vLLM's CPU attention supports (32, 64, ...)
    kv_heads: int
    max_positions: int
    corpus_lines: int


VARIANTS = {
    # About 5 M parameters: answers in real time on a laptop CPU.
    "demo": Variant("demo", 4096, 256, 704, 4, 4, 4, 4096, 40_000),
    # About 100 M parameters (GPT-2 small's shape): an engine whose work per token is closer to
    # a production model's, for benchmarks that compare the gateway's cost with the engine's.
    "small": Variant("small", 8192, 768, 2048, 12, 12, 12, 4096, 40_000),
    # About 0.2 M parameters: builds in a few seconds, for the test suite.
    "tiny": Variant("tiny", 1024, 64, 128, 2, 2, 2, 2048, 4_000),
}


class BuildError(Exception):
    """The demo model could not be built as asked."""


def build_base(out_dir: Path, variant: str = "demo", seed: int = 0, force: bool = False) -> Path:
    """Write the model directory at `out_dir`; a no-op if it already holds this variant and seed."""
    if variant not in VARIANTS:
        raise BuildError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    spec = VARIANTS[variant]
    wanted = {"variant": asdict(spec), "seed": seed}
    existing = _read_manifest(out_dir)
    if existing and not force and {k: existing.get(k) for k in wanted} == wanted:
        log.info("demo base model %r (seed %d) already at %s", variant, seed, out_dir)
        return out_dir

    # Build beside the target and swap in at the end, so an interrupted build
    # never leaves a half-written model where the service looks for one.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        staging = Path(tmp) / "model"
        log.info("building demo base model %r (seed %d) ...", variant, seed)
        tokenizer = _train_tokenizer(spec, seed, staging)
        _init_model(spec, seed, tokenizer, staging)
        files = {p.name: _sha256(p) for p in sorted(staging.iterdir())}
        (staging / MANIFEST).write_text(json.dumps({**wanted, "files": files}, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    log.info("demo base model written to %s", out_dir)
    return out_dir


def _train_tokenizer(spec: Variant, seed: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the vocabulary, so any input text can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(seed, spec.corpus_lines), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        model_max_length=spec.max_positions,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return tokenizer


def _init_model(spec: Variant, seed: int, tokenizer, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)


def _read_manifest(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
