"""The embedder's model on ONNX Runtime, for chat queries: torch's vectors at about a third of its time.

A chat request embeds one short query, and at batch 1 torch spends most of the time
in per-operator overhead rather than arithmetic; ONNX Runtime runs the same graph
with far less. The graph is the embedder's whole sentence-transformers pipeline
(the model folder's modules.json: Transformer, Pooling, Normalize), exported with
torch.onnx.export from the weights the embedder loaded, so pooling and normalisation
are the pipeline's own code, not a re-implementation. Inputs come from the embedder's
own tokenizer call (`Embedder.features`), so truncation and padding are identical.

The export is made at first use and cached in one file per model, named by a digest
of every file in the model folder: another model never reads it. It is written to a
temporary name and renamed into place. Every start checks the cached graph against
torch on PROBES; one that does not load or does not match is exported again, and an
export that still does not match (or cannot be made) raises QueryEncoderUnavailable:
the caller decides, nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from knowledge.embedding import Embedder

log = logging.getLogger("lorag.knowledge")

EXPORT_FORMAT = 1  # part of the cache key: bump when the export changes, and old exports are rebuilt
OPSET = 17
MIN_COSINE = 0.99999  # per probe, against torch: stored document vectors must still match queries

# Varied enough to catch a graph that traced a shape-dependent branch wrongly: nearly empty,
# short, unicode, whitespace that the tokenizer strips, and past the 256-token window.
PROBES = [
    "",
    "ferry",
    "When does the night ferry leave from pier 4?",
    "Ünïcödé façade, 漢字とかな, emoji 👩‍👩‍👧 and right-to-left \u202eabc\u202c",
    "   leading and trailing whitespace\t\n",
    "the harbour master logs every arrival, departure and tariff change at the north quay " * 30,
]


class QueryEncoderUnavailable(RuntimeError):
    """The embedder's model could not be exported to, or run on, ONNX Runtime with torch's vectors."""


class OnnxEncoder:
    """Texts → the vectors `Embedder.encode` gives, run on ONNX Runtime; safe to call from several threads."""

    def __init__(self, embedder: Embedder, cache_dir: Path, threads: int = 1):
        self.dim = embedder.dim
        self.batch_size = embedder.batch_size
        self._embedder = embedder
        self._options = onnxruntime.SessionOptions()
        # The gateway's thread budget (LORAG_TORCH_THREADS): vLLM shares these cores.
        self._options.intra_op_num_threads = threads
        self._options.inter_op_num_threads = 1
        self._options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        # Idle pool threads would otherwise spin on the cores generation needs.
        self._options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._options.log_severity_level = 3  # errors only
        self.path = Path(cache_dir) / f"{model_digest(embedder.path)}.onnx"
        self.exported = False  # whether this instance made the export (none cached, or the cached one unusable)
        self._session = self._open()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # Longest first, as Embedder.encode does, so each batch pads to similar lengths.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        for lo in range(0, len(order), self.batch_size):
            part = order[lo : lo + self.batch_size]
            out[part] = self._run(self._session, [texts[i] for i in part])
        return out

    def _run(self, session, texts: list[str]) -> np.ndarray:
        features = self._embedder.features(texts)
        return session.run(None, {i.name: features[i.name] for i in session.get_inputs()})[0]

    def _open(self):
        if self.path.is_file():
            try:
                session = self._load()
                self._check(session)
                return session
            except Exception as exc:  # corrupt, partial, or made from other code: rebuilt below
                log.warning("query encoder export %s is unusable (%s): exporting it again", self.path, exc)
        started = time.perf_counter()
        try:
            self._export()
            session = self._load()
            self._check(session)
        except Exception as exc:
            raise QueryEncoderUnavailable(
                f"could not run the embedder {self._embedder.path} on ONNX Runtime ({type(exc).__name__}: {exc}); "
                "set LORAG_QUERY_ENCODER=torch to embed queries with torch instead"
            ) from exc
        self.exported = True
        log.info("query encoder exported to ONNX in %.1f s: %s", time.perf_counter() - started, self.path)
        return session

    def _load(self):
        return onnxruntime.InferenceSession(str(self.path), self._options, providers=["CPUExecutionProvider"])

    def _check(self, session) -> None:
        """Refuse a graph whose vectors differ from torch's, one text at a time and in a padded batch."""
        # One at a time for torch: a batch would pad every probe to the longest one's 256 tokens.
        expected = np.concatenate([self._embedder.encode([text]) for text in PROBES])
        alone = np.concatenate([self._run(session, [text]) for text in PROBES])
        short = len(PROBES) - 1  # all but the longest: padding, without the cost of 256-token rows
        batched = self._run(session, PROBES[:short])
        cosines = np.concatenate([(expected * alone).sum(axis=1), (expected[:short] * batched).sum(axis=1)])
        worst = float(cosines.min())
        if not worst >= MIN_COSINE:  # `not >=`: a NaN fails too
            raise QueryEncoderUnavailable(f"its vectors differ from torch's (cosine {worst:.7f} < {MIN_COSINE})")

    def _export(self) -> None:
        pipeline = self._embedder.model
        # Two texts of different lengths, so the traced graph handles padding.
        example = {name: torch.from_numpy(array) for name, array in self._embedder.features(PROBES[1:3]).items()}
        names = list(example)
        device = next(pipeline.parameters()).device
        graph = _Graph(pipeline, names).eval()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        try:
            # The tracer warns about shape tests it freezes (e.g. mask length == sequence length):
            # each holds for every input, and _check proves the graph on varied ones.
            with torch.no_grad(), warnings.catch_warnings(), _exporter_without_onnx_package():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    graph,
                    tuple(example[name].to(device) for name in names),
                    str(partial),
                    input_names=names,
                    output_names=["sentence_embedding"],
                    dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "sentence_embedding": {0: "batch"}},
                    opset_version=OPSET,
                    dynamo=False,  # the torch.export-based exporter needs onnxscript, which is not installed
                )
            with partial.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(partial, self.path)  # readers see the old file or the whole new one, never a part
        finally:
            partial.unlink(missing_ok=True)


