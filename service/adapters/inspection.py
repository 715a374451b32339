"""Check an unpacked adapter folder against the served base model, before any engine sees it.

Everything the engine would trip over later (or silently get wrong) is refused
here with a message that says what to fix: a config peft did not write, tensors
that do not fit the base, a rank above the engine's maximum, NaN weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from knowledge.fingerprint import fingerprint, template_hash, tokenizer_hash, weight_files
from knowledge.search import MODES
from service.errors import AdapterRejected

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MANIFEST = "lorag.json"
MANIFEST_KEYS = {"base_fingerprint", "training", "eval", "rag"}
RAG_KEYS = {"collection", "top_k", "filter", "mode"}
PEFT_PREFIX = "base_model.model."
SAMPLE_BYTES = 1 << 20
SHORT = 16  # hex characters of a fingerprint shown to people (and accepted in lorag.json)

_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<half>[AB])\.weight")


@dataclass(frozen=True)
class BaseModelInfo:
    fingerprint: str
    modules: dict[str, tuple[int, int]]  # linear module name -> (in_features, out_features)
    template_sha256: str = ""  # what a trained adapter's lorag.json must record, if it records any
    tokenizer_sha256: str = ""

    @classmethod
    def load(cls, model_dir: Path) -> BaseModelInfo:
        """Read the module shapes from the safetensors headers only; no weights are loaded."""
        modules: dict[str, tuple[int, int]] = {}
        for path in weight_files(model_dir):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    shape = f.get_slice(key).get_shape()
                    if key.endswith(".weight") and len(shape) == 2:
                        out_features, in_features = shape  # torch stores linear weights as [out, in]
                        modules[key.removesuffix(".weight")] = (in_features, out_features)
        return cls(fingerprint(model_dir), modules, template_hash(model_dir), tokenizer_hash(model_dir))


@dataclass(frozen=True)
class AdapterFacts:
    content_hash: str  # sha256 hex over the sorted (file name, file bytes): the version id
    rank: int
    alpha: float
    target_modules: list[str]  # as in the config; a regex is kept as its one entry
    size_bytes: int
    base_fingerprint: str | None
    training: dict | None
    eval: dict | None
    rag: dict | None


def inspect_adapter(folder: Path, base: BaseModelInfo, max_rank: int) -> AdapterFacts:
    """The adapter's facts, or AdapterRejected naming the first thing the engine could not serve."""
    # The manifest first: a declared base that differs explains every later misfit at once.
    manifest = _read_json(folder / MANIFEST, code="invalid_manifest") if (folder / MANIFEST).exists() else {}
    _check_manifest(manifest, base)
    config = _read_json(folder / CONFIG, code="invalid_config")
    rank, alpha, targets = _check_config(config, base, max_rank)
    _check_tensors(folder / WEIGHTS, base, max_rank)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return AdapterFacts(
        content_hash=content_hash(files),
        rank=rank,
        alpha=alpha,
        target_modules=sorted(targets),  # peft writes a set: its order varies from run to run
        size_bytes=sum(p.stat().st_size for p in files),
        base_fingerprint=manifest.get("base_fingerprint"),
        training=manifest.get("training"),
        eval=manifest.get("eval"),
        rag=manifest.get("rag"),
    )


