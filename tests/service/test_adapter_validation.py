"""Unpacking and inspecting uploaded adapters: real peft adapters on the tiny demo model, real archives."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.adapters.archive import copy_folder, unpack
from service.adapters.inspection import BaseModelInfo, inspect_adapter
from service.errors import AdapterRejected
from tests.adapters import make_adapter, pack
from training.demo.base import build_base

MAX_BYTES = 10 * 1024 * 1024
MAX_RANK = 8
PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def base(tiny_model: Path) -> BaseModelInfo:
    return BaseModelInfo.load(tiny_model)


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "good")


@pytest.fixture(scope="module")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base(tmp_path_factory.mktemp("models") / "tiny-seed1", variant="tiny", seed=1)


def rejection(call, *args) -> AdapterRejected:
    with pytest.raises(AdapterRejected) as caught:
        call(*args)
    return caught.value


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def unpacked(data: bytes, dest: Path, base: BaseModelInfo, max_bytes: int = MAX_BYTES):
    unpack(data, dest, max_bytes)
    return inspect_adapter(dest, base, MAX_RANK)


def edited(adapter: Path, dest: Path, *, config: dict | None = None, manifest=None, tensors=None) -> Path:
    """A copy of `adapter` with config keys replaced, a lorag.json written, or tensors replaced."""
    shutil.copytree(adapter, dest)
    if config is not None:
        path = dest / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if manifest is not None:
        (dest / "lorag.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    if tensors is not None:
        save_file(tensors, dest / "adapter_model.safetensors")
    return dest


def weights(adapter: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter / "adapter_model.safetensors")


# --- archives -----------------------------------------------------------------------------------


def tar_of(*entries: tuple[str, bytes] | tarfile.TarInfo, gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as archive:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                archive.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                archive.addfile(info, io.BytesIO(entry[1]))
    return buf.getvalue()


def zip_of(*entries: tuple[str | zipfile.ZipInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some tests need
        for name, data in entries:
            archive.writestr(name, data)
    return buf.getvalue()


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize("fmt", ["tar.gz", "tar", "zip"])
def test_good_adapter_unpacks_and_inspects(fmt, adapter, base, tmp_path):
    facts = unpacked(pack(adapter, fmt), tmp_path / "out", base)
    assert files_of(tmp_path / "out") == files_of(adapter)
    assert (facts.rank, facts.alpha, facts.target_modules) == (8, 16.0, ["q_proj", "v_proj"])
    assert facts.size_bytes == sum(len(b) for b in files_of(adapter).values())
    assert (facts.base_fingerprint, facts.training, facts.eval, facts.rag) == (None, None, None, None)


def test_files_at_the_top_level_or_under_dot_are_accepted(adapter, base, tmp_path):
    files = list(files_of(adapter).items())
    top = unpacked(tar_of(*files), tmp_path / "top", base)
    dotted = unpacked(tar_of(special(".", tarfile.DIRTYPE), *((f"./{n}", b) for n, b in files)), tmp_path / "dot", base)
    with_dir = unpacked(zip_of(("good/", b""), *((f"good/{n}", b) for n, b in files)), tmp_path / "dir", base)
    assert top.content_hash == dotted.content_hash == with_dir.content_hash


def test_content_hash_is_the_same_for_the_same_files_and_differs_for_other_weights(
    adapter, base, tiny_model, tmp_path
):
    first = unpacked(pack(adapter), tmp_path / "a", base)
    second = unpacked(pack(adapter, "zip"), tmp_path / "b", base)
    copy_folder(adapter, tmp_path / "c", MAX_BYTES)
    copied = inspect_adapter(tmp_path / "c", base, MAX_RANK)
    assert first.content_hash == second.content_hash == copied.content_hash
    other = make_adapter(tiny_model, tmp_path / "seed1", seed=1)
    assert unpacked(pack(other), tmp_path / "d", base).content_hash != first.content_hash


TAR_REJECTIONS = {
    "parent": (lambda files: tar_of(*files, ("../evil", b"x")), "unsafe_path"),
    "dotdot-inside": (lambda files: tar_of(*files, ("good/../../evil", b"x")), "unsafe_path"),
    "absolute": (lambda files: tar_of(*files, ("/etc/cron.d/evil", b"x")), "unsafe_path"),
    "nested": (lambda files: tar_of(*((f"a/b/{n}", d) for n, d in files)), "unsafe_path"),
    "nested-dir": (lambda files: tar_of(special("a/b", tarfile.DIRTYPE), *files), "unsafe_path"),
    "two-folders": (lambda files: tar_of(("a/" + files[0][0], files[0][1]), ("b/" + files[1][0], files[1][1])),
                    "unsafe_path"),
    "symlink": (lambda files: tar_of(files[1], special("adapter_config.json", tarfile.SYMTYPE, "/etc/passwd")),
                "link_in_archive"),
    "hardlink": (lambda files: tar_of(files[1], special("adapter_config.json", tarfile.LNKTYPE, "/etc/passwd")),
                 "link_in_archive"),
    "fifo": (lambda files: tar_of(*files, special("lorag.json", tarfile.FIFOTYPE)), "link_in_archive"),
    "device": (lambda files: tar_of(*files, special("lorag.json", tarfile.CHRTYPE)), "link_in_archive"),
    "pickle": (lambda files: tar_of(files[0], ("adapter_model.bin", b"\x80\x04K\x01.")), "pickle_file"),
    "extra": (lambda files: tar_of(*files, ("notes.txt", b"hi")), "unexpected_file"),
    "missing-config": (lambda files: tar_of(files[1]), "missing_file"),
    "duplicate": (lambda files: tar_of(*files, files[0]), "duplicate_file"),
    "not-an-archive": (lambda files: b"just some bytes, not an archive", "not_an_archive"),
    "empty": (lambda files: b"", "not_an_archive"),
    "damaged-gzip": (lambda files: b"\x1f\x8b\x08\x00" + b"garbage" * 20, "corrupt_archive"),
    "truncated-tar": (lambda files: tar_of(*files, gz=False)[:2000], "corrupt_archive"),
}


@pytest.mark.parametrize("case", TAR_REJECTIONS)
def test_bad_tar_is_rejected_and_leaves_nothing(case, adapter, tmp_path):
    build, code = TAR_REJECTIONS[case]
    dest = tmp_path / "out"
    error = rejection(unpack, build(list(files_of(adapter).items())), dest, MAX_BYTES)
    assert error.code == code, error.message
    assert error.status_code == 422
    assert not dest.exists()


def zip_symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


ZIP_REJECTIONS = {
    "symlink": (lambda files: zip_of(files[1], (zip_symlink("adapter_config.json"), b"/etc/passwd")),
                "link_in_archive"),
    "parent": (lambda files: zip_of(*files, ("../evil", b"x")), "unsafe_path"),
    "absolute": (lambda files: zip_of(*files, ("/evil", b"x")), "unsafe_path"),
    "nested": (lambda files: zip_of(*((f"a/b/{n}", d) for n, d in files)), "unsafe_path"),
    "pickle": (lambda files: zip_of(files[0], ("adapter_model.pth", b"x")), "pickle_file"),
    "extra": (lambda files: zip_of(*files, ("model.onnx", b"x")), "unexpected_file"),
    "missing-weights": (lambda files: zip_of(files[0]), "missing_file"),
    "duplicate": (lambda files: zip_of(*files, files[1]), "duplicate_file"),
}


@pytest.mark.parametrize("case", ZIP_REJECTIONS)
def test_bad_zip_is_rejected_and_leaves_nothing(case, adapter, tmp_path):
    build, code = ZIP_REJECTIONS[case]
    dest = tmp_path / "out"
    error = rejection(unpack, build(list(files_of(adapter).items())), dest, MAX_BYTES)
    assert error.code == code, error.message
    assert not dest.exists()


def test_size_limit_counts_uncompressed_bytes(adapter, base, tmp_path):
    files = files_of(adapter)
    total = sum(len(b) for b in files.values())
    for fmt in ("tar.gz", "zip"):
        assert unpacked(pack(adapter, fmt), tmp_path / f"exact-{fmt}", base, max_bytes=total).size_bytes == total
        error = rejection(unpack, pack(adapter, fmt), tmp_path / f"over-{fmt}", total - 1)
        assert (error.code, error.status_code) == ("too_large", 413)
        assert not (tmp_path / f"over-{fmt}").exists()


def test_highly_compressed_archives_are_stopped_at_the_limit(adapter, tmp_path):
    config = files_of(adapter)["adapter_config.json"]
    zeros = bytes(8 * 1024 * 1024)  # compresses to a few KiB
    for name, data in {
        "tar": tar_of(("adapter_config.json", config), ("adapter_model.safetensors", zeros)),
        "zip": zip_of(("adapter_config.json", config), ("adapter_model.safetensors", zeros)),
        # Not even a tar: only decompressing past the limit would find that out.
        "gzip": gzip.compress(zeros),
    }.items():
        assert len(data) < 100_000
        error = rejection(unpack, data, tmp_path / name, 1024 * 1024)
        assert (error.code, error.status_code) == ("too_large", 413), name
        assert not (tmp_path / name).exists()


def test_zip_that_understates_a_size_yields_no_extra_bytes(adapter, tmp_path):
    config = files_of(adapter)["adapter_config.json"]
    data = bytearray(zip_of(("adapter_config.json", config), ("adapter_model.safetensors", bytes(4 * 1024 * 1024))))
    # Declare the 4 MiB member as 100 bytes, in its local header and in the central directory.
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("adapter_model.safetensors")
    struct.pack_into("<I", data, info.header_offset + 22, 100)
    central = data.rindex(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 100)
    assert zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("adapter_model.safetensors").file_size == 100

    error = rejection(unpack, bytes(data), tmp_path / "out", 1024 * 1024)
    assert error.code == "corrupt_archive"  # the reader stops at the declared size and the CRC fails
    assert not (tmp_path / "out").exists()


def test_unpack_never_writes_into_an_existing_folder(adapter, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    with pytest.raises(FileExistsError):
        unpack(pack(adapter), tmp_path / "out", MAX_BYTES)
    assert os.listdir(tmp_path / "out") == ["keep"]


# --- folders ------------------------------------------------------------------------------------


def test_folder_copy_follows_the_archive_rules(adapter, tmp_path):
    def case(name: str, change) -> AdapterRejected:
        src = shutil.copytree(adapter, tmp_path / name)
        change(src)
        dest = tmp_path / f"{name}-out"
        error = rejection(copy_folder, src, dest, MAX_BYTES)
        assert not dest.exists()
        return error

    assert case("symlink", lambda s: (s / "lorag.json").symlink_to("/etc/passwd")).code == "link_in_folder"
    assert case("fifo", lambda s: os.mkfifo(s / "lorag.json")).code == "link_in_folder"
    assert case("subfolder", lambda s: (s / "more").mkdir()).code == "unsafe_path"
    assert case("pickle", lambda s: (s / "adapter_model.bin").write_bytes(b"x")).code == "pickle_file"
    assert case("extra", lambda s: (s / "README.md").write_text("hi")).code == "unexpected_file"
    assert case("missing", lambda s: (s / "adapter_config.json").unlink()).code == "missing_file"

    (tmp_path / "link").symlink_to(adapter, target_is_directory=True)
    assert rejection(copy_folder, tmp_path / "link", tmp_path / "o1", MAX_BYTES).code == "link_in_folder"
    assert rejection(copy_folder, adapter / "adapter_config.json", tmp_path / "o2", MAX_BYTES).code == "not_a_folder"
    too_large = rejection(copy_folder, adapter, tmp_path / "o3", 1000)
    assert (too_large.code, too_large.status_code) == ("too_large", 413)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


# --- inspection ---------------------------------------------------------------------------------


def test_base_model_info_reads_linear_shapes_and_a_stable_fingerprint(tiny_model, other_base, base):
    assert base.modules["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert base.modules["model.layers.1.mlp.gate_proj"] == (64, 128)  # (in, out)
    assert "model.norm" not in base.modules  # 1-D
    again = BaseModelInfo.load(tiny_model)
    assert again == base and len(base.fingerprint) == 64
    assert BaseModelInfo.load(other_base).fingerprint != base.fingerprint


def test_manifest_is_read_and_a_matching_fingerprint_accepted(adapter, base, tmp_path):
    manifest = {
        "base_fingerprint": base.fingerprint,
        "training": {"epochs": 3},
        "eval": {"loss": 1.2},
        "rag": {"collection": "docs", "top_k": 4, "filter": {"lang": "en"}, "mode": "keyword"},
    }
    facts = inspect_adapter(edited(adapter, tmp_path / "a", manifest=manifest), base, MAX_RANK)
    assert (facts.base_fingerprint, facts.training, facts.eval, facts.rag) == tuple(manifest.values())
    short = edited(adapter, tmp_path / "b", manifest={"base_fingerprint": base.fingerprint[:16]})
    assert inspect_adapter(short, base, MAX_RANK).base_fingerprint == base.fingerprint[:16]


def test_target_modules_as_a_regex(adapter, base, tmp_path):
    good = edited(adapter, tmp_path / "good", config={"target_modules": r".*\.(q|v)_proj"})
    assert inspect_adapter(good, base, MAX_RANK).target_modules == [r".*\.(q|v)_proj"]
    bad = edited(adapter, tmp_path / "bad", config={"target_modules": r"q_proj"})  # must match the full name
    assert rejection(inspect_adapter, bad, base, MAX_RANK).code == "unknown_target_module"


CONFIG_REJECTIONS = {
    "peft-type": ({"peft_type": "LOHA"}, "invalid_config"),
    "rank-missing": ({"r": None}, "invalid_config"),
    "rank-string": ({"r": "8"}, "invalid_config"),
    "rank-zero": ({"r": 0}, "invalid_config"),
    "rank-high": ({"r": 16}, "rank_too_high"),
    "rank-pattern-high": ({"rank_pattern": {"q_proj": 32}}, "rank_too_high"),
    "unknown-target": ({"target_modules": ["q_proj", "no_such_proj"]}, "unknown_target_module"),
    "bad-regex": ({"target_modules": "(("}, "invalid_config"),
}


@pytest.mark.parametrize("case", CONFIG_REJECTIONS)
def test_bad_config_is_rejected(case, adapter, base, tmp_path):
    change, code = CONFIG_REJECTIONS[case]
    error = rejection(inspect_adapter, edited(adapter, tmp_path / "a", config=change), base, MAX_RANK)
    assert (error.code, error.status_code) == (code, 422), error.message
    if code == "rank_too_high":
        assert "LORAG_ENGINE_MAX_LORA_RANK" in error.message and str(MAX_RANK) in error.message


def test_config_that_is_not_an_object_is_rejected(adapter, base, tmp_path):
    folder = edited(adapter, tmp_path / "a")
    for text in ("[1, 2]", "{not json"):
        (folder / "adapter_config.json").write_text(text)
        assert rejection(inspect_adapter, folder, base, MAX_RANK).code == "invalid_config"


MANIFEST_REJECTIONS = {
    "not-object": "[]",
    "not-json": "{",
    "unknown-key": {"base_model": "x"},
    "training-list": {"training": [1]},
    "fingerprint-number": {"base_fingerprint": 12},
    "fingerprint-too-short": {"base_fingerprint": "abc"},
    "rag-list": {"rag": ["docs"]},
    "rag-unknown-key": {"rag": {"collection": "docs", "k": 3}},
    "rag-collection": {"rag": {"collection": 5}},
    "rag-top-k-zero": {"rag": {"top_k": 0}},
    "rag-top-k-huge": {"rag": {"top_k": 101}},
    "rag-top-k-bool": {"rag": {"top_k": True}},
    "rag-filter": {"rag": {"filter": ["lang", "en"]}},
    "rag-mode": {"rag": {"mode": "fuzzy"}},
}


@pytest.mark.parametrize("case", MANIFEST_REJECTIONS)
def test_bad_manifest_is_rejected(case, adapter, base, tmp_path):
    folder = edited(adapter, tmp_path / "a", manifest=MANIFEST_REJECTIONS[case])
    assert rejection(inspect_adapter, folder, base, MAX_RANK).code == "invalid_manifest"


def test_adapter_for_another_base_is_rejected(other_base, base, tmp_path):
    foreign = make_adapter(other_base, tmp_path / "foreign")
    other_fingerprint = BaseModelInfo.load(other_base).fingerprint
    folder = edited(foreign, tmp_path / "declared", manifest={"base_fingerprint": other_fingerprint})
    error = rejection(inspect_adapter, folder, base, MAX_RANK)
    assert error.code == "base_mismatch"
    assert other_fingerprint[:16] in error.message and base.fingerprint[:16] in error.message


def test_tensor_that_does_not_fit_the_base_module_is_rejected(adapter, base, tmp_path):
    tensors = weights(adapter)
    tensors[f"{PREFIX}.lora_A.weight"] = torch.randn(8, 32)  # the base's q_proj takes 64 inputs
    folder = edited(adapter, tmp_path / "a", tensors=tensors)
    assert rejection(inspect_adapter, folder, base, MAX_RANK).code == "base_mismatch"


def test_adapter_whose_tensors_exceed_the_rank_is_rejected(adapter, tiny_model, base, tmp_path):
    wide = make_adapter(tiny_model, tmp_path / "r16", rank=16, alpha=32)
    assert rejection(inspect_adapter, wide, base, MAX_RANK).code == "rank_too_high"
    assert inspect_adapter(wide, base, 16).rank == 16
    # A config that understates the rank does not get the tensors past the limit.
    understated = edited(wide, tmp_path / "understated", config={"r": 8, "lora_alpha": 16})
    error = rejection(inspect_adapter, understated, base, MAX_RANK)
    assert error.code == "rank_too_high" and "q_proj has rank 16" in error.message


def test_damaged_weights_are_rejected(adapter, base, tmp_path):
    folder = edited(adapter, tmp_path / "a")
    path = folder / "adapter_model.safetensors"
    original = path.read_bytes()
    for damaged in (original[:-100], b"not safetensors at all" * 10, b""):
        path.write_bytes(damaged)
        assert rejection(inspect_adapter, folder, base, MAX_RANK).code == "corrupt_safetensors"

    for bad in (float("nan"), float("inf")):
        tensors = weights(adapter)
        tensors[f"{PREFIX}.lora_B.weight"][3, 2] = bad
        save_file(tensors, path)
        assert rejection(inspect_adapter, folder, base, MAX_RANK).code == "corrupt_safetensors"


def test_tensors_that_are_not_plain_lora_weights_are_rejected(adapter, base, tmp_path):
    def code_with(name: str, tensors: dict) -> str:
        return rejection(inspect_adapter, edited(adapter, tmp_path / name, tensors=tensors), base, MAX_RANK).code

    t = weights(adapter)
    assert code_with("saved-module", {**t, "base_model.model.lm_head.weight": torch.zeros(1005, 64)}) == (
        "unsupported_tensor"
    )
    assert code_with("dora", {**t, f"{PREFIX}.lora_magnitude_vector": torch.ones(64)}) == "unsupported_tensor"
    assert code_with("half", {k: v for k, v in t.items() if k != f"{PREFIX}.lora_B.weight"}) == "unsupported_tensor"
    assert code_with("int", {**t, f"{PREFIX}.lora_A.weight": torch.ones(8, 64, dtype=torch.int32)}) == (
        "unsupported_tensor"
    )
    missing_layer = {k.replace("layers.1.", "layers.9."): v for k, v in t.items()}
    assert code_with("layer9", missing_layer) == "unknown_target_module"
    assert code_with("empty", {}) == "invalid_config"
