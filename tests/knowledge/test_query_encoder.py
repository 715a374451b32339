"""The query encoder on ONNX Runtime: torch's vectors, exported once per model, rebuilt when unusable."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from knowledge import Embedder
from knowledge.query_encoder import MIN_COSINE, OnnxEncoder, QueryEncoderUnavailable, _exporter_without_onnx_package
from knowledge.query_encoder import model_digest

WINDOW_WORDS = "the harbour master logs every arrival and departure at the north quay of Calder Bay " * 40

QUERIES = [
    "ferry",
    "When does the night ferry leave from pier 4?",
    "What is the quay tariff for vessels over 40 metres, and who collects it at the south pier?",
    "",
    "   ",
    "tariff?!?! $$$ 31.5% — «quoted» “curly” ‘single’",
    "Ünïcödé façade naïve café résumé",
    "漢字とかなのクエリ、中文查询，한국어 질의",
    "emoji 👩‍👩‍👧‍👦 🚢⚓️ and flags 🇳🇴",
    "right-to-left \u202eabc\u202c, Arabic مرحبا, Hebrew שלום",
    "combining e\u0301\u0301 and zero width\u200bjoiner\u200d and NUL \x00 and BOM \ufeff",
    "\U0010ffff\ufffe\uffff private and noncharacters",
    "a" * 3000,  # one long word: many word pieces
    WINDOW_WORDS,  # far past the 256-token window: truncated
    WINDOW_WORDS + " but this tail is past the window and must not matter",
]


@pytest.fixture(scope="module")
def exported(embedder: Embedder, tmp_path_factory: pytest.TempPathFactory) -> OnnxEncoder:
    """One export for the module; tests that break a cache work on copies of it."""
    return OnnxEncoder(embedder, tmp_path_factory.mktemp("query-encoder"))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_vectors_equal_torchs_one_at_a_time_and_batched(embedder, exported):
    expected = np.concatenate([embedder.encode([q]) for q in QUERIES])
    alone = np.concatenate([exported.encode([q]) for q in QUERIES])
    batched = exported.encode(QUERIES)
    assert alone.dtype == np.float32 and alone.shape == (len(QUERIES), embedder.dim)
    assert cosines(expected, alone).min() >= MIN_COSINE
    assert cosines(expected, batched).min() >= MIN_COSINE
    # Normalised as sentence-transformers normalises, and truncated at the same token.
    assert np.allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)
    assert len(embedder.tokenizer(WINDOW_WORDS)["input_ids"]) > 256
    assert cosines(alone[-2:-1], alone[-1:])[0] >= MIN_COSINE


def test_a_second_start_reuses_the_export(embedder, exported):
    before = exported.path.stat()
    again = OnnxEncoder(embedder, exported.path.parent)
    assert not again.exported and again.path == exported.path
    after = exported.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [p.name for p in exported.path.parent.iterdir()] == [exported.path.name]  # no partial files left


def test_a_truncated_export_is_rebuilt(embedder, exported, tmp_path):
    broken = tmp_path / exported.path.name
    broken.write_bytes(exported.path.read_bytes()[: 1 << 20])  # a write cut short
    encoder = OnnxEncoder(embedder, tmp_path)
    assert encoder.exported
    assert broken.stat().st_size == exported.path.stat().st_size
    assert cosines(embedder.encode(QUERIES[:3]), encoder.encode(QUERIES[:3])).min() >= MIN_COSINE


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy exporter says it is legacy
def test_an_export_that_loads_but_gives_other_vectors_is_rebuilt(embedder, exported, tmp_path):
    class Wrong(torch.nn.Module):  # same inputs and output shape, wrong vectors
        def forward(self, input_ids, token_type_ids, attention_mask):
            return torch.nn.functional.normalize(torch.ones(input_ids.shape[0], 384) + input_ids[:, :1], dim=-1)

    names = [i.name for i in exported._session.get_inputs()]
    assert names == ["input_ids", "token_type_ids", "attention_mask"]
    example = tuple(torch.ones(1, 3, dtype=torch.int64) for _ in names)
    with _exporter_without_onnx_package():
        torch.onnx.export(Wrong(), example, str(tmp_path / exported.path.name), input_names=names,
                          dynamic_axes={n: {0: "b", 1: "s"} for n in names}, dynamo=False)
    encoder = OnnxEncoder(embedder, tmp_path)
    assert encoder.exported
    assert cosines(embedder.encode(QUERIES[:3]), encoder.encode(QUERIES[:3])).min() >= MIN_COSINE


def test_another_model_folder_has_another_cache_key(embedder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(embedder.path, copy)
    assert model_digest(copy) == model_digest(embedder.path)  # the key is the content, not the place
    config = copy / "tokenizer_config.json"
    config.write_text(config.read_text() + "\n")
    assert model_digest(copy) != model_digest(embedder.path)


def test_an_export_that_cannot_be_made_is_an_error_not_a_fallback(embedder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(QueryEncoderUnavailable, match="LORAG_QUERY_ENCODER=torch"):
        OnnxEncoder(embedder, blocker / "cache")