class _Graph(torch.nn.Module):
    """What is exported: the sentence-transformers pipeline, from input tensors to the normalised embedding."""

    def __init__(self, pipeline: torch.nn.Module, names: list[str]):
        super().__init__()
        self.pipeline = pipeline
        self.names = names  # the tokenizer's output names, in the order the tensors come

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.pipeline(dict(zip(self.names, tensors)))["sentence_embedding"]


@contextlib.contextmanager
def _exporter_without_onnx_package() -> Iterator[None]:
    """Let torch's TorchScript exporter run without the `onnx` package.

    It imports `onnx` for one step only: splicing the ONNX functions of onnxscript custom
    operators into the model. This graph has only standard ONNX operators (and without
    onnxscript installed no such function can exist), so that step returns the model
    unchanged; skip it. If torch moves this private hook the export fails, loudly.
    """
    try:
        import onnx  # noqa: F401
    except ImportError:
        pass
    else:
        yield
        return
    from torch.onnx._internal.torchscript_exporter import onnx_proto_utils

    original = onnx_proto_utils._add_onnxscript_fn
    onnx_proto_utils._add_onnxscript_fn = lambda model_bytes, custom_opsets: model_bytes
    try:
        yield
    finally:
        onnx_proto_utils._add_onnxscript_fn = original


def model_digest(path: Path) -> str:
    """Identity of a model folder: a digest of every file in it, with the export's format."""
    digest = hashlib.sha256(f"lorag query encoder, format {EXPORT_FORMAT}, opset {OPSET}\n".encode())
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        with file.open("rb") as f:
            digest.update(f"{file.relative_to(path).as_posix()}\0".encode() + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:32]
