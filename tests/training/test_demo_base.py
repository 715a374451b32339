"""The demo base model builder: deterministic, idempotent, and a model transformers can run."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.demo.base import MANIFEST, BuildError, build_base


def _files(model_dir):
    return json.loads((model_dir / MANIFEST).read_text())["files"]


def test_same_seed_builds_identical_files_and_another_seed_does_not(tmp_path, tiny_model):
    again = build_base(tmp_path / "again", variant="tiny", seed=0)
    other = build_base(tmp_path / "other", variant="tiny", seed=1)
    assert _files(again) == _files(tiny_model)
    assert _files(other)["model.safetensors"] != _files(tiny_model)["model.safetensors"]
    for name, digest in _files(again).items():
        assert (again / name).exists(), name


def test_rebuilding_the_same_model_is_a_no_op(tmp_path):
    model = build_base(tmp_path / "m", variant="tiny", seed=3)
    stamp = (model / "model.safetensors").stat().st_mtime_ns
    build_base(model, variant="tiny", seed=3)
    assert (model / "model.safetensors").stat().st_mtime_ns == stamp
    build_base(model, variant="tiny", seed=3, force=True)
    assert (model / "model.safetensors").stat().st_mtime_ns != stamp


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(BuildError, match="tiny"):
        build_base(tmp_path / "m", variant="huge")


def test_chat_template_marks_turns_with_single_special_tokens(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "When does the ferry leave?"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert prompt == "<s><|system|>\nBe brief.<|end|>\n<|user|>\nWhen does the ferry leave?<|end|>\n<|assistant|>\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for marker in ("<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert tokenizer.convert_tokens_to_ids(marker) in ids
    assert tokenizer.eos_token == "<|end|>"
    # Byte-level BPE: any text round-trips, including text the corpus never had.
    text = "Zoë paid 3½ crowns — 🚢"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_model_loads_and_generates_with_transformers(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "llama"
    inputs = tokenizer("The harbour authority", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
