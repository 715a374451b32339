"""Unpack an uploaded adapter (.tar, .tar.gz, .zip) or copy an adapter folder, refusing anything unsafe.

Only the few files an adapter needs are ever written, as regular files named
from ALLOWED_FILES into a folder created here; nothing in the archive chooses a
path on disk, and `extractall` is never used. Sizes are counted while the bytes
are read, because declared sizes can lie (zip bombs).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from service.errors import AdapterRejected

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
ALLOWED_FILES = frozenset({*REQUIRED_FILES, "lorag.json"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

CHUNK = 1 << 20
# Tar headers, padding and end blocks around the files: a few KiB for the few
# entries an adapter may have; the rest is slack.
TAR_OVERHEAD = 1 << 20
_COMPRESSED_TAR: dict[bytes, Callable[[IO[bytes]], IO[bytes]]] = {
    b"\x1f\x8b": lambda f: gzip.GzipFile(fileobj=f),
    b"BZh": bz2.BZ2File,
    b"\xfd7zXZ\x00": lzma.LZMAFile,
}
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, lzma.LZMAError)


def unpack(data: bytes, dest: Path, max_bytes: int) -> None:
    """Write the adapter files of archive `data` into the new folder `dest`; on rejection `dest` is removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.mkdir()  # raises if it exists: never write into (or later delete) a folder we did not create
    try:
        staging = _Staging(dest, max_bytes)
        if zipfile.is_zipfile(io.BytesIO(data)):
            _unpack_zip(data, staging)
        else:
            _unpack_tar(data, staging)
        staging.finish()
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def copy_folder(src: Path, dest: Path, max_bytes: int) -> None:
    """Copy the adapter files of folder `src` into the new folder `dest`, by the same rules as an archive."""
    if src.is_symlink():
        raise AdapterRejected(f"{src.name} is a symbolic link; give the adapter folder itself", code="link_in_folder")
    if not src.is_dir():
        raise AdapterRejected(f"{src.name} is not a folder; give a folder holding the adapter files",
                              code="not_a_folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.mkdir()
    try:
        staging = _Staging(dest, max_bytes)
        for entry in sorted(src.iterdir()):
            mode = entry.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise AdapterRejected(f"{entry.name} is a symbolic link; copy the real file into the folder",
                                      code="link_in_folder")
            if stat.S_ISDIR(mode):
                raise AdapterRejected(f"{entry.name}/ is a subfolder; put the adapter files directly in the folder",
                                      code="unsafe_path")
            if not stat.S_ISREG(mode):
                raise AdapterRejected(f"{entry.name} is not a regular file; remove it", code="link_in_folder")
            staging.check_name(entry.name)
            # O_NOFOLLOW: the entry cannot be swapped for a link between the check above and the read.
            with os.fdopen(os.open(entry, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
                staging.add(entry.name, _chunks(f))
        staging.finish()
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


class _Staging:
    """The files written so far: enforces names, duplicates and the total size while bytes arrive."""

    def __init__(self, dest: Path, max_bytes: int):
        self.dest = dest
        self.max_bytes = max_bytes
        self.total = 0
        self.names: set[str] = set()
        self.folder: str | None = None  # "" for the archive's top level

    def place(self, parts: list[str], *, is_dir: bool) -> None:
        """Accept an entry's folder: every file must be at the top level or in one and the same top folder."""
        folder = parts[0] if is_dir else "/".join(parts[:-1])
        if self.folder is None:
            self.folder = folder
        elif folder != self.folder:
            places = " and ".join(f"{f}/" if f else "the top level" for f in (self.folder, folder))
            raise AdapterRejected(
                f"the archive has entries in {places}; put the adapter files at the top level or in one folder",
                code="unsafe_path",
            )

    def check_name(self, name: str) -> None:
        if name in ALLOWED_FILES:
            if name in self.names:
                raise AdapterRejected(f"{name} appears twice; keep one copy", code="duplicate_file")
            return
        allowed = ", ".join(sorted(ALLOWED_FILES))
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterRejected(
                f"{name} is a pickle file, which can run code when loaded; only safetensors is accepted: "
                "save the adapter with save_pretrained(..., safe_serialization=True)",
                code="pickle_file",
            )
        raise AdapterRejected(f"unexpected file {name}; an adapter holds only {allowed}", code="unexpected_file")

    def reserve(self, declared: int) -> None:
        """Reject early on a declared size; the real bytes are counted again in add()."""
        if self.total + declared > self.max_bytes:
            raise _too_large(self.max_bytes)

    def add(self, name: str, chunks: Iterable[bytes]) -> None:
        self.names.add(name)
        with (self.dest / name).open("xb") as out:
            for chunk in chunks:
                self.total += len(chunk)
                if self.total > self.max_bytes:
                    raise _too_large(self.max_bytes)
                out.write(chunk)

    def finish(self) -> None:
        missing = [name for name in REQUIRED_FILES if name not in self.names]
        if missing:
            raise AdapterRejected(
                f"missing {', '.join(missing)}; an adapter needs {' and '.join(REQUIRED_FILES)} "
                "as written by peft's save_pretrained",
                code="missing_file",
            )



def _unpack_zip(data: bytes, staging: _Staging) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                parts = _path_parts(info.filename)
                kind = stat.S_IFMT(info.external_attr >> 16)  # Unix mode; 0 when made on Windows
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    what = "a symbolic link" if kind == stat.S_IFLNK else "not a regular file"
                    raise AdapterRejected(f"{info.filename} is {what}; archive the real file instead",
                                          code="link_in_archive")
                if info.is_dir():
                    _directory(parts, info.filename, staging)
                    continue
                staging.place(parts, is_dir=False)
                staging.check_name(parts[-1])
                if info.flag_bits & 0x1:
                    raise AdapterRejected(f"{info.filename} is encrypted; send an archive without a password",
                                          code="corrupt_archive")
                staging.reserve(info.file_size)
                with archive.open(info) as member:
                    staging.add(parts[-1], _chunks(member))
    except _ZIP_ERRORS as exc:
        raise AdapterRejected(f"the zip archive is damaged ({exc}); create it again", code="corrupt_archive") from None


def _unpack_tar(data: bytes, staging: _Staging) -> None:
    raw = _decompressed(data, staging.max_bytes)
    try:
        archive = tarfile.open(fileobj=io.BytesIO(raw), mode="r:*")
    except tarfile.TarError:
        raise AdapterRejected("the upload is not a .tar, .tar.gz or .zip archive; send one of those",
                              code="not_an_archive") from None
    try:
        with archive:
            for member in archive:
                parts = _path_parts(member.name)
                if member.isdir():
                    _directory(parts, member.name, staging)
                    continue
                if not member.isreg():
                    raise AdapterRejected(f"{member.name} is {_tar_kind(member)}; archive the real file instead",
                                          code="link_in_archive")
                staging.place(parts, is_dir=False)
                staging.check_name(parts[-1])
                staging.reserve(member.size)
                staging.add(parts[-1], _chunks(archive.extractfile(member)))
    except tarfile.TarError as exc:
        raise AdapterRejected(f"the tar archive is damaged ({exc}); create it again", code="corrupt_archive") from None


def _decompressed(data: bytes, max_bytes: int) -> bytes:
    """The tar inside a compressed upload, read no further than the size limit allows (gzip bombs)."""
    opener = next((o for magic, o in _COMPRESSED_TAR.items() if data.startswith(magic)), None)
    if opener is None:
        return data
    try:
        with opener(io.BytesIO(data)) as stream:
            raw = stream.read(max_bytes + TAR_OVERHEAD + 1)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise AdapterRejected(f"the compressed archive is damaged ({exc}); create it again",
                              code="corrupt_archive") from None
    if len(raw) > max_bytes + TAR_OVERHEAD:
        raise _too_large(max_bytes)
    return raw


def _too_large(max_bytes: int) -> AdapterRejected:
    return AdapterRejected(
        f"the adapter is larger than the limit of {max_bytes} bytes uncompressed; "
        "send a smaller adapter or raise LORAG_MAX_UPLOAD_BYTES",
        code="too_large",
        status_code=413,
    )


def _path_parts(name: str) -> list[str]:
    """The entry's path as components, "." dropped; absolute paths, ".." and deep nesting are refused."""
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise AdapterRejected(f"{name} is an absolute path; archive the files with relative paths",
                              code="unsafe_path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or any(".." in p.split("\\") for p in parts):
        raise AdapterRejected(f"{name} leaves the archive's folder (..); archive the files with plain relative paths",
                              code="unsafe_path")
    if len(parts) > 2:
        raise AdapterRejected(
            f"{name} is nested more than one folder deep; put the adapter files at the top level or in one folder",
            code="unsafe_path",
        )
    return parts


def _directory(parts: list[str], name: str, staging: _Staging) -> None:
    if not parts:  # "./", as written by `tar -C folder .`
        return
    if len(parts) > 1:
        raise AdapterRejected(f"{name} is a subfolder; put the adapter files directly in one folder",
                              code="unsafe_path")
    staging.place(parts, is_dir=True)


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {member.linkname})"
    if member.islnk():
        return f"a hard link (to {member.linkname})"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a fifo"
    return "not a regular file"


def _chunks(stream: IO[bytes] | None) -> Iterator[bytes]:
    assert stream is not None  # extractfile() returns a stream for every regular member
    while chunk := stream.read(CHUNK):
        yield chunk