def content_hash(files: list[Path]) -> str:
    """sha256 hex over each file's name and bytes in name order: identical uploads get identical ids."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        name = path.name.encode()
        digest.update(struct.pack("<Q", len(name)) + name + struct.pack("<Q", path.stat().st_size))
        with path.open("rb") as f:
            while chunk := f.read(SAMPLE_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def _check_config(config: dict, base: BaseModelInfo, max_rank: int) -> tuple[int, float, list[str]]:
    if config.get("peft_type") != "LORA":
        raise _invalid_config(f"peft_type is {config.get('peft_type')!r}; only LoRA adapters (\"LORA\") are served")
    rank = config.get("r")
    if not _positive_int(rank):
        raise _invalid_config(f"r is {rank!r}; it must be the LoRA rank, a positive integer")
    alpha = config.get("lora_alpha", 8)  # peft's default
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise _invalid_config(f"lora_alpha is {alpha!r}; it must be a number")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(_positive_int(r) for r in pattern.values()):
        raise _invalid_config("rank_pattern must map module names to positive integer ranks")
    for where, r in [("r", rank), *((f"rank_pattern[{k!r}]", v) for k, v in pattern.items())]:
        if r > max_rank:
            raise _rank_too_high(f"{CONFIG}: {where} is {r}", max_rank)

    targets = config.get("target_modules")
    if isinstance(targets, str):
        _check_target_regex(targets, base)
        return rank, float(alpha), [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise _invalid_config("target_modules must be a list of module names or a regular expression")
    for target in targets:
        # peft's rule for a list: the name is the module's full name or its last dotted component(s).
        if not any(name == target or name.endswith("." + target) for name in base.modules):
            raise AdapterRejected(
                f"target module {target!r} is not in the base model; it has e.g. {_examples(base)}",
                code="unknown_target_module",
            )
    return rank, float(alpha), list(targets)


def _check_target_regex(pattern: str, base: BaseModelInfo) -> None:
    if pattern == "all-linear":  # peft's shorthand, not a regex
        return
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise _invalid_config(f"target_modules {pattern!r} is not a valid regular expression ({exc})") from None
    if not any(regex.fullmatch(name) for name in base.modules):
        raise AdapterRejected(
            f"target_modules {pattern!r} matches no module of the base model; it has e.g. {_examples(base)}",
            code="unknown_target_module",
        )


def _check_manifest(manifest: dict, base: BaseModelInfo) -> None:
    unknown = sorted(set(manifest) - MANIFEST_KEYS)
    if unknown:
        raise _invalid_manifest(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(MANIFEST_KEYS))}")
    for key in ("training", "eval"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise _invalid_manifest(f"{key} must be an object")
    _check_rag(manifest.get("rag"))
    _check_rendering(manifest.get("training") or {}, base)

    given = manifest.get("base_fingerprint")
    if given is None:
        return
    # The short form people see is accepted too; anything shorter could match by chance.
    if not isinstance(given, str) or len(given) < SHORT:
        raise _invalid_manifest(f"base_fingerprint must be the base model's fingerprint, at least {SHORT} hex "
                                f"characters (this service's is {base.fingerprint[:SHORT]})")
    if not base.fingerprint.startswith(given.lower()):
        raise AdapterRejected(
            f"the adapter was trained on base model {given[:SHORT]} but this service serves "
            f"{base.fingerprint[:SHORT]}; train it on the served base model",
            code="base_mismatch",
        )


def _check_rendering(training: dict, base: BaseModelInfo) -> None:
    """An adapter trained on rows rendered with another chat template or tokenizer learned a
    prompt shape the engine never sends: refuse it rather than serve it quietly worse."""
    for key, what, served in (("template_sha256", "chat template", base.template_sha256),
                              ("tokenizer_sha256", "tokenizer", base.tokenizer_sha256)):
        recorded = training.get(key)
        if recorded is not None and recorded != served:
            raise AdapterRejected(
                f"the adapter was trained with a {what} ({str(recorded)[:SHORT]}) other than the served model's "
                f"({served[:SHORT]}); train it again on rows rendered for this model",
                code="template_mismatch",
            )


def _check_rag(rag: Any) -> None:
    if rag is None:
        return
    if not isinstance(rag, dict):
        raise _invalid_manifest("rag must be an object with collection, top_k, filter and/or mode")
    unknown = sorted(set(rag) - RAG_KEYS)
    if unknown:
        raise _invalid_manifest(f"rag has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(RAG_KEYS))}")
    if "collection" in rag and not (isinstance(rag["collection"], str) and rag["collection"]):
        raise _invalid_manifest("rag.collection must be a collection name")
    if "top_k" in rag and not (_positive_int(rag["top_k"]) and rag["top_k"] <= 100):
        raise _invalid_manifest("rag.top_k must be an integer from 1 to 100")
    if "filter" in rag and not isinstance(rag["filter"], dict):
        raise _invalid_manifest("rag.filter must be an object (a metadata filter)")
    if "mode" in rag and rag["mode"] not in MODES:
        raise _invalid_manifest(f"rag.mode must be one of {', '.join(MODES)}")


def _check_tensors(path: Path, base: BaseModelInfo, max_rank: int) -> None:
    halves: dict[str, dict[str, list[int]]] = {}  # module -> {"A": shape, "B": shape}
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                match = _LORA_KEY.fullmatch(key.removeprefix(PEFT_PREFIX))
                if match is None:
                    raise AdapterRejected(
                        f"tensor {key} is not a LoRA weight (lora_A/lora_B); modules_to_save, DoRA and "
                        "embedding adapters are not served: train a plain LoRA adapter",
                        code="unsupported_tensor",
                    )
                module = match["module"]
                if module not in base.modules:
                    raise AdapterRejected(
                        f"tensor {key} adapts {module}, which the base model does not have",
                        code="unknown_target_module",
                    )
                tensor = f.get_tensor(key)
                if not tensor.is_floating_point() or tensor.dim() != 2:
                    raise AdapterRejected(f"tensor {key} must be a 2-D float matrix, not {tensor.dtype} "
                                          f"{list(tensor.shape)}", code="unsupported_tensor")
                if not torch.isfinite(tensor).all():
                    raise AdapterRejected(f"tensor {key} contains NaN or Inf; the training diverged",
                                          code="corrupt_safetensors")
                halves.setdefault(module, {})[match["half"]] = list(tensor.shape)
    except AdapterRejected:
        raise
    except Exception as exc:  # safetensors raises its own error, OSError and others for damaged files
        raise AdapterRejected(f"{WEIGHTS} cannot be read ({exc}); save the adapter again",
                              code="corrupt_safetensors") from None

    if not halves:
        raise _invalid_config(f"{WEIGHTS} holds no LoRA weights")
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterRejected(f"{module} has no {missing} weight; save the adapter again",
                                  code="unsupported_tensor")
        in_features, out_features = base.modules[module]
        (rank, a_in), (b_out, b_rank) = pair["A"], pair["B"]
        if rank > max_rank:
            raise _rank_too_high(f"{module} has rank {rank}", max_rank)
        if a_in != in_features or b_out != out_features or b_rank != rank:
            raise AdapterRejected(
                f"{module}: lora_A is {pair['A']} and lora_B is {pair['B']}, but the base module needs "
                f"[r, {in_features}] and [{out_features}, r]; the adapter was trained on another base model",
                code="base_mismatch",
            )


def _read_json(path: Path, *, code: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterRejected(f"{path.name} is missing", code="missing_file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterRejected(f"{path.name} is not valid JSON ({exc})", code=code) from None
    if not isinstance(value, dict):
        raise AdapterRejected(f"{path.name} must hold a JSON object", code=code)
    return value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _examples(base: BaseModelInfo) -> str:
    # Last components of the base's module names, e.g. q_proj, v_proj: what target_modules usually lists.
    return ", ".join(sorted({name.rsplit(".", 1)[-1] for name in base.modules})[:12])


def _rank_too_high(what: str, max_rank: int) -> AdapterRejected:
    return AdapterRejected(
        f"{what}, above the engine's maximum LoRA rank {max_rank}; train with a rank of at most {max_rank} "
        "or raise LORAG_ENGINE_MAX_LORA_RANK",
        code="rank_too_high",
    )


def _invalid_config(message: str) -> AdapterRejected:
    return AdapterRejected(f"{CONFIG}: {message}", code="invalid_config")


def _invalid_manifest(message: str) -> AdapterRejected:
    return AdapterRejected(f"{MANIFEST}: {message}", code="invalid_manifest")
